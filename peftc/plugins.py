"""Where registrations come from: peftc's own method rooms, installed plugins, and ``--plugin`` modules.

Every registry (blocks, primitives, training stages) is filled by importing the modules that register into
it. The registries call :func:`ensure_loaded` before answering a lookup, so a spec naming ``lora`` works
however peftc was entered — and the core never imports a method: the rooms are found here, by name, the way
third-party plugins are (the ``peftc.plugins`` and ``peftc.blocks`` entry-point groups, or ``--plugin MODULE``).
"""

from __future__ import annotations

import importlib
from importlib.metadata import entry_points
from typing import Any, TypeVar

from peftc.errors import PeftcError, SpecError, did_you_mean

__all__ = ["BUILTIN", "Registry", "ensure_loaded", "load_plugin"]

T = TypeVar("T")

BUILTIN = ("peftc.passes", "peftc.methods")  # the generic primitives, then every built-in method's room
ENTRY_POINT_GROUPS = ("peftc.plugins", "peftc.blocks")

_loaded = False


def ensure_loaded() -> None:
    """Import the built-in rooms and the installed plugins, once per process."""
    global _loaded
    if _loaded:
        return
    _loaded = True
    for module in BUILTIN:
        importlib.import_module(module)
    for group in ENTRY_POINT_GROUPS:
        for ep in entry_points(group=group):
            try:
                ep.load()
            except Exception as exc:  # a broken plugin must not break peftc
                raise PeftcError(f"plugin {ep.name!r} ({ep.value}) failed to load: {exc}") from None


def load_plugin(module: str) -> None:
    """Import a Python module that registers blocks, primitives or stages (``--plugin my_pkg.blocks``)."""
    ensure_loaded()
    try:
        importlib.import_module(module)
    except ImportError as exc:
        raise PeftcError(f"cannot import plugin module {module!r}: {exc}") from None


class Registry(dict[str, T]):
    """Name → plug-in of one kind (blocks, primitives, stages, training heads). Lookups load the rooms and the
    installed plugins first, so a name registered anywhere is found however peftc was entered."""

    def __init__(self, kind: str, plural: str, initial: dict[str, T] | None = None, *, ordered: bool = False):
        super().__init__(initial or {})
        self.kind, self.plural, self.ordered = kind, plural, ordered  # ordered: list in registration order

    def named(self, name: str) -> Any:
        """Class decorator: register the class under ``name`` and give it that ``name`` attribute (stages,
        training heads, online learners)."""

        def decorate(cls: Any) -> Any:
            cls.name = name
            self[name] = cls
            return cls

        return decorate

    def find(self, name: str) -> T:
        """The plug-in ``name``; raises KeyError when there is none."""
        if name not in self:
            ensure_loaded()
        return self[name]

    def names(self) -> list[str]:
        """Every registered name, sorted (in registration order when ``ordered``)."""
        ensure_loaded()
        return list(self) if self.ordered else sorted(self)

    def unknown(self, name: str, where: Any = None) -> SpecError:
        """The error for a spec naming no such plug-in: the closest names, then all of them."""
        known = self.names()
        return SpecError(f"unknown {self.kind} {name!r}" + did_you_mean(name, known)
                         + f"; {self.plural}: {', '.join(known)}", where)
