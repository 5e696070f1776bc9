"""ConFiT's blocks: the argument models its spec writes. Torch-free, so a spec validates without torch."""

from __future__ import annotations

from pydantic import Field

from peftc.blocks.args import BlockArgs

__all__ = ["InputMeanArgs"]


class InputMeanArgs(BlockArgs):
    momentum: float = Field(default=0.1, gt=0.0, le=1.0)
