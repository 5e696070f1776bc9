"""Convpass — convolutional bypasses for ViTs: the ``convpass`` block."""

from peftc.blocks.registry import declare_block
from peftc.methods.convpass.args import ConvpassArgs

declare_block("convpass", args=ConvpassArgs, suffix="convpass", home=f"{__name__}.convpass")
