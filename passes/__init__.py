"""Graph passes: one function per spec primitive, applied in rule order by :mod:`peftc.compiler`."""

from __future__ import annotations

from collections.abc import Callable

from .base import CompileState, Ledger, ModuleSlot, PassContext, Rewrite, TensorSlot
from .insert import insert
from .merge_tokens import merge_tokens
from .ownership import freeze, train
from .parallel import parallel
from .replace import head, replace
from .tie import tie

PASSES: dict[str, Callable[[PassContext], None]] = {
    "freeze": freeze,
    "train": train,
    "insert": insert,
    "parallel": parallel,
    "replace": replace,
    "head": head,
    "merge_tokens": merge_tokens,
    "tie": tie,
}

__all__ = ["PASSES", "CompileState", "Ledger", "ModuleSlot", "PassContext", "Rewrite", "TensorSlot"]
