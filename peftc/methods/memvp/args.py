"""MemVP's blocks: the argument models its spec writes. Torch-free, so a spec validates without torch."""

from __future__ import annotations

from pydantic import Field

from peftc.blocks.args import BlockArgs

__all__ = ["ProjectorArgs", "VisualMemoryArgs"]


class ProjectorArgs(BlockArgs):
    hidden: int = Field(default=128, ge=1, description="projector hidden width")
    tokens: int = Field(default=320, ge=1, description="M': memory rows (visual tokens zero-padded to M')")
    scale: float = 0.01


class VisualMemoryArgs(BlockArgs):
    tokens: int = Field(default=320, ge=1, description="M': memory rows")
    dropout: float = Field(default=0.1, ge=0.0, lt=1.0)
