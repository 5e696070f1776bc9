"""MemVP (Jie et al., ICML 2024, arXiv 2405.05615; JieShibo/MemVP ``memvp/model.py``, ``memvp/adapter.py``).

Visual tokens enter a language model as extra key/value memory of every FFN instead of as extra input tokens:

    Z   = pad_M'( 0.01 · fc2(SiLU(fc1 x)) )            x: (B, N, F) visual features, zero rows for no image
    out = FFN(u) + s · Dropout( SiLU(u (Z+E1)ᵀ) ) (Z+E2)    u: the FFN's (normed) input, (B, T, d)

``memvp_projector`` is the encoder of the ``memory`` stream (run once per forward); ``memvp_memory`` is the
branch a ``parallel`` rule adds beside each FFN. E1 (key offset, 0.02·randn) and E2 (value offset, zeros) are
one ``(1, M', d)`` pair shared by every layer (found in ``Site.shared``, so they exist once). The rule's
``scale`` is s. The branch depends on the input, so it never folds into the frozen weights.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from peftc.blocks.contract import Block
from peftc.blocks.registry import Site, block_factory
from peftc.errors import PeftcError
from peftc.methods.memvp.args import ProjectorArgs, VisualMemoryArgs

__all__ = ["MemoryProjector", "MemoryTable", "ProjectorArgs", "VisualMemory", "VisualMemoryArgs"]


class MemoryProjector(Block):
    """Visual features ``(B, N, F)`` → memory ``Z`` ``(B, M', d)``: projected, scaled, zero-padded to ``M'``.

    A sample without an image is given as all-zero features and gets ``Z = 0`` (the official code multiplies by
    an image indicator), so only the learned E1/E2 memory acts for it.
    """

    def __init__(self, features: int, hidden: int, width: int, tokens: int, scale: float = 0.01):
        super().__init__()
        self.tokens, self.scale = tokens, scale
        self.fc1 = nn.Linear(features, hidden)
        self.fc2 = nn.Linear(hidden, width)
        for fc in (self.fc1, self.fc2):
            nn.init.xavier_uniform_(fc.weight)
            nn.init.zeros_(fc.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.fc2(F.silu(self.fc1(x))) * self.scale
        has_image = (x.abs().sum(dim=(1, 2)) > 0).to(z.dtype)  # sums over N = 0 tokens too
        z = z * has_image[:, None, None]
        return F.pad(z, (0, 0, 0, self.tokens - x.shape[1]))

    def extra_repr(self) -> str:
        return f"{self.fc1.in_features} -> {self.fc1.out_features} -> {self.fc2.out_features}, M'={self.tokens}"


class MemoryTable(nn.Module):
    """E1 (key offset, 0.02·randn) and E2 (value offset, zeros), ``(1, M', d)``: one pair for every layer."""

    def __init__(self, tokens: int, width: int):
        super().__init__()
        self.keys = nn.Parameter(torch.randn(1, tokens, width) * 0.02)
        self.values = nn.Parameter(torch.zeros(1, tokens, width))


class VisualMemory(Block):
    """``Dropout(SiLU(u (Z+E1)ᵀ)) (Z+E2)``: the FFN input ``u`` reads the memory ``Z`` plus learned offsets."""

    shared_state = ("table.*",)  # E1, E2: one copy for every layer and every task

    def __init__(self, table: MemoryTable, dropout: float = 0.1):
        super().__init__()
        self.table = table
        self.dropout = nn.Dropout(dropout)

    def forward(self, u: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        keys, values = z + self.table.keys, z + self.table.values
        return self.dropout(F.silu(u @ keys.transpose(-1, -2))) @ values

    def extra_repr(self) -> str:
        return f"M'={self.table.keys.shape[1]}, d={self.table.keys.shape[2]}"


def _width(site: Site) -> int:
    shape = site.shape("output")
    return int(shape[-1]) if shape is not None and len(shape) >= 2 else site.channels("output")


@block_factory("memvp_projector")
def memvp_projector(site: Site, args: ProjectorArgs) -> MemoryProjector:
    """MemVP's stream encoder: fc2(SiLU(fc1 x)) · 0.01, no-image rows zeroed, zero-padded to M' memory rows."""
    features = site.extras.get("features")
    if not isinstance(features, int):
        raise PeftcError("memvp_projector encodes a stream: use it as a 'stream' rule's block")
    return MemoryProjector(features, args.hidden, _width(site), args.tokens, args.scale)


@block_factory("memvp_memory")
def memvp_memory(site: Site, args: VisualMemoryArgs) -> VisualMemory:
    """MemVP's FFN memory branch: SiLU(u (Z+E1)ᵀ)(Z+E2), E1/E2 shared by every layer; reads a stream."""
    width = _width(site)
    table = site.shared.get("table")
    if table is None:
        table = site.shared["table"] = MemoryTable(args.tokens, width)
    elif tuple(table.keys.shape[1:]) != (args.tokens, width):
        raise PeftcError(f"every MemVP layer shares one memory of {tuple(table.keys.shape[1:])} (M', d); "
                         f"{site.name!r} needs ({args.tokens}, {width})")
    return VisualMemory(table, args.dropout)
