"""CLR — channel-wise lightweight reprogramming: the ``channel_conv`` block."""

from peftc.methods.clr import channel_conv  # noqa: F401  (registration)
