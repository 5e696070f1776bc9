"""AdaptFormer's adapter block: the argument models its spec writes. Torch-free, so a spec validates without torch."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from peftc.blocks.args import BlockArgs

__all__ = ["AdapterArgs"]


class AdapterArgs(BlockArgs):
    dim: int = Field(default=32, ge=1, description="bottleneck width")
    bits: Literal[1, 2, 4, 8, 32] = 32
    dropout: float = Field(default=0.1, ge=0.0, lt=1.0)
    up_init: Literal["auto", "zeros", "trunc_normal"] = "auto"  # auto: zeros at 32 bits, else trunc_normal
    act: Literal["relu", "gelu"] = "relu"  # AdaptFormer: ReLU; MemVP's vision adapters: GELU
