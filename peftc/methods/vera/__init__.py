"""VeRA — vector-based random matrix adaptation: the ``vera`` block (the block contract's worked example)."""

from peftc.blocks.registry import declare_block
from peftc.methods.vera.args import VeraArgs

declare_block("vera", args=VeraArgs, suffix="vera", home=f"{__name__}.vera")
