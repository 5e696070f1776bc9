"""``tie``: whole repeated blocks stop owning parameters (Replacement Learning, arXiv 2410.01239).

Every parameterised layer of a tied block ``i`` computes with ``θ̃ = a_i·θ_prev + b_i·θ_next``, the same-path
layer's parameters in the neighbouring blocks, mixed by the block's two learnable scalars. The rewrite is plain
data flow: the neighbours' parameters and the scalars become ``get_attr`` nodes passed to the layer (now a
:class:`~peftc.methods.replacement.tied.TiedLayer`) as its ``tie`` keyword, and the block's own parameters leave
the model —
so the parameter count, the state dict and the optimizer really shrink while gradients reach the neighbours.

Which blocks: the children of a ``Sequential``/``ModuleList``/``ModuleDict`` form *runs of identical blocks*
(consecutive siblings with the same parameter names and shapes; a ResNet stage's first block, with its
downsample, is a run of its own; in a plain stack such as VGG's the blocks are single layers). In each run
positions ``offset, offset + every, …`` are tied. A tied block's neighbours are the run members right before
and after it; one that is itself tied, or missing at the end of the run, cannot lend parameters: with one
neighbour left ``edge`` decides (``reflect`` reads it for both terms, ``skip``, ``error``), with none the rule
fails naming the block and why.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from torch import fx, nn

from peftc.analysis.paths import fresh_path
from peftc.language.primitives import primitive_pass
from peftc.methods.replacement.tied import TiedLayer, TieScalars, mix
from peftc.passes.base import PassContext, Rewrite

__all__ = ["tie", "tied_blocks"]


Structure = tuple[tuple[str, tuple[int, ...]], ...]


@dataclass(frozen=True)
class _Plan:
    block: str
    prev: str
    next: str


@dataclass
class _Group:
    """The parameterised children of one container, in order, split into runs of identical blocks."""

    container: str
    paths: list[str]
    structures: list[Structure]

    def runs(self) -> list[list[int]]:
        out: list[list[int]] = []
        for i, structure in enumerate(self.structures):
            if out and self.structures[out[-1][-1]] == structure:
                out[-1].append(i)
            else:
                out.append([i])
        return out


def _structure(module: nn.Module) -> Structure:
    return tuple((name, tuple(p.shape)) for name, p in module.named_parameters())


def _difference(a: Structure, b: Structure) -> str:
    da, db = dict(a), dict(b)
    for name in [*da, *db]:
        if name not in db:
            return f"{name} only in the first"
        if name not in da:
            return f"{name} only in the second"
        if da[name] != db[name]:
            return f"{name} {da[name]} vs {db[name]}"
    return "same"


def _groups(ctx: PassContext) -> list[_Group]:
    """Containers of repeated blocks (from the backbone's structure), shallowest first."""
    by_key: dict[tuple[str, int, str], dict[int, str]] = {}
    ambiguous: set[tuple[str, int, str]] = set()
    for path, (container, index, count) in ctx.state.positions.items():
        try:
            module = ctx.gm.get_submodule(path)
        except AttributeError:
            continue
        if not any(True for _ in module.parameters()):
            continue  # nothing to tie (dropout, activation)
        key = (container, count, type(module).__name__)
        slots = by_key.setdefault(key, {})
        if index in slots:
            ambiguous.add(key)  # two kinds of sibling share a position: order unknown, leave them alone
        slots[index] = path
    groups = []
    for key, slots in by_key.items():
        if key in ambiguous or len(slots) < 2:
            continue
        paths = [slots[i] for i in sorted(slots)]
        groups.append(_Group(key[0], paths, [_structure(ctx.gm.get_submodule(p)) for p in paths]))
    return sorted(groups, key=lambda g: (g.container.count(".") + bool(g.container), g.container))


def _inside(path: str, outer: str) -> bool:
    return path == outer or path.startswith(outer + ".")


def _candidates(ctx: PassContext) -> set[str] | None:
    """Block paths the rule may tie (None = every block): those holding a node the ``target`` selects."""
    sel = ctx.args.target
    if all(v is None for v in (sel.name, sel.type, sel.role, sel.where, sel.blocks, sel.exclude)):
        return None
    names = [c.name for c in ctx.select(sel, "target")]
    return {p for p in ctx.state.positions if any(_inside(n, p) for n in names)}


def _plan(ctx: PassContext) -> list[_Plan]:
    args = ctx.args
    allowed = _candidates(ctx)
    reserved: list[str] = []  # tied blocks and their neighbours: nothing inside them may be tied again
    plans: list[_Plan] = []
    for group in _groups(ctx):
        picks: list[tuple[list[int], int]] = []  # (run, position in run)
        for run in group.runs():
            for pos in range(args.offset, len(run), args.every):
                path = group.paths[run[pos]]
                if allowed is not None and path not in allowed:
                    continue
                if any(_inside(path, r) for r in reserved):
                    continue
                picks.append((run, pos))
        chosen = {run[pos] for run, pos in picks}
        for run, pos in picks:
            plan = _neighbours(ctx, group, run, pos, chosen)
            if plan is not None:
                plans.append(plan)
                reserved.extend({plan.block, plan.prev, plan.next})
    if not plans and not args.target.optional:
        raise ctx.error(
            f"no block to tie: no run of identical repeated blocks has a block at positions {args.offset}::"
            f"{args.every} with a same-shape neighbour{_why_none(ctx)}", "offset")
    return plans


def _why_none(ctx: PassContext) -> str:
    """The model's structure that leaves nothing to tie: repeated blocks that differ (dense blocks grow their
    input), or no repeated blocks at all."""
    groups = _groups(ctx)
    if not groups:
        return " (the model has no Sequential/ModuleList/ModuleDict of two or more parameterised blocks of one class)"
    differing = [g for g in groups if all(len(run) == 1 for run in g.runs())]
    if not differing:
        return ""
    group = max(differing, key=lambda g: len(g.paths))
    diff = _difference(group.structures[0], group.structures[1])
    return (f" (the {len(group.paths)} blocks of {group.container or 'the model'!r} differ from one another, "
            f"e.g. {group.paths[0]!r} vs {group.paths[1]!r}: {diff})")


def _neighbours(ctx: PassContext, group: _Group, run: list[int], pos: int, chosen: set[int]) -> _Plan | None:
    """The neighbours lending block ``run[pos]`` their parameters, per the rule's ``edge`` policy."""
    i = run[pos]
    path = group.paths[i]
    found: list[str] = []
    why: list[str] = []
    for step, side in ((-1, "previous"), (1, "next")):
        j = i + step
        if not 0 <= j < len(group.paths):
            why.append(f"it is the {'first' if step < 0 else 'last'} block of {group.container or 'the model'!r}")
        elif j not in run:
            diff = _difference(group.structures[i], group.structures[j])
            why.append(f"the {side} block {group.paths[j]!r} has different parameters ({diff})")
        elif j in chosen:
            why.append(f"the {side} block {group.paths[j]!r} is tied too (a neighbour must keep its parameters; "
                       f"every={ctx.args.every} ties adjacent blocks)")
        else:
            found.append(group.paths[j])
    if not found:
        raise ctx.error(f"cannot tie {path!r}: no same-shape neighbour keeps its parameters — {'; '.join(why)}",
                        "target")
    if len(found) == 1:
        if ctx.args.edge == "skip":
            return None
        if ctx.args.edge == "error":
            raise ctx.error(f"cannot tie {path!r} with both neighbours (edge: error): {'; '.join(why)}", "edge")
        return _Plan(path, found[0], found[0])
    return _Plan(path, found[0], found[1])


class _Reader:
    """``get_attr`` nodes at the top of the graph, one per tensor, shared by every reader."""

    def __init__(self, ctx: PassContext):
        self.graph = ctx.gm.graph
        self.label = ctx.rule.label
        self.nodes: dict[str, fx.Node] = {}
        for node in self.graph.nodes:
            if node.op == "get_attr":
                self.nodes.setdefault(str(node.target), node)
        self.top = next(n for n in self.graph.nodes if n.op != "placeholder")

    def __call__(self, target: str) -> fx.Node:
        node = self.nodes.get(target)
        if node is None:
            with self.graph.inserting_before(self.top):
                node = self.graph.get_attr(target)
            node.meta.update(peftc_name=target, peftc_rule=self.label)
            self.nodes[target] = node
        elif node is not self.top:
            self.top.prepend(node)  # reading a tensor earlier is always valid; later readers may come first
        return node


def _scalars_base(gm: fx.GraphModule, block: str) -> str:
    """Where a block's scalars live: inside it, or beside it when the block is itself one layer (a plain
    ``Sequential`` stack such as VGG's ``features.8``), which becomes a TiedLayer and cannot hold them."""
    is_layer = any(n.op == "call_module" and str(n.target) == block for n in gm.graph.nodes)
    return f"{block}_tie" if is_layer else f"{block}.tie"


def _tie_block(ctx: PassContext, plan: _Plan, read: _Reader) -> None:
    gm, args = ctx.gm, ctx.args
    before = {id(p) for p in gm.get_submodule(plan.block).parameters()}
    removed = sum(p.numel() for p in gm.get_submodule(plan.block).parameters())
    scalars_path = fresh_path(gm, _scalars_base(gm, plan.block))
    added = ctx.add_block(scalars_path, TieScalars(*args.init))
    a, b = read(f"{scalars_path}.a"), read(f"{scalars_path}.b")
    mix_names = {"a": f"{scalars_path}.a", "b": f"{scalars_path}.b"}
    tied: dict[str, TiedLayer] = {}
    for node in list(gm.graph.nodes):
        target = str(node.target)
        if node.op not in ("call_module", "get_attr") or not _inside(target, plan.block):
            continue
        if _inside(target, scalars_path):
            continue  # the block's own mixing scalars
        rel = target[len(plan.block):]
        prev, nxt = plan.prev + rel, plan.next + rel
        if node.op == "call_module":
            layer = tied.get(target)
            if layer is None:
                module = gm.get_submodule(target)
                names = [n for n, _ in module.named_parameters()]
                if not names:
                    continue
                try:
                    layer = TiedLayer(module, names)
                except ValueError as exc:
                    raise ctx.error(f"cannot tie {target!r}: {exc}", "target") from None
                gm.set_submodule(target, layer)
                tied[target] = layer
                n_removed = sum(p.numel() for p in module.parameters())
                ctx.record("tie", target, **{"from": [prev, nxt]}, mix=mix_names, removed=n_removed,
                           block=plan.block, layer=type(module).__name__)
            pairs = [read(f"{side}.{name}") for name in layer.names for side in (prev, nxt)]
            node.kwargs = {**node.kwargs, "tie": (a, b, *pairs)}
        else:
            owner_path, _, attr = target.rpartition(".")
            owner = gm.get_submodule(owner_path)
            if attr not in owner._parameters:
                continue  # a buffer read directly: stays the block's own
            numel = owner._parameters[attr].numel()
            with gm.graph.inserting_after(node):
                mixed = gm.graph.call_function(mix, (a, b, read(prev), read(nxt)))
            mixed.meta.update(peftc_name=f"{target}.tied", peftc_rule=ctx.rule.label, peftc_tied=target)
            node.replace_all_uses_with(mixed)
            gm.graph.erase_node(node)
            read.nodes.pop(target, None)
            del owner._parameters[attr]
            ctx.record("tie", target, **{"from": [prev, nxt]}, mix=mix_names, removed=numel, block=plan.block,
                       layer="Parameter")
    left = [n for n, p in gm.get_submodule(plan.block).named_parameters() if id(p) in before]
    if left:
        raise ctx.error(f"cannot tie {plan.block!r}: {plan.block}.{left[0]} is not read by any layer of the graph "
                        "(only layers and parameters the graph reads can be tied)", "target")
    ctx.record("tie", plan.block, **{"from": [plan.prev, plan.next]}, module=scalars_path, params=added,
               init=list(args.init), edge="reflect" if plan.prev == plan.next else "both", blocks_params=removed)


@primitive_pass("tie")
def tie(ctx: PassContext) -> None:
    plans = _plan(ctx)
    read = _Reader(ctx)
    for plan in plans:
        _tie_block(ctx, plan, read)
    ctx.state.modules_changed()
    ctx.state.graph_changed()


def tied_blocks(rewrites: Iterable[Rewrite], rule: str | None = None) -> Mapping[str, tuple[str, str]]:
    """Tied block path → (previous, next) neighbour, from a ledger's rewrites (for reports and tests)."""
    return {r.node: (r.detail["from"][0], r.detail["from"][1]) for r in rewrites
            if r.action == "tie" and "module" in r.detail and (rule is None or r.rule == rule)}
