"""Convpass — convolutional bypasses for ViTs: the ``convpass`` block."""

from peftc.methods.convpass import convpass  # noqa: F401  (registration)
