"""FacT's block: the argument models its spec writes. Torch-free, so a spec validates without torch."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from peftc.blocks.args import BlockArgs

__all__ = ["FactArgs"]


Part = Literal["qkv", "proj", "fc1", "fc2"]


class FactArgs(BlockArgs):
    part: Part
    variant: Literal["tt", "tk"] = "tt"
    rank: int = Field(default=8, ge=1)
    dropout: float = Field(default=0.1, ge=0.0, lt=1.0)
    group: str = Field(default="fact", min_length=1, description="FacT blocks of one group share U, V (C, P)")
