"""ToMe's ``merge_tokens`` primitive: its argument model. Torch-free, so a spec validates without torch."""

from __future__ import annotations

import re

from pydantic import Field, model_validator

from peftc.language.schema import RuleArgs, Selector

__all__ = ["MergeTokensArgs"]


class MergeTokensArgs(RuleArgs):
    """Token merging (ToMe): merge ``r`` tokens in each selected block, between its attention and its MLP.

    ``r`` is one int (``inflection`` makes it a linear schedule from ``int(r(1 - inflection))`` to ``2r`` minus
    that) or a list with one value per selected block. ``protect`` counts the leading tokens that are never
    merged (default: the learned tokens the embedding puts first, e.g. cls and DeiT's distillation token).
    """

    target: Selector = Field(default_factory=lambda: Selector(role="attn_residual"))
    r: int | list[int] = 0
    inflection: float = 0.0
    prop_attn: bool = True
    protect: int | None = Field(default=None, ge=0)
    name: str = "tome"

    @model_validator(mode="after")
    def _check(self) -> MergeTokensArgs:
        values = self.r if isinstance(self.r, list) else [self.r]
        if any(v < 0 for v in values):
            raise ValueError(f"r must be >= 0, got {self.r!r}")
        if isinstance(self.r, list) and self.inflection:
            raise ValueError("inflection applies to a single r, not to a per-layer list")
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", self.name):
            raise ValueError(f"name must be an identifier (it becomes a module name), got {self.name!r}")
        return self
