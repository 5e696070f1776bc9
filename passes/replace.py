"""``replace`` and ``head``: a new module in place of a selected one, built from the original."""

from __future__ import annotations

from functools import partial
from typing import Literal

from pydantic import Field
from torch import nn

from peftc.blocks import Block, get_block
from peftc.blocks.linear import LinearHeadArgs, make_head
from peftc.language.primitives import register_primitive
from peftc.language.schema import MAX_CLASSES, BlockRuleArgs, RuleArgs, Selector, TaskState
from peftc.passes.base import ModuleSlot, PassContext, count_params


class ReplaceArgs(BlockRuleArgs):
    """Put ``block``, built from the original module, in place of each selected node."""

    target: Selector


class HeadArgs(RuleArgs):
    """A classification head in place of the backbone's (role ``head`` unless ``target`` says otherwise)."""

    target: Selector = Field(default_factory=lambda: Selector(role="head"))
    classes: int | None = Field(default=None, ge=1, le=MAX_CLASSES)
    bias: bool = True
    init: Literal["backbone", "default", "zeros"] = "backbone"
    task_state: TaskState = "new"
    trainable: bool = True



def _swap(ctx: PassContext, path: str, new: nn.Module) -> int:
    """Put ``new`` at ``path``; returns how many of the old module's parameters are gone from the model."""
    old = ctx.gm.get_submodule(path)
    ctx.gm.set_submodule(path, new)
    kept = {id(p) for p in new.parameters()}
    ctx.state.modules_changed()
    return sum(p.numel() for p in old.parameters() if id(p) not in kept)


@register_primitive("replace", args=ReplaceArgs, adds_params=True, reads_shapes=True)
def replace(ctx: PassContext) -> None:
    for cand in ctx.select(ctx.args.target, "target"):
        if cand.node.op != "call_module":
            raise ctx.error(f"{cand.name!r} is an operation, not a module; only modules can be replaced", "target")
        block = ctx.build_block(cand)
        path = str(cand.node.target)
        # Tensors the block takes over from the original (or from the model) are borrowed unless the block
        # says it *is* that module now (``reused = "owned"``): borrowed ones keep their flag and their owner.
        reused = _model_tensors(ctx, block)
        removed = _swap(ctx, path, block)
        ctx.ledger.inserted[path] = ctx.rule.label
        borrowed = reused if not isinstance(block, Block) or block.reused == "borrowed" else set()
        for p in block.parameters():
            if id(p) not in reused:
                p.requires_grad_(ctx.args.trainable)
        ctx.own(path, block, skip=borrowed)
        ctx.state.modules_changed()
        added = sum(p.numel() for p in block.parameters() if id(p) not in reused)
        ctx.record("replace", cand.name, block=ctx.args.block, module=path, params=added, removed=removed)


@register_primitive("head", args=HeadArgs, adds_params=True, reads_shapes=True)
def head(ctx: PassContext) -> None:
    args = ctx.args
    for cand in ctx.select(args.target, "target"):
        old = cand.module
        if not isinstance(old, nn.Linear):
            raise ctx.error(f"{cand.name!r} is a {type(old).__name__}; heads replace a Linear classifier", "target")
        spec = LinearHeadArgs(classes=args.classes, bias=args.bias, init=args.init)
        new = get_block("linear").build(ctx.site(cand), spec)
        removed = 0 if new is old else _swap(ctx, str(cand.node.target), new)
        for p in new.parameters():
            p.requires_grad_(args.trainable)
        path = str(cand.node.target)
        if args.task_state != "shared":
            make = partial(_new_head, bias=args.bias, init=args.init)
            ctx.ledger.module_slots[path] = ModuleSlot(path, ctx.rule.label, args.task_state, make)
        ctx.record("head", cand.name, classes=new.out_features, params=count_params(new), removed=removed,
                   reused=new is old)


def _new_head(classes: int | None, template: nn.Module, *, bias: bool, init: str) -> nn.Linear:
    """A head for a new task: the template's shape and (``init: backbone``) weights unless ``classes`` differs."""
    assert isinstance(template, nn.Linear)
    return make_head(template.in_features, classes or template.out_features, bias=bias, init=init, like=template)


def _model_tensors(ctx: PassContext, block: nn.Module) -> set[int]:
    """Ids of ``block``'s tensors the model already holds (the replaced module's own, or shared across sites)."""
    known = ctx.state.tensors()
    return {id(t) for t in (*block.parameters(), *block.buffers()) if id(t) in known}
