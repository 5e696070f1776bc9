"""``replace``: a new module in place of a selected one, built from the original."""

from __future__ import annotations

from torch import nn

from peftc.blocks import Block
from peftc.language.primitives import primitive_pass
from peftc.passes.base import PassContext


def swap(ctx: PassContext, path: str, new: nn.Module) -> int:
    """Put ``new`` at ``path``; returns how many of the old module's parameters are gone from the model."""
    old = ctx.gm.get_submodule(path)
    ctx.gm.set_submodule(path, new)
    kept = {id(p) for p in new.parameters()}
    ctx.state.modules_changed(added=new)
    return sum(p.numel() for p in old.parameters() if id(p) not in kept)


@primitive_pass("replace")
def replace(ctx: PassContext) -> None:
    for cand in ctx.select(ctx.args.target, "target"):
        if cand.node.op != "call_module":
            raise ctx.error(f"{cand.name!r} is an operation, not a module; only modules can be replaced", "target")
        block = ctx.build_block(cand)
        path = str(cand.node.target)
        # Tensors the block takes over from the original (or from the model) are borrowed unless the block
        # says it *is* that module now (``reused = "owned"``): borrowed ones keep their flag and their owner.
        reused = _model_tensors(ctx, block)
        removed = swap(ctx, path, block)
        ctx.ledger.inserted[path] = ctx.rule.label
        borrowed = reused if not isinstance(block, Block) or block.reused == "borrowed" else set()
        for p in block.parameters():
            if id(p) not in reused:
                p.requires_grad_(ctx.args.trainable)
        ctx.own(path, block, skip=borrowed)
        added = sum(p.numel() for p in block.parameters() if id(p) not in reused)
        ctx.record("replace", cand.name, block=ctx.args.block, module=path, params=added, removed=removed)


def _model_tensors(ctx: PassContext, block: nn.Module) -> set[int]:
    """Ids of ``block``'s tensors the model already holds (the replaced module's own, or shared across sites)."""
    known = ctx.state.tensors()
    return {id(t) for t in (*block.parameters(), *block.buffers()) if id(t) in known}
