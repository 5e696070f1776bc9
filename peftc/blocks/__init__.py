"""Blocks: the modules graph primitives put into a backbone — the contract they implement and their registry.

Each method's blocks live in its room (:mod:`peftc.methods`) and register themselves when it is imported;
:mod:`peftc.plugins` imports the rooms on the first lookup. Only the generic classification head lives here.
"""

from peftc.blocks import linear  # noqa: F401  (registers the generic ``linear`` head)
from peftc.blocks.contract import Block, Deployment, acts_as, layer_type, offers
from peftc.blocks.registry import BlockArgs, BlockType, Site, block_names, get_block, register_block
from peftc.plugins import load_plugin

__all__ = ["Block", "BlockArgs", "BlockType", "Deployment", "Site", "acts_as", "block_names", "get_block",
           "layer_type", "load_plugin", "offers", "register_block"]
