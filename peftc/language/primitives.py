"""The primitive registry: each graph primitive's argument model, its pass and what it does, in one place.

The spec loader validates a rule's arguments with the primitive's model, the compiler runs its pass, and the
report and composition read its metadata — so a primitive is one registration, not three tables that must
agree. peftc's own register in :mod:`peftc.passes` (and a method's room, for a primitive only it uses:
``tie``, ``merge_tokens``); third-party primitives register from Python (:mod:`peftc.plugins`), never from a spec.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from peftc.language.schema import RuleArgs
from peftc.plugins import Registry

__all__ = ["PRIMITIVES", "Primitive", "get_primitive", "primitive_names", "register_primitive"]


@dataclass(frozen=True)
class Primitive:
    """One primitive: ``run(ctx)`` rewrites the graph for a rule whose arguments ``args`` validated."""

    name: str
    args: type[RuleArgs]
    run: Callable[[Any], None]
    adds_params: bool  # its rewrites' ``params`` count as parameters added to the model (report)
    reads_shapes: bool  # it builds from example shapes (the compiler propagates them for it)
    once: bool  # at most one such rule per model (composition keeps the first)
    summary: str


PRIMITIVES: Registry[Primitive] = Registry("primitive", "primitives", ordered=True)
REGISTRY = PRIMITIVES


def register_primitive(
    name: str, *, args: type[RuleArgs], adds_params: bool = False, reads_shapes: bool = False, once: bool = False,
) -> Callable[[Callable[[Any], None]], Callable[[Any], None]]:
    """Register a pass ``run(ctx: PassContext) -> None`` as primitive ``name`` (decorator)."""

    def decorate(run: Callable[[Any], None]) -> Callable[[Any], None]:
        doc = (args.__doc__ or "").strip().splitlines()
        PRIMITIVES[name] = Primitive(name, args, run, adds_params, reads_shapes, once, doc[0] if doc else "")
        return run

    return decorate


def get_primitive(name: str) -> Primitive:
    """The registered primitive ``name``; raises KeyError when there is none."""
    return PRIMITIVES.find(name)


def primitive_names() -> list[str]:
    """Every registered primitive, in registration order (peftc's own first)."""
    return PRIMITIVES.names()
