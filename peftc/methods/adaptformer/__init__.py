"""AdaptFormer bottleneck adapters, optionally 1-bit (Bi-AdaptFormer): the ``adapter`` block and its quantiser."""

from peftc.blocks.registry import declare_block
from peftc.methods.adaptformer.args import AdapterArgs

declare_block("adapter", args=AdapterArgs, suffix="adapter", home=f"{__name__}.adapter")
