"""Blocks: the modules graph primitives put into a backbone — the contract they implement and their registry.

Each method's blocks live in its room (:mod:`peftc.methods`), declared by its ``__init__`` and built by its
modules; only the generic classification head lives here. The names below resolve on first use (PEP 562), so
the registry and the declarations load without torch.
"""

from __future__ import annotations

import importlib
from typing import Any

from peftc.blocks.args import LinearHeadArgs
from peftc.blocks.registry import declare_block

declare_block("linear", args=LinearHeadArgs, suffix="head", home="peftc.blocks.linear")

# public name -> module that defines it
_NAMES = {
    **dict.fromkeys(("Block", "Deployment", "acts_as", "layer_type", "offers"), "peftc.blocks.contract"),
    **dict.fromkeys(("BlockArgs", "BlockType", "Site", "block_factory", "block_names", "declare_block", "get_block",
                     "register_block"), "peftc.blocks.registry"),
    "load_plugin": "peftc.plugins",
}


def __getattr__(name: str) -> Any:
    if name not in _NAMES:
        raise AttributeError(f"module 'peftc.blocks' has no attribute {name!r}")
    value = getattr(importlib.import_module(_NAMES[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_NAMES})


__all__ = sorted(_NAMES)
