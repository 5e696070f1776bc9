"""``insert``: a block on the data path, right after or right before each selected node."""

from __future__ import annotations

from peftc.blocks import get_block
from peftc.language.primitives import primitive_pass
from peftc.passes.base import PassContext


@primitive_pass("insert")
def insert(ctx: PassContext) -> None:
    args = ctx.args
    side = "after" if args.after is not None else "before"
    suffix = args.name or get_block(args.block).suffix
    graph = ctx.gm.graph
    for cand in ctx.select(getattr(args, side), side):
        node = cand.node
        if side == "before" and not node.all_input_nodes:
            raise ctx.error(f"{cand.name!r} has no input to insert before", side)
        block = ctx.build_block(cand)
        path = ctx.module_path_for(cand, suffix)
        added = ctx.add_block(path, block)
        if side == "after":
            with graph.inserting_after(node):
                new = graph.call_module(path, (node,))
            node.replace_all_uses_with(new, delete_user_cb=lambda user, new=new: user is not new)
        else:
            source = node.all_input_nodes[0]
            with graph.inserting_before(node):
                new = graph.call_module(path, (source,))
            node.replace_input_with(source, new)
        new.meta.update(peftc_name=path, peftc_rule=ctx.rule.label)
        ctx.record("insert", cand.name, side=side, block=args.block, module=path, params=added)
    ctx.state.graph_changed()
