"""LN tuning's blocks: the argument models its spec writes. Torch-free, so a spec validates without torch."""

from __future__ import annotations

from peftc.blocks.args import BlockArgs

__all__ = ["LNBankArgs", "TaskKeyArgs"]


class LNBankArgs(BlockArgs):
    pass


class TaskKeyArgs(BlockArgs):
    seed: int = 0
