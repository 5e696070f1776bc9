"""``freeze`` and ``train``: who learns. Neither touches the graph; both change tensor ownership."""

from __future__ import annotations

from peftc.language.primitives import primitive_pass
from peftc.passes.base import PassContext, own_tensors


def _targets(ctx: PassContext):
    """The selected candidates, or every node when the rule gives no selector keys (``freeze: {}``)."""
    args = ctx.args
    if any(v is not None for v in (args.name, args.type, args.role, args.where, args.blocks)):
        return ctx.select(args)
    return list(ctx.state.index)


@primitive_pass("freeze")
def freeze(ctx: PassContext) -> None:
    """Stop gradients; with ``buffers: true`` (default) running statistics stop updating too."""
    args = ctx.args
    for cand in _targets(ctx):
        touched = 0
        for name, kind, tensor in own_tensors(cand, ctx.ledger, args.params):
            if kind == "param":
                if tensor.requires_grad:
                    touched += tensor.numel()
                tensor.requires_grad_(False)
            elif args.buffers:
                ctx.ledger.updating_buffers.discard(name)
        if touched:
            ctx.record("freeze", cand.name, params=touched)


@primitive_pass("train")
def train(ctx: PassContext) -> None:
    """Make parameters trainable; ``buffers: true`` lets running stats update; ``task_state`` makes them per task."""
    args = ctx.args
    matched = 0
    for cand in _targets(ctx):
        params = buffers = 0
        for name, kind, tensor in own_tensors(cand, ctx.ledger, args.params):
            if kind == "param":
                tensor.requires_grad_(True)
                ctx.own_tensor(name, True)
                params += tensor.numel()
            elif args.buffers:
                ctx.ledger.updating_buffers.add(name)
                ctx.own_tensor(name, False)  # num_batches_tracked too: BN with momentum=None averages by it
                buffers += tensor.numel() if tensor.is_floating_point() else 0  # counters are not statistics
        if params or buffers:
            matched += 1
            ctx.record("train", cand.name, params=params, buffers=buffers, task_state=args.task_state)
    if not matched and not args.optional:
        raise ctx.error(f"the selected nodes have no tensors named {args.params!r} to train", "params")
