"""Blocks: the modules graph primitives put into a backbone. Importing this package registers peftc's own
(``tocom`` also brings ``tome``, which the ``merge_tokens`` pass uses; ``confit`` its input_mean and cross_conv_bn)."""

from . import (  # noqa: F401  (registration side effects)
    adapter,
    channel_conv,
    confit,
    convpass,
    fact,
    linear,
    ln_bank,
    lora,
    tocom,
)
from .registry import BlockArgs, BlockType, Site, block_names, get_block, load_plugin, register_block

__all__ = ["BlockArgs", "BlockType", "Site", "block_names", "get_block", "load_plugin", "register_block"]
