"""LoRA's block: the argument models its spec writes. Torch-free, so a spec validates without torch."""

from __future__ import annotations

from pydantic import Field

from peftc.blocks.args import BlockArgs

__all__ = ["LoraArgs"]


class LoraArgs(BlockArgs):
    rank: int = Field(8, ge=1)
    alpha: float = Field(8.0, gt=0)
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
