"""VeRA's block: the argument models its spec writes. Torch-free, so a spec validates without torch."""

from __future__ import annotations

from pydantic import Field

from peftc.blocks.args import BlockArgs

__all__ = ["VeraArgs"]


class VeraArgs(BlockArgs):
    rank: int = Field(256, ge=1)
    d_initial: float = 0.1
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    seed: int = 0
