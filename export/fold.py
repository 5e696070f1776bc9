"""Folding: merge what is linear into the frozen weights, so the deployed graph costs what the backbone costs.

A compiled model trains with extra modules on its data path (CLR's depthwise convs, LoRA bypasses,
per-task BatchNorm). For inference many of them are linear in the same input as a frozen layer and can be
merged into that layer's weights once, ahead of time. :func:`fold` does this on a *deep copy* of the compiled
graph for one task and returns a plain ``fx.GraphModule`` plus a :class:`FoldReport`; the model you pass is
never changed.

What folds (graph-level folds first, then the rest in this order, repeated until nothing changes). Every step
reads the block contract (:mod:`peftc.blocks.contract`), never a block's name:

0. **Graph-level folds** — a block class overriding ``fold_graph(gm)`` rewrites the whole graph first (tied
   layers: ``a·θ_prev + b·θ_next`` is a constant at inference, so each becomes the plain layer it replaced).
1. **Parallel bypasses** — a block ``B`` attached by the ``parallel`` primitive reads the input of a layer
   ``L`` and its (optionally scaled) output is added to ``L``'s output::

       src ─▶ L ─────────────▶ add ─▶ …
        └───▶ B ─▶ mul(scale) ─┘          (the mul is absent when scale == 1)

   If ``B`` overrides ``delta_weight(self, base) -> (dW, db | None)`` — ``dW`` in ``L.weight``'s shape, ``db``
   in ``L``'s bias shape, *without* the rule's scale — then ``L.weight += scale·dW`` (and the bias), and
   ``B``, the ``mul`` and the ``add`` leave the graph. ``delta_weight`` may return ``None`` or raise
   ``NotImplementedError`` to decline (e.g. a non-linear configuration); the block then stays.
2. **Blocks with ``folded()``** — any block on the data path that overrides ``folded(self) -> nn.Module |
   None`` is swapped for the plain module it returns (an ``nn.LayerNorm`` with the active task's row, a
   depthwise ``nn.Conv2d`` for a reprogramming conv, …). ``None`` declines.
3. **Per-channel scales** — a depthwise conv whose kernel is only a centre tap (a 1×1 kernel, or an untrained
   identity-initialised one) multiplies each channel by one number: merged into the preceding conv and removed.
4. **BatchNorm** (``nn.BatchNorm1d/2d/3d`` with running statistics, evaluated in inference mode) right after a
   convolution — a backbone conv or a CLR depthwise conv — is merged into that conv's weight and bias.

A merge is skipped (and said why in the report) when it would not be exact: a layer called more than once, a
parameter tied to another module, a layer whose output has other readers. Parameters of the folded graph are
frozen and the module is in eval mode.
"""

from __future__ import annotations

import copy
import numbers
import operator
from collections import Counter
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import fx, nn

from peftc.analysis.paths import has_submodule, resolve
from peftc.blocks.contract import Block, offers
from peftc.export.errors import ExportError

__all__ = ["FoldAction", "FoldReport", "FoldResult", "fold", "fold_graph"]

_BN_TYPES = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
_CONV_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


@dataclass(frozen=True)
class FoldAction:
    """One merge: ``kind`` of ``source`` into ``target`` (module paths)."""

    kind: str  # "tied" | "bypass" | "folded" | "plain" | "scale" | "batchnorm"
    source: str
    target: str


@dataclass
class FoldReport:
    """What :func:`fold` did, and the parameter counts before and after."""

    task: str | None
    params_before: int
    params_after: int
    buffers_before: int
    buffers_after: int
    actions: list[FoldAction] = field(default_factory=list)
    remaining: dict[str, str] = field(default_factory=dict)  # peftc block left in the graph -> why

    def counts(self) -> dict[str, int]:
        return dict(Counter(a.kind for a in self.actions))

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["actions"] = [asdict(a) for a in self.actions]
        out["counts"] = self.counts()
        return out


@dataclass
class FoldResult:
    """The folded graph (a plain ``fx.GraphModule`` in eval mode; in region mode the model running its folded
    regions) and its report."""

    module: nn.Module
    report: FoldReport


# -- entry points ------------------------------------------------------------------------------------------
def fold(model: Any, task: str | None = None) -> FoldResult:
    """Fold a compiled model (or a ``fx.GraphModule``) for ``task`` (default: the active task).

    Works on a deep copy: ``model`` keeps its blocks, tasks and training state.
    """
    from peftc.runtime.model import Compiled

    if isinstance(model, Compiled):
        work = copy.deepcopy(model)
        if task is not None:
            work.set_task(task)  # raises TaskError naming the known tasks
        active = work.active_task
        if work.regions:
            return FoldResult(work.net.eval(), _fold_regions(work, active))
        gm = work.net
        inserted: Iterable[str] = work.ledger.inserted
    elif isinstance(model, fx.GraphModule):
        if task is not None:
            raise ExportError("a task can only be chosen for a compiled peftc model, not a bare GraphModule")
        gm, active, inserted = copy.deepcopy(model), None, ()
    else:
        raise ExportError(f"fold needs a compiled model or a fx.GraphModule, not {type(model).__name__}")
    report = fold_graph(gm, inserted)
    report.task = active
    return FoldResult(gm, report)


def fold_graph(gm: fx.GraphModule, inserted: Iterable[str] = ()) -> FoldReport:
    """Fold ``gm`` in place (callers pass a copy); ``inserted`` names peftc's block paths for the report."""
    gm.eval()
    params_before, buffers_before = _count(gm)
    folder = _Folder(gm)
    folder.run()
    for p in gm.parameters():
        p.requires_grad_(False)
    params_after, buffers_after = _count(gm)
    return FoldReport(
        task=None,
        params_before=params_before,
        params_after=params_after,
        buffers_before=buffers_before,
        buffers_after=buffers_after,
        actions=folder.actions,
        remaining=_remaining(gm, inserted, folder),
    )


def _fold_regions(model: Any, task: str | None) -> FoldReport:
    """Region mode: fold each rewritten region in place (the eager glue has nothing to fold); one report, with
    the regions' paths put back in front of the names."""
    root = model.net
    params_before, buffers_before = _count(root)
    report = FoldReport(task, params_before, 0, buffers_before, 0)
    for path in model.regions:
        region = root.get_submodule(path)
        inner = [p.removeprefix(f"{path}.") for p in model.ledger.inserted if p.startswith(f"{path}.")]
        if not isinstance(region, fx.GraphModule):  # a leaf layer, alone or running what rules added around it
            report.remaining.update({f"{path}.{p}": f"{path!r} is a region of one layer, which is not a graph "
                                     "to fold in" for p in inner})
            continue
        part = fold_graph(region, inner)
        report.actions += [FoldAction(a.kind, f"{path}.{a.source}", f"{path}.{a.target}") for a in part.actions]
        report.remaining.update({f"{path}.{p}": why for p, why in part.remaining.items()})
    for p in root.parameters():
        p.requires_grad_(False)
    report.params_after, report.buffers_after = _count(root)
    return report


# -- the folder --------------------------------------------------------------------------------------------
class _Folder:
    def __init__(self, gm: fx.GraphModule):
        self.gm = gm
        self.actions: list[FoldAction] = []
        self.skipped: dict[str, str] = {}
        self.replaced: set[str] = set()
        self.erased: set[fx.Node] = set()

    def run(self) -> None:
        if self._graph_folds():
            self._cleanup()
        steps = (self._bypass, self._folded, self._scale, self._batchnorm)
        changed = True
        while changed:
            changed = False
            for step in steps:
                for node in list(self.gm.graph.nodes):
                    if node not in self.erased and node.op == "call_module" and step(node):
                        changed = True
            if changed:
                self._cleanup()

    # helpers
    def module(self, node: fx.Node) -> nn.Module:
        return self.gm.get_submodule(str(node.target))

    def calls(self, target: str) -> int:
        return sum(1 for n in self.gm.graph.nodes if n.op == "call_module" and n.target == target)

    def tied(self, module: nn.Module) -> bool:
        """True when one of ``module``'s tensors is also reachable under another module path."""
        own = {id(t) for t in (*module.parameters(recurse=False), *module.buffers(recurse=False))}
        seen = Counter(
            id(t)
            for _, t in (*self.gm.named_parameters(remove_duplicate=False),
                         *self.gm.named_buffers(remove_duplicate=False))
            if id(t) in own
        )
        return any(c > 1 for c in seen.values())

    def not_editable(self, node: fx.Node) -> str | None:
        """Why the layer at ``node`` may not have its weights rewritten in place (None: it may)."""
        target = str(node.target)
        if self.calls(target) != 1:
            return f"{target} is called more than once"
        if self.tied(self.module(node)):
            return f"{target} shares tensors with another module"
        return self.read_directly(target)

    def read_directly(self, target: str) -> str | None:
        """Why not, when other nodes read ``target``'s tensors as graph inputs (``get_attr``: tied layers)."""
        if any(n.op == "get_attr" and str(n.target).startswith(target + ".") for n in self.gm.graph.nodes):
            return f"{target}'s tensors are read directly by other layers (tied)"
        return None

    def erase(self, node: fx.Node) -> None:
        self.gm.graph.erase_node(node)
        self.erased.add(node)

    def swap(self, path: str, new: nn.Module) -> None:
        self.gm.set_submodule(path, new)
        self.replaced.add(path)

    def _cleanup(self) -> None:
        self.gm.graph.eliminate_dead_code()
        self.gm.graph.lint()
        # Blocks are often children of the layer they follow (``conv1.clr``), which keeps them alive for
        # ``delete_all_unused_submodules``: drop every module whose calls were all removed explicitly.
        called = {n.target for n in self.gm.graph.nodes if n.op == "call_module"}
        for target in sorted({str(n.target) for n in self.erased if n.op == "call_module"} - called):
            if has_submodule(self.gm, target):
                self.gm.delete_submodule(target)
        self.gm.delete_all_unused_submodules()
        self.gm.recompile()

    # 0. graph-level folds that blocks provide (tied layers materialise their mix) -------------------------
    def _graph_folds(self) -> bool:
        """Run each block class's ``fold_graph`` once, before the per-node merges (see the contract).

        Done first: afterwards no layer reads its neighbours' tensors directly, so the neighbours become
        editable for the merges below.
        """
        kinds = {type(m) for m in self.gm.modules() if offers(m, "fold_graph")}
        changed = False
        for kind in sorted(kinds, key=lambda k: k.__qualname__):
            for action in kind.fold_graph(self.gm):
                self.actions.append(FoldAction(action.kind, action.source, action.target))
                self.replaced.add(action.target)
                changed = True
        return changed

    # 1. parallel bypasses ----------------------------------------------------------------------------------
    def _bypass(self, node: fx.Node) -> bool:
        block = self.module(node)
        if not offers(block, "delta_weight"):
            return False
        path = str(node.target)
        pattern = _match_bypass(node)
        if isinstance(pattern, str):
            self.skipped[path] = pattern
            return False
        scale, add, base_node = pattern
        base = self.module(base_node)
        weight = getattr(base, "weight", None)
        if not isinstance(weight, torch.Tensor):
            self.skipped[path] = f"the bypassed layer {base_node.target} has no weight"
            return False
        why = self.not_editable(base_node)
        if why is not None:
            self.skipped[path] = why
            return False
        try:
            with torch.no_grad():
                delta = block.delta_weight(base)
        except NotImplementedError as exc:
            self.skipped[path] = f"{type(block).__name__}.delta_weight declined: {exc}" if str(exc) else (
                f"{type(block).__name__}.delta_weight declined")
            return False
        if delta is None:
            self.skipped[path] = f"{type(block).__name__}.delta_weight declined"
            return False
        d_weight, d_bias = delta
        if tuple(d_weight.shape) != tuple(weight.shape):
            raise ExportError(
                f"{type(block).__name__}.delta_weight for {path} returned shape {tuple(d_weight.shape)}, but "
                f"{base_node.target}.weight has shape {tuple(weight.shape)}"
            )
        with torch.no_grad():
            base.weight = _param(weight.double() + scale * d_weight.double(), like=weight)
            if d_bias is not None:
                _add_bias(base, scale * d_bias.double(), f"{type(block).__name__}.delta_weight for {path}")
        add.replace_all_uses_with(base_node)
        for dead in (add, *[u for u in node.users if u is not add], node):
            self.erase(dead)
        self.actions.append(FoldAction("bypass", path, str(base_node.target)))
        return True

    # 2. blocks that fold themselves ------------------------------------------------------------------------
    def _folded(self, node: fx.Node) -> bool:
        block = self.module(node)
        path = str(node.target)
        if not offers(block, "folded") or path in self.replaced:
            return False
        with torch.no_grad():
            try:
                new = block.folded()
            except NotImplementedError as exc:
                self.skipped[path] = f"{type(block).__name__}.folded declined" + (f": {exc}" * bool(str(exc)))
                return False
        if new is None or new is block:
            self.skipped[path] = f"{type(block).__name__}.folded declined"
            return False
        if not isinstance(new, nn.Module):
            raise ExportError(f"{type(block).__name__}.folded() for {path} returned a {type(new).__name__}")
        new.eval()
        self.swap(path, new)
        self.actions.append(FoldAction(getattr(block, "fold_kind", "folded"), path, path))
        return True

    # 4. per-channel scales (centre-tap depthwise convs) into the preceding conv ----------------------------
    def _scale(self, node: fx.Node) -> bool:
        dw = self.module(node)
        if not _is_channel_scale(dw):
            return False
        prev = _only_input(node)
        if prev is None:
            return False
        conv = self.module(prev)
        if type(conv) not in _CONV_TYPES or conv.out_channels != dw.in_channels or len(prev.users) != 1:
            return False
        if self.not_editable(prev) is not None or self.calls(str(node.target)) != 1:
            return False
        centre = tuple(k // 2 for k in dw.kernel_size)
        scale = dw.weight.detach()[(slice(None), 0, *centre)].double()
        shape = (-1,) + (1,) * (conv.weight.dim() - 1)
        with torch.no_grad():
            conv.weight = _param(conv.weight.double() * scale.view(shape), like=conv.weight)
            bias = conv.bias.double() * scale if conv.bias is not None else torch.zeros_like(scale)
            if dw.bias is not None:
                bias = bias + dw.bias.double()
            if conv.bias is not None or dw.bias is not None:
                conv.bias = _param(bias, like=conv.weight)
        node.replace_all_uses_with(prev)
        self.erase(node)
        self.actions.append(FoldAction("scale", str(node.target), str(prev.target)))
        return True

    # 5. BatchNorm into the preceding conv ------------------------------------------------------------------
    def _batchnorm(self, node: fx.Node) -> bool:
        bn = self.module(node)
        if type(bn) not in _BN_TYPES:
            return False
        path = str(node.target)
        prev = _only_input(node)
        if prev is None:
            return False
        conv = self.module(prev)
        if type(conv) not in _CONV_TYPES or conv.out_channels != bn.num_features:
            return False
        if bn.running_mean is None or bn.running_var is None:
            self.skipped[path] = "BatchNorm without running statistics cannot be folded"
            return False
        if len(prev.users) != 1:
            self.skipped[path] = f"{prev.target}'s output is also read elsewhere"
            return False
        why = self.not_editable(prev) or self.read_directly(path)
        if self.calls(path) != 1:
            why = f"{path} is called more than once"
        if why is not None:
            self.skipped[path] = why
            return False
        with torch.no_grad():
            inv = torch.rsqrt(bn.running_var.double() + bn.eps)
            gamma = bn.weight.double() if bn.weight is not None else torch.ones_like(inv)
            beta = bn.bias.double() if bn.bias is not None else torch.zeros_like(inv)
            factor = gamma * inv
            shape = (-1,) + (1,) * (conv.weight.dim() - 1)
            bias = conv.bias.double() if conv.bias is not None else torch.zeros_like(inv)
            conv.weight = _param(conv.weight.double() * factor.view(shape), like=conv.weight)
            conv.bias = _param((bias - bn.running_mean.double()) * factor + beta, like=conv.weight)
        node.replace_all_uses_with(prev)
        self.erase(node)
        self.actions.append(FoldAction("batchnorm", path, str(prev.target)))
        return True


# -- pattern helpers ---------------------------------------------------------------------------------------
def _match_bypass(block: fx.Node) -> tuple[float, fx.Node, fx.Node] | str:
    """(scale, add node, bypassed layer node) for ``src → block → [mul] → add(layer(src), ·)``, or why not."""
    users = list(block.users)
    if len(users) != 1:
        return "its output is read by more than one node"
    scale = 1.0
    head = users[0]
    if head.op == "call_function" and head.target in (operator.mul, torch.mul):
        found = _scalar(head, block)
        if found is None:
            return "its scale is not a constant"
        scale = found
        if len(head.users) != 1:
            return "its scaled output is read by more than one node"
        head = next(iter(head.users))
    if not (head.op == "call_function" and head.target in (operator.add, torch.add) and len(head.args) == 2
            and not head.kwargs):
        return "its output is not added to a layer's output"
    mine = (block, *block.users)  # fx nodes compare by identity here, never with ``in``/``==``
    first_is_mine = any(head.args[0] is n for n in mine)
    other = head.args[1] if first_is_mine else head.args[0]
    if not (isinstance(other, fx.Node) and other.op == "call_module"):
        return "it is not added to a layer's output"
    if not block.args or len(other.args) != 1 or other.args[0] is not block.args[0] or other.kwargs:
        return f"it does not read the input of {other.target}"
    return scale, head, other


def _only_input(node: fx.Node) -> fx.Node | None:
    """The module call ``node`` reads when it reads exactly one node and nothing else."""
    prev = node.args[0] if len(node.args) == 1 and not node.kwargs else None
    return prev if isinstance(prev, fx.Node) and prev.op == "call_module" else None


def _scalar(mul: fx.Node, block: fx.Node) -> float | None:
    if len(mul.args) != 2 or mul.kwargs:
        return None
    other = mul.args[1] if mul.args[0] is block else mul.args[0]
    if isinstance(other, numbers.Real) and not isinstance(other, bool):
        return float(other)
    if isinstance(other, fx.Node) and other.op == "get_attr":
        value = resolve(mul.graph.owning_module, str(other.target))
        if isinstance(value, torch.Tensor) and value.numel() == 1:
            return float(value.item())
    return None


def _is_channel_scale(m: nn.Module) -> bool:
    """A depthwise conv whose kernel is only its centre tap: it multiplies each channel by one number."""
    if type(m) is not nn.Conv2d or m.groups != m.in_channels or m.in_channels != m.out_channels:
        return False
    if m.stride != (1, 1) or m.dilation != (1, 1) or m.padding_mode != "zeros":
        return False
    if isinstance(m.padding, str) or tuple(m.padding) != tuple(k // 2 for k in m.kernel_size):
        return False
    if any(k % 2 == 0 for k in m.kernel_size):
        return False
    w = m.weight.detach()
    centre = tuple(k // 2 for k in m.kernel_size)
    mask = torch.ones_like(w, dtype=torch.bool)
    mask[(slice(None), 0, *centre)] = False
    return not bool(w[mask].any())


def _param(value: torch.Tensor, like: torch.Tensor) -> nn.Parameter:
    return nn.Parameter(value.to(dtype=like.dtype, device=like.device).contiguous(), requires_grad=False)


def _add_bias(base: nn.Module, delta: torch.Tensor, who: str) -> None:
    bias = getattr(base, "bias", None)
    out = base.weight.shape[0]
    if tuple(delta.shape) != (out,):
        raise ExportError(f"{who} returned a bias of shape {tuple(delta.shape)}, expected ({out},)")
    current = bias.double() if isinstance(bias, torch.Tensor) else torch.zeros_like(delta)
    base.bias = _param(current + delta, like=base.weight)


def _count(gm: nn.Module) -> tuple[int, int]:
    return sum(p.numel() for p in gm.parameters()), sum(b.numel() for b in gm.buffers())


def _remaining(gm: fx.GraphModule, inserted: Iterable[str], folder: _Folder) -> dict[str, str]:
    """peftc blocks still in the graph after folding, with the reason each stayed."""
    called = {str(n.target) for n in gm.graph.nodes if n.op == "call_module"}
    paths = set(inserted) | {p for p, m in gm.named_modules() if _looks_like_block(m)}
    out: dict[str, str] = {}
    for path in sorted(paths):
        if path in folder.replaced or path not in called:
            continue
        out[path] = folder.skipped.get(path, _why_not(gm.get_submodule(path)))
    return out


def _looks_like_block(m: nn.Module) -> bool:
    return isinstance(m, Block)


def _why_not(m: nn.Module) -> str:
    if offers(m, "delta_weight") or offers(m, "folded"):
        return "not in a foldable position"
    return f"{type(m).__name__} defines neither delta_weight nor folded(): it runs as it is"
