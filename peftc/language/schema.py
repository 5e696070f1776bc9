"""The spec schema: the document's top level, parameter declarations, and the pieces every rule is built of.

A spec is data; these pydantic models are its grammar. Each primitive's own argument model lives with the
primitive (:mod:`peftc.language.primitives` registers both together); the argument bases here are what they
share: :class:`Selector` (which nodes), :class:`TensorArgs` (which of their tensors) and
:class:`BlockRuleArgs` (which block, with what arguments and ownership).
"""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from peftc.errors import did_you_mean
from peftc.language.predicate import Predicate, PredicateSyntaxError

__all__ = ["FORMAT_VERSION", "MAX_CLASSES", "PARTS", "BlockRuleArgs", "PairSection", "ParamDecl", "RuleArgs",
           "Selector", "SpecDocument", "TaskState", "TensorArgs"]

FORMAT_VERSION = 1
MAX_CLASSES = 1_000_000  # a head's outputs, wherever a number of classes is read (spec, manifest, add_task)
PARTS = ("vision", "language")  # what a rule's ``part:`` may name: the parts of a vision-language pair


class RuleArgs(BaseModel):
    """Base of every argument model of the language: unknown keys are errors, aliases (``from``) accepted."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)


StrOrList = str | list[str] | None
TaskState = Literal["shared", "new", "inherit"]


class Selector(RuleArgs):
    """Which graph nodes a rule applies to. All given keys must hold; a list inside one key means any of."""

    name: StrOrList = None
    type: StrOrList = None
    role: StrOrList = None
    where: str | None = None
    blocks: str | list[int] | None = None
    exclude: Selector | None = None
    optional: bool = False

    @model_validator(mode="after")
    def _check(self) -> Selector:
        if self.where is not None:
            try:
                Predicate(self.where)
            except PredicateSyntaxError as exc:
                raise ValueError(str(exc)) from None
        if isinstance(self.blocks, str) and not re.fullmatch(r"-?\d*(:-?\d*){0,2}", self.blocks.strip()):
            raise ValueError(f"blocks must be a slice like '1::2' or a list of indices, got {self.blocks!r}")
        return self

    def describe(self) -> str:
        """A short human summary: ``type=Conv2d where kernel_size != (1, 1)``."""
        parts = [f"{key}={value}" for key, value in (("type", self.type), ("name", self.name),
                                                     ("role", self.role)) if value]
        if self.blocks is not None:
            parts.append(f"blocks={self.blocks}")
        if self.where:
            parts.append(f"where {self.where}")
        return " ".join(parts) or "all"


class TensorArgs(Selector):
    """Selector keys inline plus which of the selected nodes' tensors are affected."""

    params: str | list[str] = "*"


class BlockRuleArgs(RuleArgs):
    block: str
    args: dict[str, Any] = Field(default_factory=dict)
    name: str | None = None
    task_state: TaskState = "shared"
    trainable: bool = True

    @model_validator(mode="after")
    def _check_name(self) -> BlockRuleArgs:
        if self.name is not None and not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", self.name):
            raise ValueError(f"name must be an identifier (it becomes a module name), got {self.name!r}")
        return self


class ParamDecl(RuleArgs):
    """A typed, overridable spec parameter."""

    type: Literal["int", "float", "bool", "str", "list"] = "str"
    default: Any = None
    choices: list[Any] | None = None
    min: float | None = None
    max: float | None = None
    doc: str = ""

    @model_validator(mode="after")
    def _check_range(self) -> ParamDecl:
        if (self.min is not None or self.max is not None) and self.type not in ("int", "float"):
            raise ValueError(f"min and max apply to int and float params, not to a {self.type} param")
        return self

    def coerce(self, value: Any, what: str) -> Any:
        """Check ``value`` against the declared type, range and choices; returns the typed value."""
        if value is None:
            if self.default is None:
                return None
            raise ValueError(f"{what} must be set (type {self.type}), got null")
        ok = {
            "int": isinstance(value, int) and not isinstance(value, bool),
            "float": isinstance(value, (int, float)) and not isinstance(value, bool),
            "bool": isinstance(value, bool),
            "str": isinstance(value, str) or (isinstance(value, int) and not isinstance(value, bool)),
            "list": isinstance(value, (list, tuple)),
        }[self.type]
        if not ok:
            article = "an" if self.type == "int" else "a"
            raise ValueError(f"{what} must be {article} {self.type}, got {type(value).__name__} {value!r}")
        if self.type == "float":
            value = float(value)
        if self.type == "str" and isinstance(value, int) and not isinstance(value, bool):
            value = str(value)  # `--set stages=234` reads 234 as YAML; to a str param it means the text
        if self.type == "list":
            value = list(value)
        if self.choices is not None and value not in self.choices:
            raise ValueError(
                f"{what} must be one of {', '.join(map(repr, self.choices))}, got {value!r}"
                + did_you_mean(str(value), map(str, self.choices))
            )
        if self.min is not None and value < self.min:
            raise ValueError(f"{what} must be >= {self.min}, got {value!r}")
        if self.max is not None and value > self.max:
            raise ValueError(f"{what} must be <= {self.max}, got {value!r}")
        return value


class PairSection(RuleArgs):
    """``pair:``: how the spec runs on a vision-language pair (``peftc.pair(vision, language)``).

    The visual encoder's tokens feed the language model's ``stream``: the output of its transformer block
    ``block`` (``-1`` the last, ``-2`` the penultimate), through its final norm when ``norm``, without the tokens
    prepended to the patches (CLS, registers) when ``prefix_tokens: drop``. Rules say which model they rewrite
    with ``part: vision`` / ``part: language`` (a rule without ``part:`` rewrites both).
    """

    stream: str
    block: int = -1
    norm: bool = True
    prefix_tokens: Literal["drop", "keep"] = "drop"


class SpecDocument(RuleArgs):
    """The top level of a spec file."""

    peftc: int = FORMAT_VERSION
    name: str
    summary: str = ""
    references: list[str] = Field(default_factory=list)
    notes: str = ""
    include: str | list[str] | None = None
    params: dict[str, ParamDecl] = Field(default_factory=dict)
    rules: list[dict[str, Any]] = Field(default_factory=list)
    train: dict[str, Any] | None = None  # validated after params are bound (TrainSection)
    schedule: list[Any] = Field(default_factory=list)
    pair: dict[str, Any] | None = None  # validated after params are bound (PairSection)
