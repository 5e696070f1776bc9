"""Convpass's block: the argument models its spec writes. Torch-free, so a spec validates without torch."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from peftc.blocks.args import BlockArgs

__all__ = ["ConvpassArgs"]


class ConvpassArgs(BlockArgs):
    dim: int = Field(default=8, ge=1, description="bottleneck channels")
    dropout: float = Field(default=0.1, ge=0.0, lt=1.0)
    conv_init: Literal["identity", "xavier"] = "identity"
