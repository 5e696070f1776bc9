"""User-facing errors.

Every mistake a user can make (a malformed spec, an unknown block, a selector that matches nothing, a missing
file, a delta for another backbone) raises a :class:`PeftcError`. The CLI prints its one-line message and exits
with status 1; it never shows a traceback for these. Anything else that escapes is a bug in peftc.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable
from dataclasses import dataclass


@dataclass(frozen=True)
class Location:
    """Where in a spec something happened: a file position and the path inside the document."""

    file: str | None = None
    line: int | None = None
    col: int | None = None
    path: tuple[str | int, ...] = ()

    def __str__(self) -> str:
        parts = []
        if self.file:
            pos = self.file
            if self.line is not None:
                pos += f":{self.line}:{self.col or 1}"
            parts.append(pos)
        if self.path:
            parts.append(render_path(self.path))
        return ": ".join(parts)


def render_path(path: Iterable[str | int]) -> str:
    """``('rules', 2, 'insert', 'after')`` → ``rules[2].insert.after``."""
    out = ""
    for part in path:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out


def closest(word: str, candidates: Iterable[str], n: int = 3) -> list[str]:
    """The candidates that look most like ``word`` (for "did you mean" hints)."""
    pool = sorted({str(c) for c in candidates})
    hits = difflib.get_close_matches(word, pool, n=n, cutoff=0.5)
    if not hits:
        lowered = word.lower()
        hits = [c for c in pool if lowered and lowered in c.lower()][:n]
    return hits


def did_you_mean(word: str, candidates: Iterable[str]) -> str:
    hits = closest(word, candidates)
    if not hits:
        return ""
    return " (did you mean " + " or ".join(repr(h) for h in hits) + "?)"


class PeftcError(Exception):
    """A user error: one clear message, optionally pointing at a place in a spec or a file."""

    def __init__(self, message: str, where: Location | str | None = None):
        super().__init__(message)
        self.message = message
        self.where = where

    def __str__(self) -> str:
        where = str(self.where) if self.where else ""
        return f"{where}: {self.message}" if where else self.message


class SpecError(PeftcError):
    """The spec is malformed, refers to something unknown, or its selectors match nothing."""


class BackboneError(PeftcError):
    """The backbone cannot be built or its weights cannot be loaded."""


class TraceError(PeftcError):
    """torch.fx cannot trace the backbone."""


class ArtifactError(PeftcError):
    """An artifact directory is missing, broken, or does not belong to this backbone/spec."""


class TaskError(PeftcError):
    """An unknown task, or a task operation the model does not support."""
