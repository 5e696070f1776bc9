"""``stream``: a second model input, encoded once, that later rules feed to their blocks (two-stream graphs).

A backbone's graph has one input. A ``stream`` rule adds another, named (``memory``), of shape
``(batch, tokens, features)`` — visual features for a language model, say — and names the block that encodes
it. The encoder is built when the first rule reads the stream (``parallel: {stream: memory}``), at that rule's
site, so it learns the width the readers work at; it runs once per forward, right after the inputs, and its
output goes to every reading block as a second argument. The compiled model checks the input before the graph
runs (:class:`~peftc.passes.base.StreamInput`), and export declares it as a second graph input.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import fx

from peftc.analysis.index import Candidate
from peftc.analysis.paths import fresh_path
from peftc.blocks import get_block
from peftc.language import Rule
from peftc.language.primitives import primitive_pass
from peftc.passes.base import PassContext, StreamInput

__all__ = ["encoded_stream"]


@dataclass(frozen=True)
class _Declared:
    """A stream whose encoder waits for its first reader."""

    rule: Rule
    placeholder: fx.Node


@primitive_pass("stream")
def stream(ctx: PassContext) -> None:
    args = ctx.args
    graph = ctx.gm.graph
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    if any(n.target == args.input for n in placeholders):
        raise ctx.error(f"the model already has an input named {args.input!r}", "input")
    with graph.inserting_after(placeholders[-1]):
        node = graph.placeholder(args.input, default_value=None)  # after inputs that have defaults
    declared = StreamInput(args.input, ctx.rule.label, args.features, args.max_tokens)
    node.meta.update(peftc_name=args.input, peftc_rule=ctx.rule.label, peftc_example=declared.example_shape)
    ctx.ledger.streams[args.input] = declared
    ctx.state.streams[args.input] = _Declared(ctx.rule, node)
    ctx.record("stream", args.input, block=args.block, features=args.features, max_tokens=args.max_tokens)
    ctx.state.graph_changed(shapes_kept=True)


def encoded_stream(reader: PassContext, name: str, site: Candidate) -> fx.Node:
    """The node holding stream ``name`` encoded; the encoder is built at ``site`` when first asked for."""
    state = reader.state
    found = state.streams.get(name)
    if found is None:
        known = f"; the streams are {', '.join(sorted(state.streams))}" if state.streams else ""
        raise reader.error(f"no earlier 'stream' rule adds an input named {name!r}{known}", "stream")
    if isinstance(found, fx.Node):
        return found
    ctx = PassContext(state, found.rule)
    args = ctx.args
    encoder = ctx.build_block(site, features=args.features, max_tokens=args.max_tokens)
    path = fresh_path(state.gm, f"{name}_{args.name or get_block(args.block).suffix}")
    added = ctx.add_block(path, encoder)
    graph = state.gm.graph
    with graph.inserting_after(found.placeholder):
        node = graph.call_module(path, (found.placeholder,))
    node.meta.update(peftc_name=path, peftc_rule=found.rule.label)
    state.streams[name] = node
    ctx.record("stream", path, block=args.block, module=path, encodes=name, width_from=site.name, params=added)
    state.graph_changed(shapes_kept=True)
    return node
