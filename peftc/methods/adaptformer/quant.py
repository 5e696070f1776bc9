"""The standardised weight quantiser of binary adapters (JieShibo/PETL-ViT, ``binary_adapter/utils.py``), its
straight-through estimator, bit packing, and the artifact codec that stores quantised tensors packed.

**Quantiser.** Each weight tensor is standardised by its own mean μ and (unbiased) std σ,
``z = (W − μ) / (σ + 1e-5)``, rounded to the nearest level of a fixed code book, and mapped back:
``W_q = μ + σ · level(z)``. The code book for ``b`` bits is the reference's fixed point: thresholds are the
midpoints between neighbouring levels and every level is the *median* of its cell under N(0, 1)
(``level = Φ⁻¹`` of the cell's mid probability). For 1 bit that gives ±0.6745 = ±Φ⁻¹(0.75) with threshold 0;
for 2 bits ±0.3778, ±1.2657 with thresholds 0, ±0.8217. (These are *not* the Lloyd-Max levels, which use
the cell's conditional mean: ±0.7979 for 1 bit; ±0.4528, ±1.5104 with thresholds ±0.9816 for 2 bits. The
reference code and the method card use the median levels, so peftc does too.) A value exactly on a threshold
goes to the upper level (the reference's ``sign`` would give the midpoint there, a measure-zero difference
that would break the one-code-per-weight storage). 32 bits is the identity.

**Training.** The rounding is a straight-through estimator: its gradient is the identity, and μ and σ stay
in the autograd graph, exactly as in the reference (``q(w).data + w − w.data`` on the standardised weight).

**Storage.** A quantised tensor is stored as ``⌈numel · bits / 8⌉`` bytes of codes (``8 / bits`` codes per
byte, first code in the lowest bits) plus μ and σ as float32: 1-bit ``Linear(768, 32)`` = 3,072 + 8 bytes.

**Exact reload.** Re-quantising a decoded tensor does not give it back (its own mean and std differ from the
stored μ, σ), so a module that loaded codes remembers their (μ, σ) and uses a weight *as is* while it lies
exactly on one of those grids — a value test, so it follows the tensor through task switches, ``deepcopy`` and
device moves, and needs no branch on data (``torch.where``), so tracing and export work. Training moves the
weight off the grid and quantisation-aware training resumes from the decoded values.

**Codec protocol.** A module declares ``packed_bits`` (local parameter name → bits) and implements
``pack(name, tensor) -> Packed`` and ``unpack(name, packed) -> Tensor``. :func:`encode_delta` and
:func:`decode_delta` apply it to an artifact's tensors, whatever block the module belongs to.
"""

from __future__ import annotations

import math
from functools import cache
from itertools import pairwise
from statistics import NormalDist
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from peftc.blocks.contract import Block
from peftc.errors import PeftcError
from peftc.storage.codec import Packed, pack_codes, unpack_codes

__all__ = ["EPS", "SUPPORTED_BITS", "QuantLinear", "dequantize", "levels", "pack", "quantize", "thresholds", "unpack"]

EPS = 1e-5  # added to σ when standardising, as in the reference
SUPPORTED_BITS = (1, 2, 4, 8, 32)


def _check_bits(bits: int) -> None:
    if bits not in SUPPORTED_BITS:
        raise PeftcError(f"bits must be one of {', '.join(map(str, SUPPORTED_BITS))}, got {bits!r}")


@cache
def _code_book(bits: int) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """(levels, thresholds) of the median-level code book for ``bits`` < 32, by fixed-point iteration."""
    normal = NormalDist()
    n = 2**bits
    values = [normal.inv_cdf((i + 0.5) / n) for i in range(n)]  # equal-probability start
    for _ in range(10_000):
        cuts = [(a + b) / 2 for a, b in pairwise(values)]
        edges = [0.0, *(normal.cdf(c) for c in cuts), 1.0]
        new = [normal.inv_cdf((a + b) / 2) for a, b in pairwise(edges)]
        done = max(abs(a - b) for a, b in zip(new, values, strict=True)) < 1e-13
        values = new
        if done:
            break
    values = [(v - w) / 2 for v, w in zip(values, reversed(values), strict=True)]  # exact symmetry
    return tuple(values), tuple((a + b) / 2 for a, b in pairwise(values))


def levels(bits: int) -> tuple[float, ...]:
    """The standardised code levels, ascending: ``levels(1) == (-0.6745, 0.6745)`` (to float precision)."""
    _check_bits(bits)
    if bits == 32:
        raise PeftcError("32 bits is not quantised; it has no code levels")
    return _code_book(bits)[0]


def thresholds(bits: int) -> tuple[float, ...]:
    """The decision thresholds between neighbouring levels, ascending."""
    levels(bits)
    return _code_book(bits)[1]


def _book(bits: int, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    lv, th = _code_book(bits)
    return (torch.tensor(lv, dtype=like.dtype, device=like.device),
            torch.tensor(th, dtype=like.dtype, device=like.device))


def _codes(z: torch.Tensor, bits: int) -> torch.Tensor:
    """Level index of each standardised value (a value on a threshold goes up)."""
    _, th = _book(bits, z)
    return torch.bucketize(z, th, right=True)


def dequantize(level_values: torch.Tensor, mu: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """``μ + σ · level`` — the one place it is computed, so training and reloading agree bit for bit."""
    return level_values * sigma + mu


class _RoundToLevels(torch.autograd.Function):
    """Forward: the nearest code level; backward: the identity (straight-through estimator)."""

    @staticmethod
    def forward(ctx: Any, z: torch.Tensor, bits: int) -> torch.Tensor:  # type: ignore[override]
        lv, _ = _book(bits, z)
        return lv[_codes(z, bits)]

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:  # type: ignore[override]
        return grad, None


def _stats(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return w.mean(), w.std()


def quantize(w: torch.Tensor, bits: int) -> torch.Tensor:
    """``μ + σ · level((w − μ) / (σ + ε))`` with a straight-through gradient; ``bits == 32`` returns ``w``."""
    _check_bits(bits)
    if bits == 32:
        return w
    mu, sigma = _stats(w)
    q = _RoundToLevels.apply((w - mu) / (sigma + EPS), bits)
    return dequantize(q, mu, sigma)


def _on_grid(w: torch.Tensor, bits: int, mu: float, sigma: float) -> torch.Tensor:
    """A 0-dim bool tensor: is ``w`` exactly the decoded grid ``μ + σ · level`` of these stored stats?"""
    mu_t = torch.tensor(mu, dtype=w.dtype, device=w.device)
    sigma_t = torch.tensor(sigma, dtype=w.dtype, device=w.device)
    lv, _ = _book(bits, w)
    idx = _codes((w.detach() - mu_t) / (sigma_t + EPS), bits)
    return (dequantize(lv[idx], mu_t, sigma_t) == w.detach()).all()


# -- packing -------------------------------------------------------------------------------------------------


def pack(w: torch.Tensor, bits: int, known: tuple[tuple[float, float], ...] = ()) -> Packed:
    """The storage form of ``quantize(w, bits)``; ``known`` = stats of grids ``w`` may already lie on."""
    _check_bits(bits)
    if bits == 32:
        raise PeftcError("32-bit tensors are stored as float32, not packed")
    w = w.detach().float()
    for mu, sigma in known:
        if bool(_on_grid(w, bits, mu, sigma)):
            idx = _codes((w - mu) / (sigma + EPS), bits)
            return Packed(pack_codes(idx, bits), mu, sigma, bits, tuple(w.shape))
    mu_t, sigma_t = _stats(w)
    idx = _codes((w - mu_t) / (sigma_t + EPS), bits)
    return Packed(pack_codes(idx, bits), float(mu_t), float(sigma_t), bits, tuple(w.shape))


def unpack(p: Packed) -> torch.Tensor:
    """The float32 tensor a :class:`Packed` stands for, equal bit for bit to what the forward pass used."""
    numel = math.prod(p.shape)
    if p.codes.dtype != torch.uint8 or p.codes.numel() != math.ceil(numel * p.bits / 8):
        raise PeftcError(f"packed codes do not fit a {p.bits}-bit tensor of shape {list(p.shape)}")
    lv = torch.tensor(levels(p.bits), dtype=torch.float32)
    idx = unpack_codes(p.codes.cpu(), p.bits, numel)
    mu = torch.tensor(p.mu, dtype=torch.float32)
    sigma = torch.tensor(p.sigma, dtype=torch.float32)
    return dequantize(lv[idx], mu, sigma).reshape(p.shape)


# -- the quantised linear layer ------------------------------------------------------------------------------


class QuantLinear(Block):
    """``y = x Wᵀ (+ b)`` with ``W`` quantised to ``bits`` in the forward pass (straight-through in training).

    Deliberately not an ``nn.Linear`` subclass: code that folds or rewrites Linear layers by reading
    ``.weight`` must not mistake the latent weight for the one the layer computes with. The bias, if any, is
    never quantised. ``bits=32`` is a plain linear layer.
    """

    def __init__(self, in_features: int, out_features: int, bits: int = 32, bias: bool = False):
        super().__init__()
        _check_bits(bits)
        self.in_features = in_features
        self.out_features = out_features
        self.bits = bits
        self.weight = nn.Parameter(torch.empty(out_features, in_features))
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None
        self.decoded_stats: list[tuple[float, float]] = []  # (μ, σ) of every grid loaded from an artifact
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))  # nn.Linear's default

    def packed_bits(self) -> dict[str, int]:
        return {"weight": self.bits} if self.bits < 32 else {}

    def quantized_weight(self) -> torch.Tensor:
        """The weight the layer computes with."""
        w = self.weight
        if self.bits == 32:
            return w
        out = quantize(w, self.bits)
        for mu, sigma in self.decoded_stats:
            out = torch.where(_on_grid(w, self.bits, mu, sigma), w, out)
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.quantized_weight(), self.bias)

    def pack(self, name: str, tensor: torch.Tensor) -> Packed:
        return pack(tensor, self.packed_bits()[name], tuple(self.decoded_stats))

    def unpack(self, name: str, packed: Packed) -> torch.Tensor:
        if packed.bits != self.packed_bits().get(name):
            raise PeftcError(f"{name} is stored at {packed.bits} bits, the layer quantises to {self.bits}")
        if (packed.mu, packed.sigma) not in self.decoded_stats:
            self.decoded_stats.append((packed.mu, packed.sigma))
        return unpack(packed)

    def extra_repr(self) -> str:
        return f"{self.in_features}, {self.out_features}, bits={self.bits}, bias={self.bias is not None}"
