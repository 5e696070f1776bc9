"""``merge_tokens``: token merging (ToMe) as a rewrite of a stock ViT's graph — no class is patched.

For every selected attention residual add (role ``attn_residual``: the residual stream between a block's
attention and its MLP) the pass inserts a :class:`~peftc.methods.tome.tome.TokenMerge` node, reading the block's
keys straight from its attention (the second input of ``scaled_dot_product_attention``, or the ``k`` of
``q @ k.transpose(-2, -1)`` in a non-fused attention). Three values flow through the graph alongside the
tokens:

* ``size`` — starts as ones right before the first merging block (``initial_size``), each merge updates it;
* ``bias`` — ``log(size)``, the proportional-attention bias, None until a merge has happened; every attention
  after the first merging block receives it: as SDPA's float ``attn_mask`` (through ``attention_mask``, so the
  fused kernel stays in use) or, in a non-fused attention, added to the logits right before the softmax;
* ``x`` — the merged tokens, which every later reader of the residual stream (norm2, the MLP residual add)
  now reads.

Which tokens are protected (never merged: cls, DeiT's distillation token, register tokens) is found from the
graph: the learned tokens that the embedding ``cat`` puts in front of the patch tokens. ``protect:`` overrides.
"""

from __future__ import annotations

import operator

import torch
import torch.nn.functional as F
from torch import fx

from peftc.analysis.paths import fresh_path
from peftc.analysis.roles import Sublayer, transformer_layout
from peftc.errors import PeftcError
from peftc.language.primitives import primitive_pass
from peftc.methods.tome.tome import (
    TokenMerge,
    add_attention_bias,
    attention_mask,
    initial_size,
    merge_schedule,
)
from peftc.passes.base import PassContext

__all__ = ["merge_tokens"]


_MATMULS = (operator.matmul, torch.matmul, torch.bmm)


class _Attention:
    """Where one attention sublayer computes attention: its keys, and where the size bias goes in."""

    def __init__(self, node: fx.Node, keys: fx.Node, fused: bool):
        self.node = node  # the SDPA call, or the softmax of a non-fused attention
        self.keys = keys
        self.fused = fused


def _body(sub: Sublayer, order: dict[fx.Node, int]) -> list[fx.Node]:
    """The nodes between the sublayer's skip and its output, in graph order."""
    floor = order[sub.skip]
    seen: set[fx.Node] = set()
    frontier = [sub.out]
    while frontier:
        node = frontier.pop()
        if node in seen or order[node] <= floor:
            continue
        seen.add(node)
        frontier.extend(node.all_input_nodes)
    return sorted(seen, key=order.__getitem__)


def _is_softmax(node: fx.Node) -> bool:
    if node.op == "call_method":
        return node.target == "softmax"
    return node.op == "call_function" and node.target in (F.softmax, torch.softmax)


def _is_matmul(node: fx.Node) -> bool:
    return (node.op == "call_function" and node.target in _MATMULS) or (
        node.op == "call_method" and node.target in ("matmul", "__matmul__"))


def _keys_of_logits(logits: fx.Node, body: set[fx.Node]) -> fx.Node | None:
    """``k`` of the nearest ``q @ k.transpose(-2, -1)`` upstream of the softmax input (timm's non-fused path,
    which may add a mask in between)."""
    queue, seen = [logits], set()
    while queue:
        node = queue.pop(0)
        if node in seen or node not in body:
            continue
        seen.add(node)
        if _is_matmul(node) and len(node.args) >= 2 and isinstance(node.args[1], fx.Node):
            kt = node.args[1]
            if kt.op == "call_method" and kt.target in ("transpose", "mT") and isinstance(kt.args[0], fx.Node):
                return kt.args[0]
        queue.extend(node.all_input_nodes)
    return None


def _attention(ctx: PassContext, sub: Sublayer, order: dict[fx.Node, int], name: str) -> _Attention:
    body = _body(sub, order)
    sdpa = [n for n in body if n.op == "call_function" and n.target is F.scaled_dot_product_attention]
    if len(sdpa) == 1:
        node = sdpa[0]
        keys = node.args[1] if len(node.args) > 1 else node.kwargs.get("key")
        if not isinstance(keys, fx.Node):
            raise ctx.error(f"cannot find the keys of the attention in {name!r}", "target")
        is_causal = node.kwargs.get("is_causal", node.args[5] if len(node.args) > 5 else False)
        if is_causal is not False:
            raise ctx.error(f"the attention in {name!r} is causal; token merging needs bidirectional attention",
                            "target")
        return _Attention(node, keys, fused=True)
    softmax = [n for n in body if _is_softmax(n)]
    if not sdpa and len(softmax) == 1:
        logits = softmax[0].args[0]
        keys = _keys_of_logits(logits, set(body)) if isinstance(logits, fx.Node) else None
        if keys is not None:
            return _Attention(softmax[0], keys, fused=False)
    raise ctx.error(
        f"cannot find one attention computation with visible keys in {name!r} (expected a single "
        "scaled_dot_product_attention, or q @ k.transpose(-2, -1) → softmax)", "target")


def _positional_term(ctx: PassContext, sub: Sublayer, site: _Attention, order: dict[fx.Node, int],
                     from_image: set[fx.Node]) -> str | None:
    """A tensor tied to token positions entering this attention: a relative-position bias (BEiT, Swin) or
    rotary angles (EVA). Found by structure: inside the sublayer, a tensor made from parameters, buffers and
    constants only (not from the image) joins the computation of the attention, and one of its dims counts the
    tokens. Merged tokens have no single position, so such a term cannot follow them."""
    tokens = ctx.state.shape_of(sub.skip)
    if tokens is None or len(tokens) < 3:
        return None
    count = int(tokens[-2])
    body = set(_body(sub, order))
    frontier, seen = [site.node], set()
    while frontier:
        node = frontier.pop()
        if node in seen or node not in body:
            continue
        seen.add(node)
        for inp in node.all_input_nodes:
            if inp in from_image:
                frontier.append(inp)
                continue
            shape = ctx.state.shape_of(inp)
            if shape is not None and any(count - 16 <= int(d) <= count and d > 1 for d in shape):
                return f"{_name(inp)!r} of shape {tuple(shape)}"
    return None


def _from_image(graph: fx.Graph) -> set[fx.Node]:
    """Every node that depends on the model's input."""
    out: set[fx.Node] = set()
    for node in graph.nodes:
        if node.op == "placeholder" or any(i in out for i in node.all_input_nodes):
            out.add(node)
    return out


def _main_input(node: fx.Node) -> fx.Node | None:
    first = node.args[0] if node.args else None
    return first if isinstance(first, fx.Node) else None


def _is_learned(node: fx.Node) -> bool:
    """True when ``node``'s data comes from a parameter (``cls_token.expand(B, -1, -1)``), not the image."""
    current: fx.Node | None = node
    while current is not None:
        if current.op == "get_attr":
            return True
        if current.op == "placeholder":
            return False
        current = _main_input(current)
    return False


def _learned_shape(ctx: PassContext, node: fx.Node) -> tuple[int, ...] | None:
    """Shape of a learned token block: the tensor's own shape when it is only expanded, else by propagation."""
    current = node
    while current.op == "call_method" and current.target == "expand" and isinstance(current.args[0], fx.Node):
        current = current.args[0]
    if current.op == "get_attr":
        tensor = ctx.gm
        for part in str(current.target).split("."):
            tensor = getattr(tensor, part, None)
        if isinstance(tensor, torch.Tensor) and tensor.dim() == 3:
            return tuple(tensor.shape)
    shape = ctx.state.shape_of(node)
    return tuple(shape) if shape is not None else None


def _prefix_tokens(ctx: PassContext, first: Sublayer, order: dict[fx.Node, int]) -> int:
    """How many learned tokens the embedding puts before the patch tokens (0 when it concatenates none)."""
    cats: list[fx.Node] = []
    frontier, seen = [first.skip], set()
    while frontier:
        node = frontier.pop()
        if node in seen:
            continue
        seen.add(node)
        if node.op == "call_function" and node.target is torch.cat:
            dim = node.kwargs.get("dim", node.args[1] if len(node.args) > 1 else 0)
            if dim == 1 and isinstance(node.args[0], (list, tuple)):
                cats.append(node)
        frontier.extend(node.all_input_nodes)
    if not cats:
        return 0
    cat = max(cats, key=order.__getitem__)  # the one nearest the first block
    count = 0
    for part in cat.args[0]:
        if not isinstance(part, fx.Node) or not _is_learned(part):
            break
        shape = _learned_shape(ctx, part)
        if shape is None or len(shape) != 3:
            raise ctx.error(f"cannot tell how many tokens {part.meta.get('peftc_name', part.name)!r} adds; "
                            "give merge_tokens a 'protect' count", "protect")
        count += int(shape[1])
    return count


def _module_path(ctx: PassContext, add_name: str, suffix: str) -> str:
    parent = add_name.rpartition(".")[0]
    base = f"{parent}.{suffix}" if parent else f"{add_name.replace('.', '_')}_{suffix}"
    return fresh_path(ctx.gm, base)


def _name(node: fx.Node) -> str:
    return str(node.meta.get("peftc_name", node.name))


def _make(graph: fx.Graph, op: str, target: object, args: tuple, name: str, rule: str) -> fx.Node:
    """A new node whose Python name follows its qualified name (``blocks_0_tome_size``), tagged with the rule."""
    node = graph.create_node(op, target, args, name=name.replace(".", "_"))
    node.meta.update(peftc_name=name, peftc_rule=rule)
    return node


def _feed_bias(graph: fx.Graph, site: _Attention, bias: fx.Node, rule: str, name: str) -> None:
    """Route the size bias into one attention: SDPA's ``attn_mask``, or the logits before the softmax."""
    node = site.node
    if site.fused:
        query = node.args[0] if node.args else node.kwargs["query"]
        existing = node.kwargs.get("attn_mask", node.args[3] if len(node.args) > 3 else None)
        with graph.inserting_before(node):
            extra = (existing,) if isinstance(existing, fx.Node) else ()
            mask = _make(graph, "call_function", attention_mask, (query, bias, *extra), f"{name}.tome_mask", rule)
        if len(node.args) > 3:
            node.args = (*node.args[:3], mask, *node.args[4:])
        else:
            node.kwargs = {**node.kwargs, "attn_mask": mask}
    else:
        logits = node.args[0]
        with graph.inserting_before(node):
            biased = _make(graph, "call_function", add_attention_bias, (logits, bias), f"{name}.tome_bias", rule)
        node.replace_input_with(logits, biased)


@primitive_pass("merge_tokens")
def merge_tokens(ctx: PassContext) -> None:
    args = ctx.args
    gm, graph, rule = ctx.gm, ctx.gm.graph, ctx.rule.label
    if any(isinstance(m, TokenMerge) for m in gm.modules()):
        raise ctx.error("this model already merges tokens; a spec may have only one merge_tokens rule")
    layout = transformer_layout(gm)
    by_add = {s.add: s for s in layout.attn}
    picked: list[tuple[str, Sublayer]] = []
    for cand in ctx.select(args.target, "target"):
        sub = by_add.get(cand.node)
        if sub is None:
            reshaped = cand.node in {s.skip for s in layout.mlp} and layout.attn
            why = (" (the model reshapes its stream between attention and MLP: attention over windows of a token "
                   "grid, as in Swin, not one global token sequence)") if reshaped else ""
            raise ctx.error(f"{cand.name!r} is not the residual add after an attention sublayer{why}; merge_tokens "
                            "merges there (role attn_residual)", "target")
        picked.append((cand.name, sub))
    if not picked:
        return
    try:
        schedule = merge_schedule(len(picked), args.r, args.inflection)
    except PeftcError as exc:
        raise ctx.error(exc.message, "r") from None
    order = {n: i for i, n in enumerate(graph.nodes)}
    protected = args.protect if args.protect is not None else _prefix_tokens(ctx, layout.attn[0], order)
    merge_at = {sub.add: (name, r) for (name, sub), r in zip(picked, schedule)}
    first = picked[0][1]
    start = next(i for i, s in enumerate(layout.attn) if s is first)
    later = layout.attn[start:]  # every attention from the first merging block on receives the size bias
    sites = {sub.add: _attention(ctx, sub, order, _name(sub.add)) for sub in later}
    from_image = _from_image(graph)
    for sub in later:
        term = _positional_term(ctx, sub, sites[sub.add], order, from_image)
        if term is not None:
            raise ctx.error(
                f"the attention of {_name(sub.add).rpartition('.')[0] or 'the model'!r} adds a term tied to token "
                f"positions ({term}: a relative-position bias or rotary embedding); merged tokens have no single "
                "position, so token merging does not apply to this model", "target")
    with graph.inserting_after(first.skip):
        size = _make(graph, "call_function", initial_size, (first.skip,), "tome.size", rule)
    bias: fx.Node | None = None
    for sub in later:
        name = _name(sub.add).rpartition(".")[0] or "attention"
        if bias is not None:
            _feed_bias(graph, sites[sub.add], bias, rule, name)
        if sub.add not in merge_at:
            continue
        add_name, r = merge_at[sub.add]
        path = _module_path(ctx, add_name, args.name)
        ctx.add_block(path, TokenMerge(r, protected=protected, prop_attn=args.prop_attn))
        with graph.inserting_after(sub.add):
            merged = _make(graph, "call_module", path, (sub.add, size, sites[sub.add].keys, bias), path, rule)
        outputs = []
        for i, part in enumerate(("x", "size", "bias")):
            with graph.inserting_after(outputs[-1] if outputs else merged):
                outputs.append(_make(graph, "call_function", operator.getitem, (merged, i), f"{path}.{part}", rule))
        x, size, bias = outputs
        sub.add.replace_all_uses_with(x, delete_user_cb=lambda user, merged=merged: user is not merged)
        ctx.record("merge_tokens", add_name, module=path, r=r, protected=protected, prop_attn=args.prop_attn,
                   keys=_name(sites[sub.add].keys),
                   attention="fused" if sites[sub.add].fused else "softmax")
    ctx.state.graph_changed()
