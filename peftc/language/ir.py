"""The compiler's IR: a resolved :class:`MethodSpec` — params bound, includes merged, every rule validated."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from peftc.errors import Location
from peftc.language.recipe import Phase, TrainSection
from peftc.language.schema import FORMAT_VERSION, PairSection, ParamDecl

__all__ = ["MethodSpec", "Path_", "Rule", "locate"]

Path_ = tuple[str | int, ...]


@dataclass(frozen=True)
class Rule:
    """One applied primitive, its validated arguments and where it was written."""

    op: str
    args: Any  # the primitive's args model (FreezeArgs, InsertArgs, ...)
    label: str
    path: Path_  # ("rules", i, op) in the merged spec; MethodSpec.locate turns it into a file position
    part: str | None = None  # ``part:``: the part of a vision-language pair it rewrites (None: every part)

    def to_document(self) -> dict[str, Any]:
        body = self.args.model_dump(mode="json", by_alias=True, exclude_defaults=True)
        return {self.op: body, "label": self.label, **({"part": self.part} if self.part else {})}


@dataclass(frozen=True)
class MethodSpec:
    """A resolved spec: params bound, includes merged, inactive rules dropped, everything validated."""

    name: str
    summary: str
    references: tuple[str, ...]
    notes: str
    params: Mapping[str, ParamDecl]
    values: Mapping[str, Any]
    rules: tuple[Rule, ...]
    file: str | None = None
    positions: Mapping[Path_, Location] = field(default_factory=dict, repr=False, compare=False)
    train: TrainSection | None = None  # the training recipe (peftc.train); None = the trainer's defaults
    schedule: tuple[Phase, ...] = ()  # training phases (peftc.runtime.schedule applies them); empty = no schedule
    pair: PairSection | None = None  # how a vision-language pair runs it (peftc.pair); None: single models only

    def part(self, name: str) -> MethodSpec:
        """The spec as one part of a vision-language pair sees it: its rules without ``part:`` or of that part."""
        return replace(self, rules=tuple(r for r in self.rules if r.part in (None, name)))

    def locate(self, path: Path_) -> Location:
        """The source location of ``path`` inside this spec (longest known prefix)."""
        return locate(self.positions, path, self.file)

    def to_document(self) -> dict[str, Any]:
        """A self-contained document that loads back to an equal spec (what artifacts store)."""
        params = {
            name: {**decl.model_dump(mode="json", exclude_defaults=True), "default": self.values[name]}
            for name, decl in self.params.items()
        }
        doc = {
            "peftc": FORMAT_VERSION,
            "name": self.name,
            "summary": self.summary,
            "references": list(self.references),
            "notes": self.notes,
            "params": params,
            "rules": [rule.to_document() for rule in self.rules],
            **({"train": self.train.model_dump(mode="json", exclude_defaults=True)} if self.train else {}),
        }
        if self.pair is not None:
            doc["pair"] = self.pair.model_dump(mode="json", exclude_defaults=True)
        if self.schedule:
            doc["schedule"] = [
                p.model_dump(mode="json", by_alias=True, exclude_defaults=True) for p in self.schedule
            ]
        return doc


def locate(positions: Mapping[Path_, Location], path: Path_, file: str | None) -> Location:
    """The source position of ``path``: the longest prefix of it that was read from a file."""
    for cut in range(len(path), -1, -1):
        hit = positions.get(tuple(path[:cut]))
        if hit is not None:
            return Location(hit.file, hit.line, hit.col, (*hit.path, *path[cut:]))
    return Location(file, None, None, tuple(path))
