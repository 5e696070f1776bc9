"""Graph passes: peftc's generic primitives, each registered with its argument model in
:mod:`peftc.language.primitives` and applied in rule order by :mod:`peftc.compiler`.

A method's own primitive lives in its room (``tie`` in :mod:`peftc.methods.replacement`, ``merge_tokens`` in
:mod:`peftc.methods.tome`) and registers the same way.
"""

from __future__ import annotations

from peftc.passes import head, insert, ownership, parallel, replace, stream  # noqa: F401  (registration)
from peftc.passes.base import CompileState, Ledger, ModuleSlot, PassContext, Rewrite, StreamInput, TensorSlot

__all__ = ["CompileState", "Ledger", "ModuleSlot", "PassContext", "Rewrite", "StreamInput", "TensorSlot"]
