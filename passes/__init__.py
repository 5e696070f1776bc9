"""Graph passes: peftc's generic primitives, declared here with their argument models (torch-free, so a spec
validates without torch) and applied in rule order by :mod:`peftc.compiler`; each pass module attaches its pass
(:func:`~peftc.language.primitives.primitive_pass`) when the compiler first runs it.

A method's own primitive lives in its room (``tie`` in :mod:`peftc.methods.replacement`, ``merge_tokens`` in
:mod:`peftc.methods.tome`) and is declared the same way. The compiler's state types resolve on first use.
"""

from __future__ import annotations

import importlib
from typing import Any

from peftc.language.primitives import declare_primitive
from peftc.passes.args import FreezeArgs, HeadArgs, InsertArgs, ParallelArgs, ReplaceArgs, StreamArgs, TrainArgs

_BUILDS = {"adds_params": True, "reads_shapes": True}  # a primitive that builds blocks from example shapes
declare_primitive("head", args=HeadArgs, home="peftc.passes.head", **_BUILDS)
declare_primitive("insert", args=InsertArgs, home="peftc.passes.insert", **_BUILDS)
declare_primitive("freeze", args=FreezeArgs, home="peftc.passes.ownership")
declare_primitive("train", args=TrainArgs, home="peftc.passes.ownership")
declare_primitive("stream", args=StreamArgs, home="peftc.passes.stream", **_BUILDS)
declare_primitive("parallel", args=ParallelArgs, home="peftc.passes.parallel", **_BUILDS)
declare_primitive("replace", args=ReplaceArgs, home="peftc.passes.replace", **_BUILDS)

_STATE = ("CompileState", "Ledger", "ModuleSlot", "PassContext", "Rewrite", "StreamInput", "TensorSlot")


def __getattr__(name: str) -> Any:
    if name not in _STATE:
        raise AttributeError(f"module 'peftc.passes' has no attribute {name!r}")
    value = getattr(importlib.import_module("peftc.passes.base"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_STATE})


__all__ = list(_STATE)
