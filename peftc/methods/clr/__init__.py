"""CLR — channel-wise lightweight reprogramming: the ``channel_conv`` block."""

from peftc.blocks.registry import declare_block
from peftc.methods.clr.args import ChannelConvArgs

declare_block("channel_conv", args=ChannelConvArgs, suffix="clr", home=f"{__name__}.channel_conv")
