"""Where registrations come from: peftc's own method rooms, installed plugins, and ``--plugin`` modules.

Every registry (blocks, primitives, training stages) is filled by importing the modules that register into
it. Registration has two halves so that reading a spec needs no torch: a *declaration* (a name and its pydantic
argument model, made by a room's torch-free ``__init__``) and an *implementation* (the factory or pass, in the
room's torch modules, imported the first time something asks for it). :func:`ensure_declared` imports the rooms
and the installed plugins; :func:`ensure_loaded` also imports every implementation. The registries call them
before answering a lookup, so a spec naming ``lora`` works however peftc was entered — and the core never
imports a method: the rooms are found here, by name, the way third-party plugins are (the ``peftc.plugins``
and ``peftc.blocks`` entry-point groups, or ``--plugin MODULE``).
"""

from __future__ import annotations

import importlib
from importlib.metadata import entry_points
from typing import Any, TypeVar

from peftc.errors import PeftcError, SpecError, did_you_mean

__all__ = ["BUILTIN", "Registry", "ensure_declared", "ensure_loaded", "implemented_in", "load_plugin"]

T = TypeVar("T")

# the generic head block, the generic primitives, then every built-in method's room: declarations, torch-free
BUILTIN = ("peftc.blocks", "peftc.passes", "peftc.methods")
ENTRY_POINT_GROUPS = ("peftc.plugins", "peftc.blocks")

_declared = False
_loaded = False
_HOMES: list[str] = []  # modules that implement what the rooms declared, imported by ensure_loaded


def implemented_in(*modules: str) -> None:
    """Name the modules whose import registers implementations (stages, learners, heads, or what a room
    declared); :func:`ensure_loaded` imports them."""
    _HOMES.extend(m for m in modules if m not in _HOMES)


def ensure_declared() -> None:
    """Import the built-in rooms' declarations and the installed plugins, once per process (no torch needed)."""
    global _declared
    if _declared:
        return
    _declared = True
    for module in BUILTIN:
        importlib.import_module(module)
    for group in ENTRY_POINT_GROUPS:
        for ep in entry_points(group=group):
            try:
                ep.load()
            except Exception as exc:  # a broken plugin must not break peftc
                raise PeftcError(f"plugin {ep.name!r} ({ep.value}) failed to load: {exc}") from None


def ensure_loaded() -> None:
    """:func:`ensure_declared`, then import every implementation, once per process."""
    global _loaded
    if _loaded:
        return
    ensure_declared()
    _loaded = True
    for module in _HOMES:
        importlib.import_module(module)


def load_plugin(module: str) -> None:
    """Import a Python module that registers blocks, primitives or stages (``--plugin my_pkg.blocks``)."""
    ensure_declared()
    try:
        importlib.import_module(module)
    except ImportError as exc:
        raise PeftcError(f"cannot import plugin module {module!r}: {exc}") from None


class Registry(dict[str, T]):
    """Name → plug-in of one kind (blocks, primitives, stages, training heads). Lookups load the rooms and the
    installed plugins first, so a name registered anywhere is found however peftc was entered.

    An entry may be *declared* before it is implemented (:meth:`declare`): it holds what reading a spec needs,
    and :meth:`find` imports the module that implements it on first use (:meth:`implement` replaces it).
    """

    def __init__(self, kind: str, plural: str, initial: dict[str, T] | None = None, *, ordered: bool = False,
                 declared: bool = False):
        super().__init__(initial or {})
        self.kind, self.plural, self.ordered = kind, plural, ordered  # ordered: list in registration order
        self.declared = declared  # the rooms declare every entry: the names are known without implementations
        self.pending: dict[str, str] = {}  # declared name -> the module whose import implements it

    def declare(self, name: str, entry: T, home: str) -> None:
        """Register ``entry`` (no implementation yet) under ``name``; importing ``home`` implements it."""
        self[name] = entry
        self.pending[name] = home
        implemented_in(home)

    def implement(self, name: str, entry: T) -> None:
        """Register the implemented ``entry`` under ``name``, replacing its declaration if any."""
        self[name] = entry
        self.pending.pop(name, None)

    def named(self, name: str) -> Any:
        """Class decorator: register the class under ``name`` and give it that ``name`` attribute (stages,
        training heads, online learners)."""

        def decorate(cls: Any) -> Any:
            cls.name = name
            self[name] = cls
            return cls

        return decorate

    def find(self, name: str, *, declared: bool = False) -> T:
        """The plug-in ``name``, implemented (or as declared, with ``declared``: no implementation imported);
        raises KeyError when there is none."""
        if name not in self:
            ensure_declared()
        if name not in self:
            ensure_loaded()  # registered only by an implementation module (a stage, a learner)
        home = self.pending.get(name)
        if home is not None and not declared:
            importlib.import_module(home)
            if name in self.pending:
                raise PeftcError(f"{home} was to implement the {self.kind} {name!r} but does not register it")
        return self[name]

    def names(self) -> list[str]:
        """Every registered name, sorted (in registration order when ``ordered``)."""
        ensure_declared()
        if not self.declared:
            ensure_loaded()
        return list(self) if self.ordered else sorted(self)

    def unknown(self, name: str, where: Any = None) -> SpecError:
        """The error for a spec naming no such plug-in: the closest names, then all of them."""
        known = self.names()
        return SpecError(f"unknown {self.kind} {name!r}" + did_you_mean(name, known)
                         + f"; {self.plural}: {', '.join(known)}", where)
