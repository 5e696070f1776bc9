"""CLR's channel-convolution block: its argument model. Torch-free, so a spec validates without torch."""

from __future__ import annotations

from typing import Literal

from peftc.blocks.args import BlockArgs

__all__ = ["ChannelConvArgs"]


class ChannelConvArgs(BlockArgs):
    kernel_size: int = 3
    init: Literal["identity", "kaiming"] = "identity"
    bias: bool = False
