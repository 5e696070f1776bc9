"""Structural roles: names for parts of a network that mean the same on every library.

A spec that says ``role: qkv`` works on torchvision's ``vit_b_16`` and on every timm ViT alike, because a role
is found from the graph's *structure*, never from one library's attribute names. The analysis behind the
transformer roles:

1. A **residual add** is an ``add`` whose one input (the *skip*) is an ancestor of the other (the *branch*).
2. Its **body** is every node on a path from the skip to the branch.
3. The body is a **pre-norm transformer sublayer** when its first layer is a normalisation module reading the
   skip directly. It is an **attention** sublayer when the body computes attention
   (``scaled_dot_product_attention``, a ``softmax``, or an un-canonicalised ``MultiheadAttention``), an
   **MLP** sublayer when it holds at least two Linear layers and no attention.

The ``Linear`` nodes of a body are ordered by data flow: the *first* ones (no other Linear of the body
upstream) are the input projections (``qkv``, ``mlp_fc1``), the *last* ones (no other Linear downstream) the
output projections (``attn_proj``, ``mlp_fc2``). Nodes added by peftc's own rules
(``node.meta['peftc_rule']``) never play a role, and a bypass added after a role node is looked through, so
roles keep naming the backbone's layers while rules rewrite the graph.

A normalisation module is any torch norm layer, a block standing in for one, or an RMS-style norm a library
writes itself (HF's ``LlamaRMSNorm``: no children, one 1-D ``weight``, an epsilon), so an HF decoder layer traced
with its attention kept whole (:mod:`peftc.analysis.stack`) has ``mlp_norm`` = ``post_attention_layernorm`` and
``mlp_out`` = ``mlp.down_proj``; an attention kept whole computes no visible attention, so it plays no role.

CNN residual blocks (ResNet, ConvNeXt) have no normalisation right at the start of their branch, so they play
no transformer role: a spec can select transformer roles with ``optional: true`` and still run on a CNN.

===================  ======================================================================================
role                 node (timm ViT / torchvision ``vit_b_16``)
===================  ======================================================================================
``head``             the classifier(s) nearest the output (``head`` + DeiT's ``head_dist`` / ``heads.head``)
``qkv``              attention input projection(s): ``attn.qkv`` / ``self_attention.qkv`` (canonicalised)
``attn_proj``        attention output projection: ``attn.proj`` / ``self_attention.proj``
``mlp_fc1``          first MLP Linear: ``mlp.fc1`` / ``mlp.0``
``mlp_fc2``          last MLP Linear: ``mlp.fc2`` / ``mlp.3``
``attn_norm``        the norm feeding attention: ``norm1`` / ``ln_1``
``mlp_norm``         the norm feeding the MLP: ``norm2`` / ``ln_2``
``final_norm``       the first norm after the last block: ``norm`` (or ``fc_norm``) / ``encoder.ln`` (CNNs: the
                     norm after the last residual add, ConvNeXt's ``classifier.0``)
``attn_out``         attention result right before its residual add: ``drop_path1`` / ``dropout``
``mlp_out``          MLP result right before its residual add: ``drop_path2`` / ``mlp.4``
``attn_residual``    residual stream after the attention add (input of ``mlp_norm``): ``add`` / ``add``
``mlp_residual``     residual stream after the MLP add (the block's output): ``add_1`` / ``add_1``
``stem``             parameterised layers before the first block: ``patch_embed.proj`` / ``conv_proj``
``proj/fc1/fc2``     short aliases of ``attn_proj``, ``mlp_fc1``, ``mlp_fc2`` (LoRA's ``targets``)
``bn_after_conv``    a BatchNorm reading a convolution's output directly (CNNs: ``layer1.0.bn1``, ``bn1``, …)
``conv_before_bn``   the convolution of such a conv → BN pair (``layer1.0.conv1``, ``downsample.0``, …)
===================  ======================================================================================
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import fx, nn

from peftc.analysis.index import Candidate, NodeIndex, operation_name
from peftc.blocks.contract import acts_as

__all__ = ["Sublayer", "TransformerLayout", "is_scale_norm", "transformer_layout"]

RoleFn = Callable[[NodeIndex], list[Candidate]]
ExplainFn = Callable[[NodeIndex], str]
_ROLES: dict[str, RoleFn] = {}
_EXPLAIN: dict[str, ExplainFn] = {}


def register_role(name: str, explain: ExplainFn | None = None) -> Callable[[RoleFn], RoleFn]:
    """Register a structural role: a function from a graph's NodeIndex to the candidates that play it.

    ``explain(index)`` says, in terms of the model's structure, why nothing plays the role (for the error a
    selector gives when it matches nothing)."""

    def decorate(fn: RoleFn) -> RoleFn:
        _ROLES[name] = fn
        if explain is not None:
            _EXPLAIN[name] = explain
        return fn

    return decorate


def role_names() -> list[str]:
    return sorted(_ROLES)


def get_role(name: str) -> RoleFn | None:
    return _ROLES.get(name)


def why_absent(name: str, index: NodeIndex) -> str:
    """Why no node of ``index`` plays role ``name``, from the model's structure ('' when the role cannot say)."""
    explain = _EXPLAIN.get(name)
    return explain(index) if explain is not None else ""


def _has_params(cand: Candidate) -> bool:
    return cand.module is not None and any(True for _ in cand.module.parameters(recurse=False))


def _is_classifier(module: nn.Module | None) -> bool:
    """A layer that maps features to classes: a Linear, or a 1×1 ungrouped convolution (timm's conv heads)."""
    if acts_as(module, nn.Linear):
        return True
    conv = module if isinstance(module, nn.modules.conv._ConvNd) else None
    return conv is not None and all(k == 1 for k in conv.kernel_size) and conv.groups == 1


def _no_head(index: NodeIndex) -> str:
    return ("the model has no classifier (no Linear or 1×1 conv between its last residual add or norm and the "
            "output): a headless feature extractor; the head rule adds one when given the number of classes")


@register_role("head", _no_head)
def head(index: NodeIndex) -> list[Candidate]:
    """The classifier(s): the Linear or 1×1 conv layers nearest the output (``fc``, ``head``, DeiT's ``head_dist``).

    The search walks back from the output and stops at the first parameterised layer of each path and at
    residual adds: a headless feature extractor (``num_classes=0``: its last layers are a norm, or an attention
    pool's residual MLP) has no head rather than a misplaced one.
    """
    output = next(n for n in reversed(index.gm.graph.nodes) if n.op == "output")
    order = {n: i for i, n in enumerate(index.gm.graph.nodes)}
    found: list[Candidate] = []
    seen: set[fx.Node] = set()
    frontier = list(output.all_input_nodes)
    while frontier:
        node = frontier.pop()
        if node in seen:
            continue
        seen.add(node)
        cand = index.by_node.get(node)
        if cand is not None and node.op == "call_module" and _has_params(cand):
            if _is_classifier(cand.module):
                found.append(cand)
            continue
        if (cand is not None and node.op == "get_attr") or (_is_add(node) and _is_residual(node, order)):
            continue
        frontier.extend(node.all_input_nodes)
    rank = {c.node: i for i, c in enumerate(index.candidates)}
    return sorted(found, key=lambda c: rank[c.node])


def _is_residual(add: fx.Node, order: dict[fx.Node, int]) -> bool:
    """An add one of whose inputs is an ancestor of the other (``x + f(x)``), unlike DeiT's ``head + head_dist``."""
    inputs = [a for a in add.args[:2] if isinstance(a, fx.Node)]
    return len(inputs) == 2 and any(_body(s, b, order) is not None for s, b in (inputs, inputs[::-1]))


# -- transformer structure ----------------------------------------------------------------------------------

_ADDS = (operator.add, operator.iadd, torch.add)
_NORMS: tuple[type[nn.Module], ...] = (nn.LayerNorm, nn.GroupNorm, nn.modules.batchnorm._NormBase)
if hasattr(nn, "RMSNorm"):
    _NORMS = (*_NORMS, nn.RMSNorm)


@dataclass
class Sublayer:
    """One pre-norm residual sublayer: ``add = skip + out`` with ``out = f(norm(skip))``."""

    kind: str  # "attn" | "mlp"
    add: fx.Node
    skip: fx.Node
    out: fx.Node
    norm: fx.Node
    first: list[fx.Node] = field(default_factory=list)  # input projections (Linear)
    last: list[fx.Node] = field(default_factory=list)  # output projections (Linear)


@dataclass
class TransformerLayout:
    """The transformer sublayers of a graph, in graph order, and the final norm."""

    attn: list[Sublayer]
    mlp: list[Sublayer]
    final_norm: list[fx.Node]
    stem: list[fx.Node]


def _is_added(node: fx.Node) -> bool:
    return "peftc_rule" in node.meta


def _original(node: fx.Node) -> fx.Node:
    """Look through peftc bypasses (``add(node, scaled)``) and inserted blocks (``block(node)``)."""
    while _is_added(node) and node.args and isinstance(node.args[0], fx.Node):
        node = node.args[0]
    return node


def _module(gm: fx.GraphModule, node: fx.Node) -> nn.Module | None:
    if node.op != "call_module":
        return None
    try:
        return gm.get_submodule(str(node.target))
    except AttributeError:
        return None


def is_scale_norm(module: nn.Module | None) -> bool:
    """An RMS-style norm a library writes itself (HF's ``…RMSNorm``, T5's layer norm): a module without children
    whose only parameter is a 1-D ``weight`` (a per-channel scale) and that carries an epsilon."""
    if module is None or next(module.children(), None) is not None:
        return False
    params = dict(module.named_parameters(recurse=False))
    weight = params.get("weight")
    has_eps = any(isinstance(getattr(module, a, None), float) for a in ("eps", "variance_epsilon"))
    return len(params) == 1 and weight is not None and weight.dim() == 1 and has_eps


def _is_norm(module: nn.Module | None) -> bool:
    """Normalisation modules, and blocks that stand in for one (``stands_for``, or carrying ``normalized_shape``),
    and RMS-style norms of other libraries (:func:`is_scale_norm`)."""
    return module is not None and (acts_as(module, _NORMS) or hasattr(module, "normalized_shape")
                                   or is_scale_norm(module))


def _is_linear(module: nn.Module | None) -> bool:
    """Linear layers, and blocks that stand in for one (a DoRA-style block in place of ``qkv`` is still ``qkv``)."""
    return acts_as(module, nn.Linear)


def _is_attention(gm: fx.GraphModule, node: fx.Node) -> bool:
    if node.op == "call_function":
        return node.target in (F.scaled_dot_product_attention, F.softmax, torch.softmax)
    if node.op == "call_method":
        return node.target == "softmax"
    return isinstance(_module(gm, node), (nn.MultiheadAttention, nn.Softmax))  # timm's Swin: an nn.Softmax


def _ancestors_after(node: fx.Node, floor: int, order: dict[fx.Node, int]) -> set[fx.Node]:
    """Ancestors of ``node`` (itself included) that come at or after graph position ``floor``."""
    seen: set[fx.Node] = set()
    frontier = [node]
    while frontier:
        current = frontier.pop()
        if current in seen or order[current] < floor:
            continue
        seen.add(current)
        frontier.extend(current.all_input_nodes)
    return seen


def _body(skip: fx.Node, branch: fx.Node, order: dict[fx.Node, int]) -> set[fx.Node] | None:
    """Nodes on a path skip → branch (skip excluded), or None when skip is not an ancestor of branch."""
    up = _ancestors_after(branch, order[skip], order)
    if skip not in up:
        return None
    down: set[fx.Node] = set()
    frontier = list(skip.users)
    while frontier:
        current = frontier.pop()
        if current in down or current not in up:
            continue
        down.add(current)
        frontier.extend(current.users)
    return down


def _flow_ends(linears: list[fx.Node], body: set[fx.Node]) -> tuple[list[fx.Node], list[fx.Node]]:
    """(first, last) Linear nodes of a body by data flow."""
    lin = set(linears)

    def reaches(start: fx.Node, forward: bool) -> bool:
        seen: set[fx.Node] = set()
        frontier = list(start.users if forward else start.all_input_nodes)
        while frontier:
            current = frontier.pop()
            if current in seen or current not in body:
                continue
            if current in lin:
                return True
            seen.add(current)
            frontier.extend(current.users if forward else current.all_input_nodes)
        return False

    first = [n for n in linears if not reaches(n, forward=False)]
    last = [n for n in linears if not reaches(n, forward=True) and n not in first]
    return first, last


def _sublayer(gm: fx.GraphModule, add: fx.Node, order: dict[fx.Node, int]) -> Sublayer | None:
    inputs = [a for a in add.args[:2] if isinstance(a, fx.Node)]
    if len(inputs) != 2 or any(a.op == "get_attr" for a in inputs):
        return None
    for skip, branch in (inputs, inputs[::-1]):
        body = _body(skip, branch, order)
        if body is None:
            continue
        norms = [u for u in skip.users if u in body and not _is_added(u) and _is_norm(_module(gm, u))]
        if len(norms) != 1:
            return None
        nodes = sorted(body, key=order.__getitem__)
        linears = [n for n in nodes if not _is_added(n) and _is_linear(_module(gm, n))]
        if any(_is_attention(gm, n) for n in nodes):
            kind = "attn"
        elif len(linears) >= 2:
            kind = "mlp"
        else:
            return None
        first, last = _flow_ends(linears, body)
        return Sublayer(kind, add, skip, _original(branch), norms[0], first, last)
    return None


def _is_add(node: fx.Node) -> bool:
    if node.op == "call_function":
        return node.target in _ADDS
    return node.op == "call_method" and node.target in ("add", "add_")


def _final_norm(gm: fx.GraphModule, last_add: fx.Node) -> list[fx.Node]:
    """The first real norm (not an Identity) downstream of the last transformer block, breadth first."""
    seen: set[fx.Node] = set()
    frontier = [last_add]
    while frontier:
        nxt: list[fx.Node] = []
        for node in frontier:
            for user in node.users:
                if user in seen:
                    continue
                seen.add(user)
                if not _is_added(user) and _is_norm(_module(gm, user)):
                    return [user]
                nxt.append(user)
        frontier = nxt
    return []


def _stem(gm: fx.GraphModule, first_skip: fx.Node, order: dict[fx.Node, int]) -> list[fx.Node]:
    ups = _ancestors_after(first_skip, 0, order)
    return sorted(
        (n for n in ups if n.op == "call_module" and not _is_added(n)
         and any(True for _ in (_module(gm, n) or nn.Identity()).parameters(recurse=False))),
        key=order.__getitem__,
    )


def transformer_layout(gm: fx.GraphModule) -> TransformerLayout:
    """Find every pre-norm attention and MLP sublayer of ``gm`` (see the module docstring)."""
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    attn: list[Sublayer] = []
    mlp: list[Sublayer] = []
    for node in gm.graph.nodes:
        if not _is_add(node) or _is_added(node):
            continue
        sub = _sublayer(gm, node, order)
        if sub is not None:
            (attn if sub.kind == "attn" else mlp).append(sub)
    every = sorted([*attn, *mlp], key=lambda s: order[s.add])
    final = _final_norm(gm, every[-1].add) if every else []
    stem = _stem(gm, every[0].skip, order) if every else []
    return TransformerLayout(attn, mlp, final, stem)


_PLUMBING = {"getitem", "getattr", "reshape", "view", "permute", "transpose", "contiguous", "flatten", "size",
             "add", "mul", "pad", "roll", "chunk", "split", "unbind", "cat", "matmul", "truediv", "floordiv"}


def _transformer_absence(index: NodeIndex) -> str:
    """What the model has instead of pre-norm transformer sublayers (residual adds whose branch starts with a
    norm and computes attention or an MLP)."""
    gm = index.gm
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    residual: list[tuple[fx.Node, set[fx.Node], fx.Node]] = []
    for node in gm.graph.nodes:
        if not _is_add(node) or _is_added(node):
            continue
        inputs = [a for a in node.args[:2] if isinstance(a, fx.Node)]
        for skip, branch in ((inputs, inputs[::-1]) if len(inputs) == 2 else ()):
            body = _body(skip, branch, order)
            if body is not None:
                residual.append((node, body, skip))
                break
    if not residual:
        return "the model has no residual adds at all (a plain stack of layers), so no transformer sublayers"
    prenorm = [(add, body) for add, body, skip in residual
               if any(u in body and _is_norm(_module(gm, u)) for u in skip.users)]
    if not prenorm:
        first = next((n for n in sorted(residual[0][1], key=order.__getitem__) if n.op == "call_module"), None)
        kind = f", e.g. '{index.by_node[first].name}' ({type(_module(gm, first)).__name__})" if (
            first is not None and first in index.by_node) else ""
        return (f"none of its {len(residual)} residual branches starts with a normalisation layer{kind}: residual "
                "blocks of a CNN, not pre-norm transformer sublayers")
    add, body = prenorm[0]
    opaque = sorted({operation_name(n).removeprefix("fn:") for n in body if n.op == "call_function"}
                    - _PLUMBING)
    hidden = (f"; it calls {', '.join(opaque)}, opaque to tracing (no Linear or softmax visible inside)"
              if opaque else "")
    name = index.by_node[add].name if add in index.by_node else add.name
    return (f"its {len(prenorm)} pre-norm residual sublayers (e.g. '{name}') compute neither visible attention "
            f"nor an MLP of two Linears{hidden}")


def _layout(index: NodeIndex) -> TransformerLayout:
    cached = getattr(index, "_peftc_transformer_layout", None)
    if cached is None:
        cached = transformer_layout(index.gm)
        index._peftc_transformer_layout = cached  # type: ignore[attr-defined]  # valid for this graph state
    return cached


def _candidates(index: NodeIndex, nodes: Iterable[fx.Node]) -> list[Candidate]:
    order = {c.node: i for i, c in enumerate(index.candidates)}
    found = {n for n in nodes if n in index.by_node}
    return [index.by_node[n] for n in sorted(found, key=order.__getitem__)]


@register_role("qkv", _transformer_absence)
def qkv(index: NodeIndex) -> list[Candidate]:
    """Attention input projection: the fused q/k/v Linear (or the separate q, k, v Linears)."""
    return _candidates(index, (n for s in _layout(index).attn for n in s.first))


@register_role("attn_proj", _transformer_absence)
def attn_proj(index: NodeIndex) -> list[Candidate]:
    """Attention output projection: the Linear that maps the merged heads back to the residual width."""
    return _candidates(index, (n for s in _layout(index).attn for n in s.last))


@register_role("mlp_fc1", _transformer_absence)
def mlp_fc1(index: NodeIndex) -> list[Candidate]:
    """First MLP Linear (expansion, ``C → 4C``); both halves of a gated MLP."""
    return _candidates(index, (n for s in _layout(index).mlp for n in s.first))


@register_role("mlp_fc2", _transformer_absence)
def mlp_fc2(index: NodeIndex) -> list[Candidate]:
    """Last MLP Linear (contraction, ``4C → C``)."""
    return _candidates(index, (n for s in _layout(index).mlp for n in s.last))


@register_role("attn_norm", _transformer_absence)
def attn_norm(index: NodeIndex) -> list[Candidate]:
    """The normalisation feeding attention (timm ``norm1``, torchvision ``ln_1``)."""
    return _candidates(index, (s.norm for s in _layout(index).attn))


@register_role("mlp_norm", _transformer_absence)
def mlp_norm(index: NodeIndex) -> list[Candidate]:
    """The normalisation feeding the MLP (timm ``norm2``, torchvision ``ln_2``)."""
    return _candidates(index, (s.norm for s in _layout(index).mlp))


@register_role("final_norm")
def final_norm(index: NodeIndex) -> list[Candidate]:
    """The first normalisation after the last transformer block (``norm``/``fc_norm``, ``encoder.ln``); in a
    model without transformer sublayers, the norm between the last residual add and the output (ConvNeXt's
    pre-head ``LayerNorm2d``)."""
    layout = _layout(index)
    if layout.attn or layout.mlp:
        return _candidates(index, layout.final_norm)
    return _candidates(index, _norm_before_output(index.gm))


def _norm_before_output(gm: fx.GraphModule) -> list[fx.Node]:
    """The norm nearest the output on the way back to the last residual add (none in a ResNet: its body ends in
    an add)."""
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    output = next(n for n in reversed(gm.graph.nodes) if n.op == "output")
    seen: set[fx.Node] = set()
    frontier = list(output.all_input_nodes)
    while frontier:
        node = frontier.pop(0)
        if node in seen or (_is_add(node) and _is_residual(node, order)):
            continue
        seen.add(node)
        if not _is_added(node) and _is_norm(_module(gm, node)):
            return [node]
        frontier.extend(node.all_input_nodes)
    return []


@register_role("attn_out", _transformer_absence)
def attn_out(index: NodeIndex) -> list[Candidate]:
    """The attention sublayer's result right before the residual add (after layer scale and drop path)."""
    return _candidates(index, (s.out for s in _layout(index).attn))


@register_role("mlp_out", _transformer_absence)
def mlp_out(index: NodeIndex) -> list[Candidate]:
    """The MLP sublayer's result right before the residual add."""
    return _candidates(index, (s.out for s in _layout(index).mlp))


@register_role("attn_residual", _transformer_absence)
def attn_residual(index: NodeIndex) -> list[Candidate]:
    """The residual stream after the attention add as the MLP sublayer reads it: the input of ``mlp_norm`` (what
    AdaptFormer reads). In a ViT that is the add itself; Swin reshapes its ``B×H×W×C`` grid to ``B×N×C`` first."""
    layout = _layout(index)
    if not layout.attn:
        return []
    return _candidates(index, (_original(s.skip) for s in layout.mlp))


@register_role("mlp_residual", _transformer_absence)
def mlp_residual(index: NodeIndex) -> list[Candidate]:
    """The residual stream after the MLP add: the transformer block's output."""
    return _candidates(index, (s.add for s in _layout(index).mlp))


@register_role("stem", _transformer_absence)
def stem(index: NodeIndex) -> list[Candidate]:
    """Parameterised layers before the first transformer block (a ViT's patch embedding, a hybrid's stem)."""
    return _candidates(index, _layout(index).stem)


register_role("proj", _transformer_absence)(attn_proj)
register_role("fc1", _transformer_absence)(mlp_fc1)
register_role("fc2", _transformer_absence)(mlp_fc2)


# -- conv → BatchNorm pairs -------------------------------------------------------------------------------------


def _conv_bn_pairs(index: NodeIndex) -> list[tuple[Candidate, Candidate]]:
    """(conv, bn): a BatchNorm whose input is directly a convolution's output (ResNet's conv1 → bn1, …)."""
    pairs = []
    for cand in index:
        if cand.node.op != "call_module" or not acts_as(cand.module, nn.modules.batchnorm._BatchNorm):
            continue
        producer = cand.node.args[0] if cand.node.args else None
        conv = index.by_node.get(producer) if isinstance(producer, fx.Node) else None
        if conv is not None and acts_as(conv.module, nn.modules.conv._ConvNd):
            pairs.append((conv, cand))
    return pairs


def _no_conv_bn(index: NodeIndex) -> str:
    """What normalises the model's convolutions instead of a BatchNorm reading them directly."""
    bns = [c for c in index if c.node.op == "call_module" and acts_as(c.module, nn.modules.batchnorm._BatchNorm)]
    if bns:
        return f"its {len(bns)} BatchNorms (e.g. '{bns[0].name}') read no convolution's output directly"
    norms = sorted({type(c.module).__name__ for c in index if c.node.op == "call_module" and _is_norm(c.module)})
    return "it has no BatchNorm" + (f" (its norms: {', '.join(norms)})" if norms else " and no other norm")


@register_role("bn_after_conv", _no_conv_bn)
def bn_after_conv(index: NodeIndex) -> list[Candidate]:
    """BatchNorms that normalise a convolution's output directly (the BN of a conv → BN pair)."""
    return [bn for _, bn in _conv_bn_pairs(index)]


@register_role("conv_before_bn", _no_conv_bn)
def conv_before_bn(index: NodeIndex) -> list[Candidate]:
    """Convolutions whose output a BatchNorm normalises directly (the conv of a conv → BN pair)."""
    convs = {conv.node: conv for conv, _ in _conv_bn_pairs(index)}
    return [c for c in index if c.node in convs]
