"""Replacement Learning's ``tie`` primitive: its argument model. Torch-free, so a spec validates without torch."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from peftc.language.schema import RuleArgs, Selector, TaskState

__all__ = ["TieArgs"]


class TieArgs(RuleArgs):
    """Whole repeated blocks stop owning parameters: each layer computes with ``a·θ_prev + b·θ_next``.

    ``target`` limits which blocks may be tied (a block is a candidate when a selected node lies in it;
    default: every repeated block). Within each run of identical blocks (same parameter names and shapes)
    positions ``offset, offset + every, …`` are tied. ``edge`` says what a chosen block with only one
    same-shape neighbour does (``reflect``: both terms read it; ``skip``; ``error``); none is always an error.
    """

    target: Selector = Field(default_factory=Selector)
    every: int = Field(default=2, ge=1)
    offset: int = Field(default=1, ge=0)
    edge: Literal["reflect", "skip", "error"] = "reflect"
    init: tuple[float, float] = (0.5, 0.5)
    task_state: TaskState = "shared"
    trainable: bool = True
