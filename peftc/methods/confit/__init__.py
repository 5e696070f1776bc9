"""ConFiT — cross-convolution BatchNorm: the ``input_mean`` and ``cross_conv_bn`` blocks."""

from peftc.blocks.registry import declare_block
from peftc.methods.confit.args import InputMeanArgs

declare_block("input_mean", args=InputMeanArgs, suffix="input_mean", home=f"{__name__}.blocks")
declare_block("cross_conv_bn", suffix="cross_conv_bn", home=f"{__name__}.blocks")
