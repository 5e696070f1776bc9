"""Replacement Learning: the ``tie`` primitive, its tied layers and their graph-level fold."""

from peftc.methods.replacement import tie  # noqa: F401  (registration)
