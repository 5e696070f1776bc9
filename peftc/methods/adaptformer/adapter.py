"""The AdaptFormer bottleneck adapter, full precision or binary (JieShibo/PETL-ViT,
``binary_adapter/adaptformer.py``).

``adapter(x) = up(dropout(relu(down(x))))`` with bias-free ``down: d → dim`` and ``up: dim → d``. AdaptFormer
adds it, scaled, to the MLP output while reading the residual stream after attention (no layer norm):
``x = x + mlp(LN2 x) + s · adapter(x)`` — in a spec, a ``parallel`` rule from ``attn_residual`` to
``mlp_out``.

Both weights go through the standardised quantiser of :mod:`peftc.methods.adaptformer.quant` at ``bits`` (32 = none).
Init follows the reference: ``down`` keeps ``nn.Linear``'s default; at 32 bits ``up`` is zero, so the model
equals the backbone at init; quantised, ``up`` is ``trunc_normal(std=1e-3, ±2e-3)`` — a zero tensor would have
σ = 0 and quantise to a constant, so binary adapters start near, not at, the backbone.
"""

from __future__ import annotations

import torch
from torch import nn

from peftc.blocks.contract import Block
from peftc.blocks.registry import Site, block_factory
from peftc.methods.adaptformer.args import AdapterArgs
from peftc.methods.adaptformer.quant import QuantLinear

__all__ = ["Adapter", "AdapterArgs"]


class Adapter(Block):
    """Bottleneck ``up(dropout(relu(down(x))))`` over the last dimension, weights quantised to ``bits``."""

    def __init__(self, features: int, dim: int = 32, bits: int = 32, dropout: float = 0.1,
                 up_init: str = "auto", act: str = "relu"):
        super().__init__()
        self.features = features
        self.dim = dim
        self.bits = bits
        self.down = QuantLinear(features, dim, bits)
        self.act = nn.GELU() if act == "gelu" else nn.ReLU()
        self.dropout = nn.Dropout(dropout)
        self.up = QuantLinear(dim, features, bits)
        if up_init == "auto":
            up_init = "zeros" if bits == 32 else "trunc_normal"
        with torch.no_grad():
            if up_init == "zeros":
                self.up.weight.zero_()
            else:
                nn.init.trunc_normal_(self.up.weight, mean=0.0, std=1e-3, a=-2e-3, b=2e-3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(self.dropout(self.act(self.down(x))))

    def extra_repr(self) -> str:
        return f"{self.features} -> {self.dim} -> {self.features}, bits={self.bits}"


@block_factory("adapter")
def adapter(site: Site, args: AdapterArgs) -> Adapter:
    """AdaptFormer bottleneck adapter (down, ReLU or GELU, dropout, up; bias-free), optionally 1/2-bit quantised.

    Its Linears act on the last dimension, so that is its width: ``B×N×C`` tokens, and the channels-last
    ``B×H×W×C`` / ``B×G×P×C`` token grids of hierarchical transformers (Swin, MaxViT) alike."""
    shape = site.shape("output")
    features = int(shape[-1]) if shape is not None and len(shape) >= 2 else site.channels("output")
    return Adapter(features, args.dim, args.bits, args.dropout, args.up_init, args.act)
