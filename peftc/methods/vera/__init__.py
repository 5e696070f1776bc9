"""VeRA — vector-based random matrix adaptation: the ``vera`` block (the block contract's worked example)."""

from peftc.methods.vera import vera  # noqa: F401  (registration)
