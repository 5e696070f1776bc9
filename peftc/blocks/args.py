"""Block argument models: what a spec may write under ``args:``. Torch-free, so a spec validates without torch."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict

__all__ = ["BlockArgs", "LinearHeadArgs"]


class BlockArgs(BaseModel):
    """Base for block argument models: unknown keys are errors."""

    model_config = ConfigDict(extra="forbid")


class LinearHeadArgs(BlockArgs):
    """A linear classifier over the features the original head reads."""

    classes: int | None = None
    bias: bool | None = None  # None: as the backbone's head (maxvit's classifier has none), True for a new one
    init: Literal["backbone", "default", "zeros"] = "backbone"
