"""AdaptFormer bottleneck adapters, optionally 1-bit (Bi-AdaptFormer): the ``adapter`` block and its quantiser."""

from peftc.methods.adaptformer import adapter  # noqa: F401  (registration)
