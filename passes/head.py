"""``head``: the classifier a task trains, following the backbone's own convention.

The backbone's classifier (role ``head``: the Linear or 1×1 conv layers nearest the output) is replaced by one
of the same kind with the spec's class count, or kept when nothing changes. A headless feature extractor
(``num_classes=0``, an ``Identity`` head: DINOv2, EVA, CLIP towers) has no such layer and returns one feature
vector per image; it gets a new Linear after those pooled features, sized by ``classes``.
"""

from __future__ import annotations

from functools import partial

from torch import fx, nn

from peftc.analysis.paths import fresh_path
from peftc.blocks import get_block
from peftc.blocks.args import LinearHeadArgs
from peftc.blocks.linear import head_widths, make_head
from peftc.language.primitives import primitive_pass
from peftc.passes.base import ModuleSlot, PassContext, count_params
from peftc.passes.replace import swap


@primitive_pass("head")
def head(ctx: PassContext) -> None:
    args = ctx.args
    default = "target" not in args.model_fields_set
    target = args.target.model_copy(update={"optional": True}) if default else args.target
    found = ctx.select(target, "target")
    if not found:
        _add_head(ctx)
        return
    for cand in found:
        old = cand.module
        if head_widths(old) is None:
            raise ctx.error(f"{cand.name!r} is a {type(old).__name__}; heads replace a Linear or 1×1 conv "
                            "classifier", "target")
        spec = LinearHeadArgs(classes=args.classes, bias=args.bias, init=args.init)
        new = get_block("linear").build(ctx.site(cand), spec)
        removed = 0 if new is old else swap(ctx, str(cand.node.target), new)
        _own(ctx, str(cand.node.target), new)
        ctx.record("head", cand.name, classes=head_widths(new)[1], params=count_params(new), removed=removed,
                   reused=new is old)


def _add_head(ctx: PassContext) -> None:
    """A new Linear after the pooled features of a model without a classifier."""
    args = ctx.args
    output = next(n for n in reversed(ctx.gm.graph.nodes) if n.op == "output")
    features = output.args[0]
    shape = ctx.state.shape_of(features) if isinstance(features, fx.Node) else None
    if shape is None or len(shape) != 2:
        what = f"a tensor of shape {tuple(shape)}" if shape is not None else "not one tensor"
        raise ctx.error(f"the model has no classifier (no Linear or 1×1 conv reads its last features) and its "
                        f"output is {what}, not one feature vector per image; name the layer to replace with "
                        "`target:`", "target")
    if args.classes is None:
        raise ctx.error(f"the model has no classifier: its output is {shape[1]}-dim pooled features (a headless "
                        "model, num_classes=0); give the number of classes (num_classes) to add a Linear head",
                        "classes")
    like = next(ctx.gm.parameters(), None)
    new = make_head(shape[1], args.classes, bias=args.bias, init="zeros" if args.init == "zeros" else "default",
                    like=None)
    if like is not None:
        new.to(device=like.device, dtype=like.dtype)
    path = fresh_path(ctx.gm, "head")
    ctx.gm.add_submodule(path, new)
    with ctx.gm.graph.inserting_before(output):
        node = ctx.gm.graph.call_module(path, (features,))
    output.replace_input_with(features, node)
    ctx.state.modules_changed()
    ctx.state.graph_changed()
    _own(ctx, path, new)
    ctx.record("head", path, classes=args.classes, params=count_params(new), removed=0, reused=False, new=True,
               module=path)


def _own(ctx: PassContext, path: str, new: nn.Module) -> None:
    """The head trains (unless the rule says not) and, per ``task_state``, each task gets its own."""
    for p in new.parameters():
        p.requires_grad_(ctx.args.trainable)
    if ctx.args.task_state != "shared":
        make = partial(_new_head, bias=ctx.args.bias, init=ctx.args.init)
        ctx.ledger.module_slots[path] = ModuleSlot(path, ctx.rule.label, ctx.args.task_state, make)


def _new_head(classes: int | None, template: nn.Module, *, bias: bool | None, init: str) -> nn.Module:
    """A head for a new task: the template's kind, shape and (``init: backbone``) weights unless ``classes`` differs."""
    features, own = head_widths(template) or (0, 0)
    return make_head(features, classes or own, bias=bias, init=init, like=template)
