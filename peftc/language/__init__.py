"""The language: spec schema, recipe schema, IR, loader, predicates, error translation, the primitive registry.

The names below resolve on first use (PEP 562), so ``from peftc.language import builtin_specs`` reads the spec
catalog without importing the loader, which validates block arguments against the block registry (and torch).
"""

from __future__ import annotations

import importlib
from typing import Any

# public name -> module that defines it
_NAMES = {
    "builtin_specs": "catalog", "iter_builtin_summaries": "catalog",
    "MethodSpec": "ir", "Rule": "ir",
    "load_spec": "loader", "parse_overrides": "loader",
    "Primitive": "primitives", "get_primitive": "primitives", "primitive_names": "primitives",
    "register_primitive": "primitives",
    "OnlineArgs": "recipe", "OptimizerArgs": "recipe", "Phase": "recipe", "ReplayArgs": "recipe",
    "SchedulerArgs": "recipe", "StageDecl": "recipe", "TrainSection": "recipe",
    "BlockRuleArgs": "schema", "ParamDecl": "schema", "RuleArgs": "schema", "Selector": "schema",
    "TaskState": "schema", "TensorArgs": "schema",
}


def __getattr__(name: str) -> Any:
    if name not in _NAMES:
        raise AttributeError(f"module 'peftc.language' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"peftc.language.{_NAMES[name]}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_NAMES})


__all__ = sorted(_NAMES)
