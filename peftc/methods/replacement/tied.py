"""Layers that own no parameters: Replacement Learning's tied layers (arXiv 2410.01239).

A tied layer computes with ``θ̃ = a·θ_prev + b·θ_next``, where ``θ_prev``/``θ_next`` are the parameters of the
same-path layer in the neighbouring blocks and ``a``, ``b`` are the two learnable scalars of its block
(:class:`TieScalars`). The ``tie`` pass (:mod:`peftc.methods.replacement.tie`) wires everything as graph data flow: the
neighbours' parameters and the scalars are ``get_attr`` nodes passed to the tied layer's call as its ``tie``
keyword. So a tied layer holds *no reference* to another module: every tensor exists once, registered where it
always was, and ``parameters()``, ``state_dict()``, ``.to(device)``, ``deepcopy`` and the task bank (which swaps
tensors by name) all see the model exactly as it is, without double counting.

The layer's own buffers (BatchNorm running statistics) stay its own, under their original names. Its code and
configuration (stride, eps, padding mode, …) come from a *template*: a copy of the original layer without any
tensor, kept out of the module tree so it is never counted, saved or moved.
"""

from __future__ import annotations

import copy
import itertools
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.func import functional_call

from peftc.analysis.paths import has_submodule, resolve
from peftc.blocks.contract import Block, GraphFoldAction

__all__ = ["TieScalars", "TiedLayer", "mix"]


class TieScalars(Block):
    """The two learnable scalars of one tied block: every layer in it uses ``a·θ_prev + b·θ_next``."""

    def __init__(self, a: float = 0.5, b: float = 0.5):
        super().__init__()
        self.a = nn.Parameter(torch.tensor(float(a)))
        self.b = nn.Parameter(torch.tensor(float(b)))

    def forward(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.a, self.b

    @classmethod
    def fold_graph(cls, gm: fx.GraphModule) -> list[GraphFoldAction]:
        """At inference ``a·θ_prev + b·θ_next`` is a constant: materialise it once (see :func:`untie`)."""
        return untie(gm)

    def extra_repr(self) -> str:
        return f"a={self.a.item():.4g}, b={self.b.item():.4g}"


class _Mix(torch.autograd.Function):
    """``a·prev + b·next`` with the least weight traffic the mix allows: forward one product and one fused
    multiply-add; backward ``a·g``, ``b·g`` and the scalars' gradients as dot products ``⟨g, prev⟩``, ``⟨g, next⟩``
    (autograd's own graph of ``a * prev + b * next`` writes four weight-sized products and sums two of them). A
    neighbour read for both terms (``edge: reflect``) gets ``(a + b)·g`` once."""

    @staticmethod
    def forward(ctx: Any, a: torch.Tensor, b: torch.Tensor, prev: torch.Tensor, nxt: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(a, b, prev, nxt)
        return torch.mul(prev, a).addcmul_(nxt, b)

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        a, b, prev, nxt = ctx.saved_tensors
        need_a, need_b, need_prev, need_next = ctx.needs_input_grad
        flat = g.reshape(-1)
        ga = torch.dot(flat, prev.reshape(-1)).reshape(a.shape) if need_a else None
        gb = torch.dot(flat, nxt.reshape(-1)).reshape(b.shape) if need_b else None
        if prev is nxt and need_prev:
            return ga, gb, g * (a + b), None
        return ga, gb, g * a if need_prev else None, g * b if need_next else None


def mix(a: torch.Tensor, b: torch.Tensor, prev: torch.Tensor, nxt: torch.Tensor) -> torch.Tensor:
    """``a·prev + b·next``: one tied tensor (also used directly for parameters read outside any layer). Under
    autograd it is one :class:`_Mix` node; without gradients (inference, folding, export) plain tensor ops."""
    if torch.is_grad_enabled() and any(t.requires_grad for t in (a, b, prev, nxt)):
        return _Mix.apply(a, b, prev, nxt)
    return torch.mul(prev, a).addcmul_(nxt, b)


def _forward_with(t: nn.Module, params: dict[str, torch.Tensor], buffers: dict[str, Any], args: Any,
                  kwargs: dict[str, Any]) -> Any:
    """``t(*args, **kwargs)`` with ``params`` and ``buffers`` in its (tensorless) slots for the call: what
    ``functional_call`` does for a module without submodule tensors, without its per-call reparametrisation
    (~0.1 ms a call; BatchNorm, GroupNorm and library layers of a tied block take this path every step)."""
    own_params, own_buffers = t._parameters, t._buffers
    t._parameters, t._buffers = {**own_params, **params}, {**own_buffers, **buffers}  # type: ignore[assignment]
    try:
        return t(*args, **kwargs)
    finally:
        t._parameters, t._buffers = own_params, own_buffers


def _tensorless_copy(module: nn.Module) -> nn.Module:
    """A deep copy of ``module`` whose parameter and buffer slots are all ``None`` (code and config only)."""
    memo: dict[int, Any] = {id(t): None for t in itertools.chain(module.parameters(), module.buffers())}
    return copy.deepcopy(module, memo)


class TiedLayer(Block):
    """A layer whose parameters are mixed from its neighbours' at every call.

    Called as ``layer(*original_args, tie=(a, b, prev_0, next_0, prev_1, next_1, …), **original_kwargs)``,
    the pairs following ``names`` (the original layer's parameter names, e.g. ``("weight", "bias")``). Plain
    ``Linear``, ``Conv1d/2d/3d`` and ``LayerNorm`` take a direct functional path; every other layer
    (BatchNorm, GroupNorm, library subclasses, …) runs its own ``forward`` with the mixed parameters and this
    module's buffers put into its template for the call (:func:`torch.func.functional_call` when some tensor
    belongs to a submodule of the layer).
    """

    _peftc_leaf = True  # stays one node if a compiled model is traced again

    def __init__(self, original: nn.Module, names: Sequence[str]):
        super().__init__()
        nested = [n for n, _ in original.named_buffers() if "." in n]
        if nested:
            raise ValueError(f"cannot tie a {type(original).__name__} with buffers in submodules ({nested[0]})")
        self.names = tuple(names)
        self.kind = type(original).__name__
        for name, buf in original.named_buffers(recurse=False):  # running stats: still this layer's own
            self.register_buffer(name, buf, persistent=name not in original._non_persistent_buffers_set)
        self.__dict__["template"] = _tensorless_copy(original)  # not a submodule: never counted or moved
        self._flat = "." not in "".join(self.names)  # every tensor is the template's own: no functional_call

    def _mixed(self, tie: Sequence[torch.Tensor]) -> dict[str, torch.Tensor]:
        if len(tie) != 2 + 2 * len(self.names):
            raise ValueError(f"tie expects (a, b) and a (prev, next) pair for each of {self.names}, got {len(tie)}")
        a, b = tie[0], tie[1]
        return {name: mix(a, b, tie[2 + 2 * i], tie[3 + 2 * i]) for i, name in enumerate(self.names)}

    def forward(self, *args: Any, tie: Sequence[torch.Tensor], **kwargs: Any) -> Any:
        t = self.template
        p = self._mixed(tie)
        kind = type(t)
        if kind is nn.Linear and not kwargs:
            return F.linear(args[0], p["weight"], p.get("bias"))
        if kind in (nn.Conv1d, nn.Conv2d, nn.Conv3d) and not kwargs:
            return t._conv_forward(args[0], p["weight"], p.get("bias"))
        if kind is nn.LayerNorm and not kwargs:
            return F.layer_norm(args[0], t.normalized_shape, p.get("weight"), p.get("bias"), t.eps)
        if t.training != self.training:
            t.train(self.training)
        if self._flat:
            return _forward_with(t, p, self._buffers, args, kwargs)
        return functional_call(t, {**p, **dict(self.named_buffers())}, args, kwargs, tie_weights=False)

    def plain(self, tie: Sequence[torch.Tensor]) -> nn.Module:
        """The original layer again, owning copies of the mixed parameters and of this layer's buffers.

        For deployment (:mod:`peftc.export.fold`): at inference ``a·prev + b·next`` is a constant, so the tied
        layer can be the plain layer it replaced and cost exactly what it did.
        """
        layer = copy.deepcopy(self.template)
        with torch.no_grad():
            tensors = {**self._mixed(tie), **dict(self.named_buffers())}
            for name, value in tensors.items():
                owner_path, _, attr = name.rpartition(".")
                owner = layer.get_submodule(owner_path)
                if attr in owner._parameters:
                    owner._parameters[attr] = nn.Parameter(value.detach().clone(), requires_grad=False)
                else:
                    owner._buffers[attr] = value.detach().clone()
        return layer.train(self.training)

    def extra_repr(self) -> str:
        return f"{self.kind}: {', '.join(self.names)} = a·prev + b·next"


def untie(gm: fx.GraphModule) -> list[GraphFoldAction]:
    """Every tied layer of ``gm`` becomes the plain layer it replaced, owning the mixed tensors; a tied parameter
    read outside any layer becomes a parameter of its own. Afterwards no layer reads its neighbours' tensors, so
    the neighbours are editable for later merges (a BatchNorm folded into a neighbour's conv no longer changes
    what the tied layer computes: it owns its own copy). The mixing scalars are then unused and leave."""
    actions: list[GraphFoldAction] = []
    done: set[str] = set()
    for node in list(gm.graph.nodes):
        if node.op == "call_module" and isinstance(gm.get_submodule(str(node.target)), TiedLayer) \
                and "tie" in node.kwargs:
            path = str(node.target)
            if path not in done:  # a layer called twice is materialised once
                tensors = [resolve(gm, str(n.target)) for n in node.kwargs["tie"]]
                gm.set_submodule(path, gm.get_submodule(path).plain(tensors).eval())
                done.add(path)
                actions.append(GraphFoldAction("tied", path, path))
            node.kwargs = {k: v for k, v in node.kwargs.items() if k != "tie"}
        elif node.op == "call_function" and node.target is mix:
            with torch.no_grad():
                value = mix(*(resolve(gm, str(n.target)) for n in node.args))
            name = str(node.meta.get("peftc_tied", "tied"))  # the parameter the tie pass replaced
            owner_path, _, attr = name.rpartition(".")
            owner = gm.get_submodule(owner_path) if has_submodule(gm, owner_path) else gm
            while hasattr(owner, attr):
                attr += "_"
            owner.register_parameter(attr, nn.Parameter(value.detach().clone(), requires_grad=False))
            target = f"{owner_path}.{attr}" if owner is not gm else attr
            with gm.graph.inserting_before(node):
                read = gm.graph.get_attr(target)
            node.replace_all_uses_with(read)
            gm.graph.erase_node(node)
            actions.append(GraphFoldAction("tied", name, target))
    return actions
