"""Dotted paths in a module tree: does one exist, what does it hold, which fresh one can a new module take."""

from __future__ import annotations

from typing import Any

from torch import nn

__all__ = ["fresh_path", "has_submodule", "resolve"]


def has_submodule(root: nn.Module, path: str) -> bool:
    """True when ``root.get_submodule(path)`` would succeed."""
    try:
        root.get_submodule(path)
    except AttributeError:
        return False
    return True


def resolve(root: Any, target: str) -> Any:
    """The object at dotted ``target`` under ``root`` (a ``get_attr`` node's tensor), None where a part is missing."""
    for part in target.split("."):
        root = getattr(root, part, None)
    return root


def fresh_path(root: nn.Module, base: str) -> str:
    """``base``, or ``base_1``, ``base_2``, … — the first that names no submodule of ``root`` yet."""
    path, n = base, 0
    while has_submodule(root, path):
        n += 1
        path = f"{base}_{n}"
    return path
