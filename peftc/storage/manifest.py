"""The manifest schema: ``peftc.json`` is checked whole before anything reads a field of it.

An artifact may come from another machine, an older peftc, or a careless edit. Every reader (load, export,
diff, train, eval, compose) goes through :func:`read_manifest`, so a missing key, a wrong type, an absurd
number (``seed: 10**30``, ``classes: 10**12``), an active task that is not listed or a document nested
100,000 deep is one :class:`~peftc.errors.ArtifactError` naming the file and the key — never a traceback
somewhere downstream. Unknown keys are ignored (a newer peftc may add some).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from peftc.errors import ArtifactError
from peftc.language.messages import from_validation
from peftc.language.schema import MAX_CLASSES
from peftc.storage.atomic import recover

__all__ = ["DELTA", "FORMAT", "MANIFEST", "MAX_BYTES", "MAX_DEPTH", "Manifest", "read_manifest"]

MANIFEST = "peftc.json"
DELTA = "delta.safetensors"
FORMAT = 1
MAX_BYTES = 64 << 20
MAX_DEPTH = 64

_Name = Annotated[str, Field(min_length=1, max_length=255, pattern=r"^[^/]+$")]
_Count = Annotated[int, Field(ge=0, le=10**9)]


class _Part(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)


class BackboneEntry(_Part):
    id: Annotated[str, Field(min_length=1, max_length=1000)]
    source: Literal["random", "pretrained", "weights", "module"]
    seed: Annotated[int, Field(ge=-(2**63), lt=2**64)] | None = None
    weights_file: str | None = None
    input_size: tuple[Annotated[int, Field(ge=1, le=1 << 16)], ...] = Field(min_length=3, max_length=3)
    hash: Annotated[str, Field(pattern=r"^[0-9a-f]{8,128}$")]
    kwargs: list[tuple[str, Any]] = []

    @field_validator("input_size", mode="before")
    @classmethod
    def _json_tuple(cls, value: Any) -> Any:
        return tuple(value) if isinstance(value, list) else value  # JSON has arrays, not tuples

    @field_validator("kwargs", mode="before")
    @classmethod
    def _json_pairs(cls, value: Any) -> Any:
        return [tuple(p) if isinstance(p, list) else p for p in value] if isinstance(value, list) else value


class TaskEntry(_Part):
    name: _Name
    classes: Annotated[int, Field(ge=1, le=MAX_CLASSES)] | None = None


class DeltaEntry(_Part):
    file: Literal["delta.safetensors"]
    sha256: Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]
    tensors: _Count
    quantized: dict[str, dict[str, Any]] | None = None


class Manifest(_Part):
    format: Literal[1]
    peftc: str
    spec: dict[str, Any]
    params: dict[str, Any] = {}
    backbone: BackboneEntry
    tasks: list[TaskEntry] = Field(min_length=1, max_length=100_000)
    active_task: _Name
    delta: DeltaEntry
    report: dict[str, Any] = {}

    @model_validator(mode="after")
    def _tasks_agree(self) -> Manifest:
        names = [t.name for t in self.tasks]
        if len(set(names)) != len(names):
            raise ValueError(f"tasks repeat a name: {sorted({n for n in names if names.count(n) > 1})}")
        if self.active_task not in names:
            raise ValueError(f"active_task {self.active_task!r} is not one of the tasks {names}")
        return self


def read_manifest(directory: str | Path) -> dict[str, Any]:
    """The checked manifest of the artifact in ``directory``, as plain data (tuples where the schema says so)."""
    path = Path(directory)
    recover(path)
    if not path.is_dir():
        raise ArtifactError(f"artifact directory not found: {path}")
    file = path / MANIFEST
    if not file.is_file():
        raise ArtifactError(f"{path} is not a peftc artifact (no {MANIFEST})")
    try:
        with file.open("rb") as handle:
            raw = handle.read(MAX_BYTES + 1)
    except OSError as exc:
        raise ArtifactError(f"cannot read {file}: {exc.strerror or exc}") from None
    if len(raw) > MAX_BYTES:
        raise ArtifactError(f"{file}: larger than {MAX_BYTES:,} bytes; not a manifest peftc wrote")
    try:
        data = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ArtifactError(f"{file} is not valid JSON: {exc}") from None
    except RecursionError:
        data = None
    if data is None or _depth(data) > MAX_DEPTH:
        raise ArtifactError(f"{file}: nests deeper than {MAX_DEPTH} levels; not a manifest peftc wrote")
    if not isinstance(data, dict):
        raise ArtifactError(f"{file}: expected a JSON object, got {type(data).__name__}")
    if data.get("format") != FORMAT:
        raise ArtifactError(f"{file}: unsupported artifact format {data.get('format')!r} (this peftc reads {FORMAT})")
    try:
        checked = Manifest.model_validate(data)
    except ValidationError as exc:
        raise ArtifactError(str(from_validation(exc, (), {}, str(file), data))) from None
    return {**data, **checked.model_dump()}


def _depth(data: Any) -> int:
    """Nesting depth of decoded JSON, without recursion."""
    deepest, stack = 0, [(data, 1)]
    while stack:
        value, depth = stack.pop()
        deepest = max(deepest, depth)
        if depth > MAX_DEPTH:
            break
        children = value.values() if isinstance(value, dict) else value if isinstance(value, list) else ()
        stack.extend((child, depth + 1) for child in children)
    return deepest
