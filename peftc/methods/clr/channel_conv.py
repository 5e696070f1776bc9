"""CLR's channel-wise reprogramming layer (arXiv 2307.11386, gyhandy/Channel-wise-Lightweight-Reprogramming)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from peftc.blocks.contract import Block
from peftc.blocks.registry import Site, block_factory
from peftc.methods.clr.args import ChannelConvArgs


class ChannelConv(Block):
    """Depthwise ``k×k`` convolution, stride 1, 'same' padding: one small kernel per channel.

    Identity (Dirac) init — centre tap 1, the rest 0 — so the rewritten network computes exactly what the
    original computes until the kernel is trained.
    """

    def __init__(self, channels: int, kernel_size: int = 3, init: str = "identity", bias: bool = False):
        super().__init__()
        if kernel_size < 1 or kernel_size % 2 == 0:
            raise ValueError(f"channel_conv needs an odd kernel_size >= 1, got {kernel_size}")
        self.channels = channels
        self.kernel_size = kernel_size
        self.weight = nn.Parameter(torch.empty(channels, 1, kernel_size, kernel_size))
        self.bias = nn.Parameter(torch.zeros(channels)) if bias else None
        self.reset_parameters(init)

    def reset_parameters(self, init: str = "identity") -> None:
        with torch.no_grad():
            if init == "identity":
                self.weight.zero_()
                self.weight[:, 0, self.kernel_size // 2, self.kernel_size // 2] = 1.0
            else:
                nn.init.kaiming_uniform_(self.weight, a=5**0.5)
            if self.bias is not None:
                self.bias.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, self.weight, self.bias, padding=self.kernel_size // 2, groups=self.channels)

    fold_kind = "plain"  # it is a plain depthwise conv; export then merges a centre-tap kernel into its conv

    def folded(self) -> nn.Conv2d:
        """The same depthwise convolution as an ``nn.Conv2d`` (which the fold can merge further)."""
        conv = nn.Conv2d(self.channels, self.channels, self.kernel_size, padding=self.kernel_size // 2,
                         groups=self.channels, bias=self.bias is not None)
        conv.to(device=self.weight.device, dtype=self.weight.dtype)
        with torch.no_grad():
            conv.weight.copy_(self.weight)
            if self.bias is not None:
                conv.bias.copy_(self.bias)
        return conv

    def extra_repr(self) -> str:
        return f"{self.channels}, kernel_size={self.kernel_size}, bias={self.bias is not None}"


@block_factory("channel_conv")
def channel_conv(site: Site, args: ChannelConvArgs) -> ChannelConv:
    """Depthwise k×k reprogramming conv after a conv (CLR); identity init."""
    return ChannelConv(site.channels("output"), args.kernel_size, args.init, args.bias)
