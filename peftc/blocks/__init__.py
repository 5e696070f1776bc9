"""Blocks: the modules graph primitives put into a backbone. Importing this package registers peftc's own."""

from . import adapter, channel_conv, convpass, fact, linear, ln_bank, lora  # noqa: F401  (registration side effects)
from . import tocom  # noqa: F401  (ToCom; imports tome, which merge_tokens uses)
from . import confit  # noqa: F401  (ConFiT's input_mean and cross_conv_bn)
from .registry import BlockArgs, BlockType, Site, block_names, get_block, load_plugin, register_block

__all__ = ["BlockArgs", "BlockType", "Site", "block_names", "get_block", "load_plugin", "register_block"]
