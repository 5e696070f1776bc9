"""Error translation: pydantic's validation errors → one :class:`SpecError` whose lines point into the YAML."""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import Any

from pydantic import BaseModel, ValidationError

from peftc.errors import Location, SpecError, did_you_mean
from peftc.language.ir import Path_, locate

__all__ = ["from_validation", "know_models"]


def from_validation(
    exc: ValidationError, prefix: Path_, positions: Mapping[Path_, Location], file: str | None, data: Any
) -> SpecError:
    """Turn pydantic errors into one SpecError whose lines each carry file:line:col and the spec path."""
    lines = []
    for err in exc.errors()[:5]:
        loc = _data_path(data, err["loc"])
        where = locate(positions, (*prefix, *loc), file)
        kind = err["type"]
        if kind == "extra_forbidden":
            key = str(loc[-1]) if loc else "?"
            model = _model_at(exc.title, loc)
            valid = _field_names(model) if model else []
            msg = f"unknown key {key!r}" + did_you_mean(key, valid)
            if valid and not did_you_mean(key, valid):
                msg += f"; valid keys: {', '.join(valid)}"
        elif kind == "missing":
            msg = "missing required key"
        else:
            msg = err["msg"].removeprefix("Value error, ")
            if "input" in err and kind not in ("value_error", "assertion_error"):
                msg += f", got {err['input']!r}"
            if kind == "literal_error" and isinstance(err.get("input"), str):
                choices = re.findall(r"'([^']*)'", err["msg"])
                msg += did_you_mean(err["input"], choices)
        lines.append(f"{where}: {msg}")
    if len(exc.errors()) > 5:
        lines.append(f"... and {len(exc.errors()) - 5} more errors")
    return SpecError("\n".join(lines))


def _data_path(data: Any, loc: tuple[Any, ...]) -> Path_:
    """Keep only the parts of a pydantic loc that index real data (drop union-branch tags like 'str')."""
    out: list[str | int] = []
    node = data
    for part in loc:
        if (isinstance(node, dict) and part in node) or (
            isinstance(node, list) and isinstance(part, int) and part < len(node)
        ):
            out.append(part)
            node = node[part]
        elif isinstance(node, dict) and isinstance(part, str) and part not in _UNION_TAGS:
            out.append(part)  # an unknown or missing key
            node = None
    return tuple(out)


_UNION_TAGS = {"str", "list[str]", "int", "list[int]", "Selector", "function-after", "none"}
_MODELS_BY_TITLE: dict[str, type[BaseModel]] = {}


def _model_at(title: str, loc: Path_) -> type[BaseModel] | None:
    """The pydantic model that owns the last key of ``loc`` (to list its valid keys)."""
    model = _MODELS_BY_TITLE.get(title)
    for part in loc[:-1]:
        if model is None or not isinstance(part, str):
            continue
        field_info = model.model_fields.get(part) or next(
            (f for f in model.model_fields.values() if f.alias == part), None
        )
        if field_info is None:
            return None
        model = _nested_model(field_info.annotation)
    return model


def _nested_model(annotation: Any) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in getattr(annotation, "__args__", ()) or ():
        found = _nested_model(arg)
        if found is not None:
            return found
    return None


def _field_names(model: type[BaseModel]) -> list[str]:
    return [info.alias or name for name, info in model.model_fields.items()]


def know_models(models: Iterable[type[BaseModel]]) -> None:
    """Make ``models`` known by title, so an unknown key inside them lists their valid keys."""
    for model in models:
        _MODELS_BY_TITLE.setdefault(model.__name__, model)
