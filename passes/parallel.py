"""``parallel``: a scaled bypass, ``to(x) + scale * block(src)``.

``src`` is the input (``read: input``, the default) or the output of the ``from`` node, which defaults to the
``to`` node itself — LoRA and Convpass read the input of the layer they bypass. When ``from`` is another node
(AdaptFormer reads the residual stream before ``norm2`` and adds to the MLP output), each ``to`` node pairs with
the one ``from`` node in the same repeated block. With ``stream: NAME`` the block also receives a second model
input, encoded once (:mod:`peftc.passes.stream`): ``to(x) + scale * block(src, stream)``.
"""

from __future__ import annotations

import operator

from torch import fx

from peftc.blocks import get_block
from peftc.language.primitives import primitive_pass
from peftc.passes.base import PassContext
from peftc.passes.stream import encoded_stream


def _source(ctx: PassContext, node: fx.Node, name: str) -> fx.Node:
    if ctx.args.read == "output":
        return node
    inputs = node.all_input_nodes
    if not inputs:
        raise ctx.error(f"{name!r} has no input to read", "read")
    return inputs[0]


@primitive_pass("parallel")
def parallel(ctx: PassContext) -> None:
    args = ctx.args
    targets = ctx.select(args.to, "to")
    pairs = {c.node: c for c in targets}
    if args.from_ is not None:
        sources = ctx.select(args.from_, "from")
        by_block = {}
        for src in sources:
            by_block.setdefault(src.block[:2] if src.block else None, []).append(src)
        for cand in targets:
            group = by_block.get(cand.block[:2] if cand.block else None, [])
            if len(group) != 1:
                raise ctx.error(
                    f"{cand.name!r} needs exactly one 'from' node in its block, found {len(group)}"
                    + (f" ({', '.join(c.name for c in group[:4])})" if group else ""), "from")
            pairs[cand.node] = group[0]
    suffix = args.name or get_block(args.block).suffix
    graph = ctx.gm.graph
    order = {n: i for i, n in enumerate(graph.nodes)}
    for cand in targets:
        reader = pairs[cand.node]
        src = _source(ctx, reader.node, reader.name)
        if order[src] > order[cand.node]:
            raise ctx.error(f"{reader.name!r} comes after {cand.name!r}: a bypass cannot read the future", "from")
        inputs = (src,) if args.stream is None else (src, encoded_stream(ctx, args.stream, reader))
        block = ctx.build_block(reader)
        path = ctx.module_path_for(cand, suffix)
        added = ctx.add_block(path, block)
        node = cand.node
        with graph.inserting_after(node):
            branch = graph.call_module(path, inputs)
            branch.meta.update(peftc_name=path, peftc_rule=ctx.rule.label)
            scaled = branch
            if args.scale != 1.0:
                with graph.inserting_after(branch):
                    scaled = graph.call_function(operator.mul, (branch, args.scale))
                    scaled.meta.update(peftc_name=f"{path}.scale", peftc_rule=ctx.rule.label)
            with graph.inserting_after(scaled):
                total = graph.call_function(operator.add, (node, scaled))
                total.meta.update(peftc_name=f"{path}.add", peftc_rule=ctx.rule.label)
        node.replace_all_uses_with(total, delete_user_cb=lambda user, total=total: user is not total)
        ctx.record("parallel", cand.name, block=args.block, module=path, reads=reader.name, port=args.read,
                   scale=args.scale, params=added, **({"stream": args.stream} if args.stream else {}))
    ctx.state.graph_changed(shapes_kept=True)  # layer + bypass has the layer's shape: no node's shape changed
