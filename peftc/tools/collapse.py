"""Folding repeated structure: ``layer3.{0..5}.conv2 → +clr (6×)`` instead of six lines.

Backbones repeat blocks (``layer3.0`` … ``layer3.5``, ``blocks.0`` … ``blocks.11``), so a rewrite usually does
the same thing to each of them. Like OpenDelta's model visualisation, peftc folds items whose qualified names
differ in exactly one numeric path component and whose payloads are equal once that block's own prefix is
factored out (``layer3.2.conv2.clr`` and ``layer3.4.conv2.clr`` both read ``{}.conv2.clr`` relative to their
block). The innermost repeated index is tried first, then outer ones, so nothing folds across stages whose
blocks differ (their parameter counts differ). Used for diff changes, selector dry runs and inspections alike.
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

__all__ = ["Collapsed", "collapse", "index_set"]

T = TypeVar("T")


def index_set(indices: Iterable[int]) -> str:
    """``[0, 1, 2, 3]`` → ``{0..3}``; ``[0, 2, 4]`` → ``{0,2,4}``; ``[1, 2, 3, 5]`` → ``{1..3,5}``."""
    values = sorted(set(indices))
    parts: list[str] = []
    start = prev = None
    for v in [*values, None]:
        if start is not None and (v is None or v != prev + 1):
            if prev - start >= 2:
                parts.append(f"{start}..{prev}")
            else:
                parts.extend(str(i) for i in range(start, prev + 1))
            start = None
        if v is not None and start is None:
            start = v
        prev = v
    return "{" + ",".join(parts) + "}"


@dataclass(frozen=True)
class Collapsed(Generic[T]):
    """Items folded into one line: ``members`` differ only in the dotted component at ``position``."""

    members: tuple[T, ...]
    names: tuple[str, ...]
    position: int | None  # None: a single item, nothing folded

    @property
    def count(self) -> int:
        return len(self.members)

    @property
    def first(self) -> T:
        return self.members[0]

    @property
    def indices(self) -> tuple[int, ...]:
        if self.position is None:
            return ()
        return tuple(int(n.split(".")[self.position]) for n in self.names)

    @property
    def stem(self) -> str:
        """The first member's prefix up to and including the varying component (``layer3.0``)."""
        if self.position is None:
            return self.names[0]
        return ".".join(self.names[0].split(".")[: self.position + 1])

    @property
    def stem_pattern(self) -> str:
        if self.position is None:
            return self.names[0]
        parts = self.names[0].split(".")[: self.position + 1]
        parts[-1] = index_set(self.indices)
        return ".".join(parts)

    @property
    def pattern(self) -> str:
        """The folded name: ``layer3.{0..5}.conv2.clr``."""
        return self.expand(self.names[0])

    def expand(self, name: str) -> str:
        """Rewrite a name that belongs to the first member's block into the folded form."""
        if self.position is None or name is None:
            return name
        stem = self.stem
        if name == stem or name.startswith(stem + "."):
            return self.stem_pattern + name[len(stem) :]
        return name


def _relative(value: Any, stem: str) -> Any:
    if isinstance(value, str):
        if value == stem or value.startswith(stem + "."):
            return "{}" + value[len(stem) :]
        return value
    if isinstance(value, Mapping):
        return {k: _relative(v, stem) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_relative(v, stem) for v in value]
    return value


def _numeric_positions(name: str) -> list[int]:
    """Dotted positions holding an index (``layer3.0``, ``features.7``), innermost first."""
    parts = name.split(".")
    return [i for i in range(len(parts) - 1, -1, -1) if parts[i].isdigit()]


def collapse(items: Sequence[T], name: Callable[[T], str], payload: Callable[[T], Any]) -> list[Collapsed[T]]:
    """Group ``items`` into folds, in the order of each fold's first item.

    ``name(item)`` is the qualified name; ``payload(item)`` the JSON-able facts that must be equal (names
    inside it that lie under the item's block are compared relative to that block).
    """
    names = [name(item) for item in items]
    positions = [_numeric_positions(n) for n in names]
    pending = list(range(len(items)))
    folds: dict[int, Collapsed[T]] = {}
    level = 0
    while pending and any(level < len(positions[i]) for i in pending):
        buckets: dict[tuple[Any, ...], list[int]] = defaultdict(list)
        for i in pending:
            if level >= len(positions[i]):
                continue
            p = positions[i][level]
            parts = names[i].split(".")
            stem = ".".join(parts[: p + 1])
            key = (
                p,
                tuple(parts[:p]),
                tuple(parts[p + 1 :]),
                json.dumps(_relative(payload(items[i]), stem), sort_keys=True, default=str),
            )
            buckets[key].append(i)
        done: set[int] = set()
        for key, members in buckets.items():
            if len(members) < 2:
                continue
            p = key[0]
            folds[members[0]] = Collapsed(tuple(items[i] for i in members), tuple(names[i] for i in members), p)
            done.update(members)
        pending = [i for i in pending if i not in done]
        level += 1
    for i in pending:
        folds[i] = Collapsed((items[i],), (names[i],), None)
    return [folds[i] for i in sorted(folds)]
