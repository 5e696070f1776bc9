"""VeRA — vector-based random matrix adaptation (Kopiczko et al., arXiv 2310.11454), for Linear layers.

One pair of frozen random matrices is shared by every adapted layer: ``A`` (r × in) and ``B`` (out × r), sized
for the largest layer and sliced per layer, as HF PEFT's ``VeraModel`` does. Each layer trains only two vectors,
``d ∈ R^r`` (init ``d_initial``, 0.1) and ``b ∈ R^out`` (init 0), and adds

    Δy = b ⊙ B[:out] (d ⊙ A[:, :in] x)

so the compiled model equals the backbone until trained, and a layer costs ``r + out`` trainable parameters.
``A`` and ``B`` are drawn with a ``torch.Generator`` seeded by ``seed`` (PEFT's ``projection_prng_key``) in PEFT's
order and kaiming-uniform bounds, so at the same seed they are PEFT's matrices bit for bit.

The block contract does the bookkeeping: the projections are ``shared_state`` — one copy for all layers and
all tasks, stored once in the artifact — while ``d`` and ``b`` are the per-task state; ``delta_weight`` folds
``diag(b) B diag(d) A`` into the frozen weight for deployment.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from peftc.blocks.contract import Block, acts_as
from peftc.blocks.registry import Site, block_factory
from peftc.errors import PeftcError
from peftc.methods.vera.args import VeraArgs

__all__ = ["Vera", "VeraArgs", "VeraProjections", "vera"]


def _kaiming_uniform(shape: tuple[int, int], generator: torch.Generator) -> torch.Tensor:
    """Kaiming-uniform with gain √2 over the fan-in (``shape[1]``), drawn from ``generator`` (PEFT's init)."""
    bound = math.sqrt(3.0) * math.sqrt(2.0) / math.sqrt(shape[1])
    return torch.empty(shape).uniform_(-bound, bound, generator=generator)


class VeraProjections(nn.Module):
    """The frozen random ``A`` (r × in) and ``B`` (out × r) every VeRA layer of a model slices."""

    def __init__(self, rank: int, seed: int):
        super().__init__()
        self.rank = rank
        self.seed = seed
        self.register_buffer("A", torch.empty(rank, 0))
        self.register_buffer("B", torch.empty(0, rank))

    def fit(self, in_features: int, out_features: int, like: torch.Tensor) -> None:
        """Make ``A`` and ``B`` large enough for a layer; they are redrawn for the largest layer seen so far
        (the same seed and order, so the final pair does not depend on the order layers were adapted in)."""
        need_in, need_out = max(in_features, self.A.shape[1]), max(out_features, self.B.shape[0])
        if (need_in, need_out) == (self.A.shape[1], self.B.shape[0]):
            return
        generator = torch.Generator().manual_seed(self.seed)
        a = _kaiming_uniform((self.rank, need_in), generator)
        b = _kaiming_uniform((need_out, self.rank), generator)
        self.A = a.to(device=like.device, dtype=like.dtype)
        self.B = b.to(device=like.device, dtype=like.dtype)

    def extra_repr(self) -> str:
        return f"r={self.rank}, A={tuple(self.A.shape)}, B={tuple(self.B.shape)}, seed={self.seed}"


class Vera(Block):
    """``b ⊙ B[:out] (d ⊙ A[:, :in] dropout(x))`` for one Linear of ``in_features → out_features``."""

    shared_state = ("projections.*",)  # the random A and B: one copy for every layer and every task

    def __init__(self, projections: VeraProjections, in_features: int, out_features: int, d_initial: float = 0.1,
                 dropout: float = 0.0):
        super().__init__()
        self.projections = projections
        self.in_features, self.out_features = in_features, out_features
        rank = projections.rank
        like = projections.A
        self.lambda_d = nn.Parameter(torch.full((rank,), float(d_initial), device=like.device, dtype=like.dtype))
        self.lambda_b = nn.Parameter(torch.zeros(out_features, device=like.device, dtype=like.dtype))
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def _sliced(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.projections.A[:, : self.in_features], self.projections.B[: self.out_features, :]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = self._sliced()
        return self.lambda_b * F.linear(self.lambda_d * F.linear(self.dropout(x), a), b)

    def delta_weight(self, base: nn.Module) -> tuple[torch.Tensor, None]:
        """``diag(b) B diag(d) A`` in the bypassed Linear's weight shape (no bias change)."""
        if not isinstance(base, nn.Linear) or tuple(base.weight.shape) != (self.out_features, self.in_features):
            raise NotImplementedError(f"this VeRA block does not bypass {base}")
        a, b = self._sliced()
        return (self.lambda_b.unsqueeze(-1) * b) @ (self.lambda_d.unsqueeze(-1) * a), None

    def extra_repr(self) -> str:
        return f"{self.in_features} -> r={self.projections.rank} -> {self.out_features}"


@block_factory("vera")
def vera(site: Site, args: VeraArgs) -> Vera:
    """Trainable vectors d, b around frozen random projections shared by every adapted Linear (VeRA)."""
    base = site.module
    if not acts_as(base, nn.Linear):
        kind = type(base).__name__ if base is not None else "an operation"
        raise PeftcError(f"VeRA bypasses a Linear (or a block standing for one); {site.name!r} is {kind}")
    projections = site.shared.get("projections")
    if projections is None or (projections.rank, projections.seed) != (args.rank, args.seed):
        if projections is not None:
            raise PeftcError("every VeRA layer of a model shares one projection pair: give them one rank and seed")
        projections = site.shared["projections"] = VeraProjections(args.rank, args.seed)
    projections.fit(base.in_features, base.out_features, next(base.parameters()))
    return Vera(projections, base.in_features, base.out_features, args.d_initial, args.dropout)
