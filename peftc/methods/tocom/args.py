"""ToCom's plugin block: the argument models its spec writes. Torch-free, so a spec validates without torch."""

from __future__ import annotations

from pydantic import Field

from peftc.blocks.args import BlockArgs

__all__ = ["ToComArgs"]


class ToComArgs(BlockArgs):
    dim: int = Field(32, ge=1, description="hidden units of each plugin (slices x rank)")
    slices: int = Field(16, ge=1, description="compression steps the plugin models (r = 0 .. slices)")
    dropout: float = Field(0.1, ge=0.0, lt=1.0)
    r_src: int = Field(0, ge=0, description="merge degree the downstream model was trained at")
    r_tgt: int | None = Field(None, ge=0, description="merge degree at inference; None = the block's ToMe r")
