"""The primitive registry: each graph primitive's argument model, its pass and what it does, in one place.

The spec loader validates a rule's arguments with the primitive's model, the compiler runs its pass, and the
report and composition read its metadata — so a primitive is one registration, not three tables that must
agree. peftc's own are declared in :mod:`peftc.passes` (and a method's room, for a primitive only it uses:
``tie``, ``merge_tokens``) without torch, and their passes attach when first run (:func:`primitive_pass`);
third-party primitives register from Python in one call (:func:`register_primitive`), never from a spec.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

from peftc.language.schema import RuleArgs
from peftc.plugins import Registry

__all__ = ["PRIMITIVES", "Primitive", "declare_primitive", "declared_primitive", "get_primitive", "primitive_names",
           "primitive_pass", "register_primitive"]


@dataclass(frozen=True)
class Primitive:
    """One primitive: ``run(ctx)`` rewrites the graph for a rule whose arguments ``args`` validated."""

    name: str
    args: type[RuleArgs]
    run: Callable[[Any], None] | None  # None while only declared
    adds_params: bool  # its rewrites' ``params`` count as parameters added to the model (report)
    reads_shapes: bool  # it builds from example shapes (the compiler propagates them for it)
    once: bool  # at most one such rule per model (composition keeps the first)
    summary: str


PRIMITIVES: Registry[Primitive] = Registry("primitive", "primitives", ordered=True, declared=True)
REGISTRY = PRIMITIVES


def _primitive(name: str, args: type[RuleArgs], run: Callable[[Any], None] | None, adds_params: bool,
               reads_shapes: bool, once: bool) -> Primitive:
    doc = (args.__doc__ or "").strip().splitlines()
    return Primitive(name, args, run, adds_params, reads_shapes, once, doc[0] if doc else "")


def declare_primitive(
    name: str, *, args: type[RuleArgs], home: str, adds_params: bool = False, reads_shapes: bool = False,
    once: bool = False,
) -> None:
    """Declare primitive ``name`` with its argument model and metadata; importing ``home`` attaches its pass
    (:func:`primitive_pass`). ``adds_params``: its rewrites' ``params`` count as added parameters (report);
    ``reads_shapes``: it builds from example shapes; ``once``: at most one such rule per model."""
    PRIMITIVES.declare(name, _primitive(name, args, None, adds_params, reads_shapes, once), home)


def primitive_pass(name: str) -> Callable[[Callable[[Any], None]], Callable[[Any], None]]:
    """Attach the pass ``run(ctx: PassContext) -> None`` to the declared primitive ``name`` (decorator)."""

    def decorate(run: Callable[[Any], None]) -> Callable[[Any], None]:
        PRIMITIVES.implement(name, replace(PRIMITIVES.find(name, declared=True), run=run))
        return run

    return decorate


def register_primitive(
    name: str, *, args: type[RuleArgs], adds_params: bool = False, reads_shapes: bool = False, once: bool = False,
) -> Callable[[Callable[[Any], None]], Callable[[Any], None]]:
    """Declare and implement primitive ``name`` in one step (decorator on its pass; for plugins)."""

    def decorate(run: Callable[[Any], None]) -> Callable[[Any], None]:
        PRIMITIVES.implement(name, _primitive(name, args, run, adds_params, reads_shapes, once))
        return run

    return decorate


def get_primitive(name: str) -> Primitive:
    """The primitive ``name`` with its pass; raises KeyError when there is none."""
    return PRIMITIVES.find(name)


def declared_primitive(name: str) -> Primitive:
    """The primitive ``name`` as declared (its argument model and metadata; no pass imported, so no torch)."""
    return PRIMITIVES.find(name, declared=True)


def primitive_names() -> list[str]:
    """Every registered primitive, in registration order (peftc's own first)."""
    return PRIMITIVES.names()
