"""ConFiT — cross-convolution BatchNorm: the ``input_mean`` and ``cross_conv_bn`` blocks."""

from peftc.methods.confit import blocks  # noqa: F401  (registration)
