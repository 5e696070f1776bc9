"""Where registrations come from: peftc's own method rooms, installed plugins, and ``--plugin`` modules.

Every registry (blocks, primitives, training stages) is filled by importing the modules that register into
it. The registries call :func:`ensure_loaded` before answering a lookup, so a spec naming ``lora`` works
however peftc was entered — and the core never imports a method: the rooms are found here, by name, the way
third-party plugins are (the ``peftc.plugins`` and ``peftc.blocks`` entry-point groups, or ``--plugin MODULE``).
"""

from __future__ import annotations

import importlib
from importlib.metadata import entry_points

from peftc.errors import PeftcError

__all__ = ["BUILTIN", "ensure_loaded", "load_plugin"]

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
