"""The generic primitives' argument models: what a rule may write under ``insert:``, ``parallel:``, … .

Torch-free, so a spec validates without torch; :mod:`peftc.passes` declares each primitive with its model.
"""

from __future__ import annotations

import re
from typing import Literal

from pydantic import Field, field_validator, model_validator

from peftc.language.schema import MAX_CLASSES, BlockRuleArgs, RuleArgs, Selector, TaskState, TensorArgs

__all__ = ["FreezeArgs", "HeadArgs", "InsertArgs", "ParallelArgs", "ReplaceArgs", "StreamArgs", "TrainArgs"]


class HeadArgs(RuleArgs):
    """A classification head in place of the backbone's (role ``head`` unless ``target`` says otherwise)."""

    target: Selector = Field(default_factory=lambda: Selector(role="head"))
    classes: int | None = Field(default=None, ge=1, le=MAX_CLASSES)
    bias: bool | None = None  # None: as the backbone's head (a bias when the model has none)
    init: Literal["backbone", "default", "zeros"] = "backbone"
    task_state: TaskState = "new"
    trainable: bool = True


class InsertArgs(BlockRuleArgs):
    """Put ``block`` on the data path right after (or before) each selected node."""

    after: Selector | None = None
    before: Selector | None = None

    @model_validator(mode="after")
    def _one_side(self) -> InsertArgs:
        if (self.after is None) == (self.before is None):
            raise ValueError("give exactly one of 'after' or 'before'")
        return self


class FreezeArgs(TensorArgs):
    """Stop gradients (and running-stat updates) for the selected nodes' tensors; no selector = everything."""

    buffers: bool = True


class TrainArgs(TensorArgs):
    """Make the selected nodes' parameters trainable; ``buffers: true`` also lets running stats update."""

    buffers: bool = False
    task_state: TaskState = "shared"


class StreamArgs(BlockRuleArgs):
    """A second model input ``(batch, tokens, features)``, encoded once by ``block`` for the rules that read it."""

    input: str
    features: int = Field(ge=1)
    max_tokens: int | None = Field(default=None, ge=0)

    @field_validator("input")
    @classmethod
    def _identifier(cls, value: str) -> str:
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", value):
            raise ValueError(f"input must be an identifier (it becomes an argument name), got {value!r}")
        return value


class ParallelArgs(BlockRuleArgs):
    """A scaled bypass: ``to(x) + scale * block(src)``, ``src`` = the input or output of ``from`` (default: ``to``)."""

    to: Selector
    from_: Selector | None = Field(default=None, alias="from")
    read: Literal["input", "output"] = "input"
    scale: float = 1.0
    stream: str | None = None  # a second model input (a ``stream`` rule's) the block also reads


class ReplaceArgs(BlockRuleArgs):
    """Put ``block``, built from the original module, in place of each selected node."""

    target: Selector
