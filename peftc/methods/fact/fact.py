"""FacT — Factor-Tuning (JieShibo/PETL-ViT, ``FacT/fact_tt.py`` and ``FacT/fact_tk.py``).

Every bypassed weight's update is factorised through two matrices **shared by all layers**,
``U = Linear(d, r)`` (default init) and ``V = Linear(r, d)`` (zero init, so the model equals the backbone at
init), and a small per-layer core Σ: ``ΔW = V Σ U``, with dropout between the core and ``V``.

* **FacT-TT** — per layer, cores ``q, k, v, proj: r × r``; ``fc1: r → m·r``; ``fc2: m·r → r``
  (``nn.Linear`` default init; m = the MLP ratio, 4 in ViTs): ``1536 r + 144 r²`` parameters on ViT-B.
* **FacT-TK** — one core tensor ``C: r × r × r`` and ``P: r × 12·depth`` (both xavier), shared; the core of
  layer ``i``'s slot ``j`` is ``C · P[:, 12 i + j]`` with slots q, k, v, proj, fc1 ×4, fc2 ×4:
  ``1536 r + 144 r + r³`` on ViT-B.

Applied as ``parallel`` bypasses on ``qkv`` (q, k, v parts of the fused projection; where a model splits them —
three same-shape Linears reading the attention's input — each gets its own part's core), ``attn_proj``,
``mlp_fc1`` and ``mlp_fc2``. fc1's ``m·r`` core output is read as ``m`` groups of ``r``, each mapped by ``V``
to one ``d``-slice of the hidden layer; fc2's input is read as ``m`` slices of ``d``, each mapped by ``U``.

**Sharing.** The first FacT block of a compilation creates a :class:`FactFactors` module and leaves it in
:attr:`Site.shared` under its ``group`` and width ``d``; every later FacT block of that group and width reuses the
same module, so U, V (and TK's C, P) are one set of tensors — counted, trained and saved once. A hierarchical
transformer (Swin, MaxViT) widens stage by stage: each width is its own factor group.

**Folding.** The bypass is linear in its input: :meth:`Fact.delta_weight` gives ``ΔW`` in the bypassed layer's
weight shape, without the rule's scale (the graph's ``mul`` node carries it); dropout is the identity there,
as in evaluation.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import fx, nn

from peftc.blocks.contract import Block
from peftc.blocks.registry import Site, block_factory
from peftc.errors import PeftcError
from peftc.methods.fact.args import FactArgs

__all__ = ["Fact", "FactArgs", "FactFactors"]

TK_SLOTS = {"qkv": (0, 3), "proj": (3, 4), "fc1": (4, 8), "fc2": (8, 12)}  # columns of P per block (m = 4)
TK_PER_BLOCK = 12


class FactFactors(nn.Module):
    """What all layers share: ``U``, ``V`` and, for FacT-TK, the core tensor ``C`` and slot matrix ``P``."""

    def __init__(self, features: int, rank: int, variant: str, depth: int | None):
        super().__init__()
        self.features = features
        self.rank = rank
        self.variant = variant
        self.depth = depth
        self.U = nn.Linear(features, rank, bias=False)
        self.V = nn.Linear(rank, features, bias=False)
        nn.init.zeros_(self.V.weight)
        if variant == "tk":
            if depth is None:
                raise PeftcError("FacT-TK needs the layers to sit in a run of repeated blocks (to size P)")
            self.C = nn.Parameter(torch.empty(rank, rank, rank))
            self.P = nn.Parameter(torch.empty(rank, TK_PER_BLOCK * depth))
            nn.init.xavier_uniform_(self.C)
            nn.init.xavier_uniform_(self.P)

    def describe(self) -> str:
        return f"variant={self.variant}, rank={self.rank}, features={self.features}, depth={self.depth}"

    def extra_repr(self) -> str:
        return self.describe()


class Fact(Block):
    """One FacT bypass ``V(dropout(Σ U x))`` for one bypassed layer (``part``) of one transformer block."""

    def __init__(
        self, factors: FactFactors, part: str, *, layer: int = 0, groups: int = 4, dropout: float = 0.1,
        slot: int | None = None,
    ):
        super().__init__()
        self.factors = factors
        self.part = part
        self.layer = layer
        self.groups = groups  # m: hidden = m · d for fc1/fc2
        self.slot = slot  # a split q/k/v projection (EVA with qkv_fused=False): 0, 1 or 2; None for a fused qkv
        self.dropout = nn.Dropout(dropout)
        r = factors.rank
        if factors.variant == "tt":
            m = groups
            shapes = {"qkv": [(r, r)] * (3 if slot is None else 1), "proj": [(r, r)], "fc1": [(r, m * r)],
                      "fc2": [(m * r, r)]}
            self.cores = nn.ModuleList(nn.Linear(i, o, bias=False) for i, o in shapes[part])
        elif groups != 4 and part in ("fc1", "fc2"):
            raise PeftcError(f"FacT-TK's P has 4 fc1 and 4 fc2 slots per block; this MLP's ratio is {groups}")

    # -- the per-layer cores, as Linear weights (out × in) ---------------------------------------------------
    def core_weights(self) -> list[torch.Tensor]:
        """Σ of this layer in ``F.linear`` form: 3 for qkv (q, k, v), else 1 (fc1: m·r × r, fc2: r × m·r)."""
        if self.factors.variant == "tt":
            return [core.weight for core in self.cores]
        f = self.factors
        start, stop = TK_SLOTS[self.part]
        if self.slot is not None:
            start, stop = start + self.slot, start + self.slot + 1
        cols = f.P[:, TK_PER_BLOCK * self.layer + start: TK_PER_BLOCK * self.layer + stop]
        slots = f.C @ cols  # r × r × slots: slot j's core is C · P[:, j]
        if self.part in ("qkv", "proj"):
            return [slots[:, :, j].t() for j in range(stop - start)]  # x U^T @ M  ==  F.linear(x U^T, M^T)
        mat = slots.reshape(f.rank, (stop - start) * f.rank)  # the reference's reshape (r, r, 4) -> (r, 4r)
        return [mat.t()] if self.part == "fc1" else [mat]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        U, V = self.factors.U, self.factors.V
        cores = self.core_weights()
        if self.part == "fc2":
            lead = x.shape[:-1]
            u = U(x.reshape(*lead, self.groups, self.factors.features))
            u = u.reshape(*lead, self.groups * self.factors.rank)
            return V(self.dropout(F.linear(u, cores[0])))
        u = U(x)
        if self.part == "fc1":
            t = self.dropout(F.linear(u, cores[0]))
            t = V(t.reshape(*t.shape[:-1], self.groups, self.factors.rank))
            return t.reshape(*t.shape[:-2], self.groups * self.factors.features)
        return torch.cat([V(self.dropout(F.linear(u, core))) for core in cores], dim=-1)

    def delta_weight(self, base: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The change this bypass makes to ``base``'s weight (no scale; dropout off), and no bias change."""
        U, V = self.factors.U.weight, self.factors.V.weight
        cores = self.core_weights()
        r, m = self.factors.rank, self.groups
        if self.part == "fc1":
            delta = torch.cat([V @ cores[0][j * r:(j + 1) * r] @ U for j in range(m)], dim=0)
        elif self.part == "fc2":
            delta = torch.cat([V @ cores[0][:, j * r:(j + 1) * r] @ U for j in range(m)], dim=1)
        else:
            delta = torch.cat([V @ core @ U for core in cores], dim=0)
        weight = getattr(base, "weight", None)
        if not isinstance(weight, torch.Tensor) or weight.shape != delta.shape:
            got = tuple(weight.shape) if isinstance(weight, torch.Tensor) else None
            raise NotImplementedError(f"FacT {self.part} delta is {tuple(delta.shape)}, the weight {got}")
        return delta.to(weight.dtype), None

    def extra_repr(self) -> str:
        part = self.part if self.slot is None else "qkv"[self.slot]
        return f"part={part}, layer={self.layer}, {self.factors.describe()}"


def _features(site: Site, part: str) -> tuple[int, int]:
    """(d, m) from the bypassed Linear: qkv d → 3d, proj d → d, fc1 d → m·d, fc2 m·d → d."""
    module = site.module
    if not isinstance(module, nn.Linear):
        raise PeftcError(f"FacT bypasses Linear layers; {site.name!r} is {type(module).__name__}")
    i, o = module.in_features, module.out_features
    d, big = (o, i) if part == "fc2" else (i, o)
    expect = {"qkv": 3 * d if _split_slot(site) is None else d, "proj": d}.get(part)
    if expect is not None and big != expect:
        raise PeftcError(f"{site.name!r} ({i} -> {o}) is not shaped like a transformer {part} layer")
    if big % d:
        raise PeftcError(f"FacT reads {part}'s hidden side as m blocks of d = {d}; {site.name!r} maps {i} -> {o}, "
                         f"an MLP ratio of {big / d:.3g} (a gated MLP such as SwiGLU), not a whole number")
    return d, big // d


def _split_slot(site: Site) -> int | None:
    """Which of q, k, v a square projection is when the model splits them: the three same-shape Linears reading
    the attention's input, in graph order (None for anything else, a fused qkv)."""
    module = site.module
    first = site.node.args[0] if site.node.args else None
    if not isinstance(module, nn.Linear) or module.in_features != module.out_features or not isinstance(
            first, fx.Node):
        return None
    gm = site.node.graph.owning_module
    order = {n: i for i, n in enumerate(site.node.graph.nodes)}
    peers = sorted((u for u in first.users if u.op == "call_module" and isinstance(
        gm.get_submodule(str(u.target)), nn.Linear) and gm.get_submodule(str(u.target)).weight.shape ==
        module.weight.shape), key=order.__getitem__)
    return peers.index(site.node) if len(peers) == 3 and site.node in peers else None


@block_factory("fact")
def fact(site: Site, args: FactArgs) -> Fact:
    """FacT bypass on one qkv/proj/fc1/fc2 Linear; U, V (and TK's C, P) shared by all blocks of a group."""
    d, m = _features(site, args.part)
    depth = site.block[2] if site.block else None
    by_width = site.shared.setdefault(args.group, {})  # one set of factors per width: a hierarchical model's stages
    factors = by_width.get(d)
    if factors is None:
        factors = by_width[d] = FactFactors(d, args.rank, args.variant, depth)
    elif (factors.rank, factors.variant) != (args.rank, args.variant) or (
        args.variant == "tk" and factors.depth != depth
    ):
        raise PeftcError(
            f"FacT group {args.group!r} already has {factors.describe()}; {site.name!r} asks for "
            f"variant={args.variant}, rank={args.rank}, features={d}, depth={depth} (use another group)"
        )
    layer = site.block[1] if site.block else 0
    groups = m if args.part in ("fc1", "fc2") else 4
    slot = _split_slot(site) if args.part == "qkv" else None
    return Fact(factors, args.part, layer=layer, groups=groups, dropout=args.dropout, slot=slot)
