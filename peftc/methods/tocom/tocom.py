"""ToCom — the Token Compensator (Jie et al., ECCV 2024; JieShibo/ToCom ``models.py``).

A model fine-tuned with token merging at one degree ``r_src`` loses accuracy when run at another ``r_tgt``.
ToCom is a small plugin, trained once per backbone by self-distillation (:mod:`peftc.methods.tocom.distill`), that
compensates the gap for any pair: on each block's q and v it adds

    Δ = s · up(Δmask ⊙ down(x)),   x = the attention input (the norm1 output)

with ``down: Linear(d, 32, no bias)`` (default init) and ``up: Linear(32, d, no bias)`` (ZERO init), separate
for q and for v; k is untouched. The 32 hidden units are 16 slices of rank 2; slice i models the step from
compression degree i to i+1. ``mask(r)`` is ones on the last ``2r`` units and
``Δmask = mask(r_tgt) − mask(r_src)``: a sum of step plugins, negative when going back to less compression,
exactly zero when ``r_tgt == r_src``. As in the official code a dropout (0.1) sits between ``down`` and the
mask during training.

Attached with the ``parallel`` primitive to the fused ``qkv`` Linear, the block returns a ``(…, 3d)`` delta
whose k third is zero, so the graph reads ``qkv(x) + s·tocom(x)``. There is no non-linearity, so the plugin
is a weight delta: :meth:`ToCom.delta_weight` gives ``U·diag(Δmask)·D`` in rows ``0:d`` (q) and ``2d:3d`` (v)
of the qkv weight, and export's fold merges it (the rule's ``s`` is applied by fold).

``r_src`` and ``r_tgt`` are plain attributes, changed at run time without retraining; :func:`set_compression`
sets the merge degree of the ToMe blocks and the plugins' ``r_tgt`` together.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import fx, nn

from peftc.blocks.contract import Block, acts_as
from peftc.blocks.registry import Site, block_factory
from peftc.errors import PeftcError
from peftc.methods.tocom.args import ToComArgs
from peftc.methods.tome.tome import TokenMerge, set_r, token_merges

__all__ = ["ToCom", "ToComArgs", "compensators", "set_compression", "tocom"]


class ToCom(Block):
    """The q/v compensator of one attention block (see the module docstring)."""

    def __init__(self, features: int, dim: int = 32, slices: int = 16, dropout: float = 0.1, *,
                 r_src: int = 0, r_tgt: int = 0, merge: str | None = None):
        super().__init__()
        if dim % slices:
            raise PeftcError(f"tocom dim {dim} must be a multiple of slices {slices} (equal-rank steps)")
        self.features, self.dim, self.slices = features, dim, slices
        self.rank = dim // slices
        self.q_down = nn.Linear(features, dim, bias=False)
        self.q_up = nn.Linear(dim, features, bias=False)
        self.v_down = nn.Linear(features, dim, bias=False)
        self.v_up = nn.Linear(dim, features, bias=False)
        nn.init.zeros_(self.q_up.weight)
        nn.init.zeros_(self.v_up.weight)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.merge = merge  # path of the TokenMerge of this block (what set_compression follows)
        self.r_src, self.r_tgt = 0, 0
        self.set_r(r_tgt=r_tgt, r_src=r_src)

    def set_r(self, r_tgt: int | None = None, r_src: int | None = None) -> None:
        """Change the compression pair (either or both); each must lie in ``0 .. slices``."""
        for name, value in (("r_tgt", r_tgt), ("r_src", r_src)):
            if value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= self.slices:
                raise PeftcError(f"tocom {name} must be an int in 0..{self.slices}, got {value!r}")
            setattr(self, name, value)

    def mask(self, r: int, device: torch.device | None = None, dtype: torch.dtype | None = None) -> torch.Tensor:
        """``mask(r)``: ones on the last ``rank·r`` hidden units."""
        units = torch.arange(self.dim, device=device)
        return (units >= self.dim - self.rank * r).to(dtype or torch.float32)

    def delta_mask(self, device: torch.device | None = None, dtype: torch.dtype | None = None) -> torch.Tensor:
        """``mask(r_tgt) − mask(r_src)``: +1 on the steps added, −1 on the steps taken back."""
        return self.mask(self.r_tgt, device, dtype) - self.mask(self.r_src, device, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = (*x.shape[:-1], 3 * self.features)
        if self.r_tgt == self.r_src:
            return x.new_zeros(shape)  # Δmask = 0: nothing to compensate
        m = self.delta_mask(x.device, x.dtype)
        dq = self.q_up(self.dropout(self.q_down(x)) * m)
        dv = self.v_up(self.dropout(self.v_down(x)) * m)
        return torch.cat([dq, torch.zeros_like(dq), dv], dim=-1)

    def delta_weight(self, base: nn.Module) -> tuple[torch.Tensor, None]:
        """``ΔW`` of the fused qkv weight (3d × d): ``U_q·diag(Δmask)·D_q`` on top, ``U_v·…`` at the bottom."""
        d = self.features
        if not isinstance(base, nn.Linear) or tuple(base.weight.shape) != (3 * d, d):
            raise NotImplementedError(f"ToCom bypasses a fused qkv Linear({d}, {3 * d}), not {base}")
        w = base.weight
        m = self.delta_mask(w.device, w.dtype)
        out = torch.zeros_like(w)
        out[:d] = (self.q_up.weight * m) @ self.q_down.weight
        out[2 * d:] = (self.v_up.weight * m) @ self.v_down.weight
        return out, None

    def extra_repr(self) -> str:
        return (f"{self.features} -> {self.dim} ({self.slices} slices x rank {self.rank}) -> q,v; "
                f"r_src={self.r_src}, r_tgt={self.r_tgt}")


def _merge_of_block(site: Site) -> tuple[str, TokenMerge] | None:
    """The TokenMerge of the block this qkv belongs to (a merge downstream of it, inside the same block), if any."""
    gm = site.node.graph.owning_module
    if gm is None:
        return None
    seen: set[fx.Node] = set()
    frontier = list(site.node.users)
    found: list[fx.Node] = []
    while frontier:
        node = frontier.pop()
        if node in seen:
            continue
        seen.add(node)
        if node.op == "call_module" and isinstance(gm.get_submodule(str(node.target)), TokenMerge):
            found.append(node)
            continue
        frontier.extend(node.users)
    order = {n: i for i, n in enumerate(site.node.graph.nodes)}
    for node in sorted(found, key=order.__getitem__):
        block = str(node.target).rpartition(".")[0]
        if site.name.startswith(f"{block}."):  # the merge of this very block, not of a later one
            return str(node.target), gm.get_submodule(str(node.target))
    return None


@block_factory("tocom")
def tocom(site: Site, args: ToComArgs) -> ToCom:
    """Token compensator on q and v of a fused qkv Linear (attach with ``parallel``)."""
    base = site.module
    if not acts_as(base, nn.Linear) or base.out_features != 3 * base.in_features:
        raise PeftcError(f"tocom attaches to a fused qkv Linear(d, 3d); {site.name!r} is {base}")
    found = _merge_of_block(site)
    r_tgt = args.r_tgt
    if r_tgt is None:
        r_tgt = found[1].r if found else 0
    if r_tgt > args.slices:
        raise PeftcError(f"tocom models merge degrees 0..{args.slices}, but {site.name!r} runs at r={r_tgt}; "
                         f"use r <= {args.slices} or more slices")
    block = ToCom(base.in_features, args.dim, args.slices, args.dropout, r_src=args.r_src, r_tgt=r_tgt,
                  merge=found[0] if found else None)
    return block.to(device=base.weight.device, dtype=base.weight.dtype)


# -- run-time control --------------------------------------------------------------------------------------
def compensators(model: nn.Module) -> list[ToCom]:
    """The model's ToCom plugins, in graph order."""
    from peftc.methods.tome.tome import _in_graph_order

    return [m for _, m in _in_graph_order(model, ToCom)]  # type: ignore[misc]


def set_compression(model: nn.Module, r_tgt: int | Sequence[int] | None = None, r_src: int | None = None,
                    inflection: float = 0.0) -> None:
    """Run ``model`` at merge degree ``r_tgt`` (ToMe r and ToCom target together), compensating from ``r_src``.

    ``r_tgt`` follows :func:`peftc.methods.tome.tome.set_r` (int, per-layer list, or with ``inflection``); each
    plugin takes the r of the merge in its own block. ``r_src`` is the degree the weights were trained at.
    """
    plugins = compensators(model)
    if not plugins:
        raise PeftcError("this model has no ToCom plugins (compile it with the tocom spec)")
    if r_tgt is not None:
        if token_merges(model):
            set_r(model, r_tgt, inflection)
        elif not isinstance(r_tgt, int):
            raise PeftcError("a per-layer r_tgt needs a model that merges tokens")
    gm = next((m for m in model.modules() if isinstance(m, fx.GraphModule)), model)
    for plugin in plugins:
        target = None
        if plugin.merge is not None and r_tgt is not None:
            target = gm.get_submodule(plugin.merge).r  # the r its own block merges at
        elif r_tgt is not None:
            target = r_tgt if isinstance(r_tgt, int) else 0  # a block that merges nothing under a per-layer r
        plugin.set_r(r_tgt=target, r_src=r_src)
