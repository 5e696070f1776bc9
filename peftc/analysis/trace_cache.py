"""Traced graphs kept per architecture, so compiling the same kind of backbone again skips the trace.

A graph depends on the code that runs (each module's class), on what that code reads (every module's
configuration: strides, eps, flags, the shapes and dtypes of its tensors — never their values) and on the leaf
policy. :func:`architecture_key` is exactly that; a module it cannot describe with certainty (forward hooks, an
instance-level ``forward``, a closure or an object of unknown kind among its attributes) gets no key and is
traced every time. A graph is kept from an architecture's second trace on (a process that compiles it once
keeps nothing); a hit hands out a private copy of the kept graph: passes edit their copy freely. The shapes
a compile propagated through the untouched graph are kept with it, per example input, so a later compile of
the architecture that reads shapes before editing the graph (blocks sized by the feature map) skips that run.
"""

from __future__ import annotations

import copy
import enum
import functools
import types
from collections import OrderedDict
from collections.abc import Hashable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import fx, nn

__all__ = ["architecture_key", "clear", "lookup", "recall_shapes", "remember_shapes", "store"]

_SHAPE_KEYS = ("tensor_meta", "type")  # what shape propagation writes into node.meta


@dataclass
class _Kept:
    graph: fx.Graph
    shapes: dict[Hashable, list[dict[str, Any]]] = field(default_factory=dict)  # example -> per node, in order


_KEPT: OrderedDict[Hashable, _Kept] = OrderedDict()
_SEEN: OrderedDict[int, None] = OrderedDict()  # hashes of keys traced once: kept when traced again
_LIMIT = 8  # architectures kept per process
_PLAIN = (int, float, bool, str, bytes, type(None), torch.dtype, torch.device, torch.Size, enum.Enum)
_FAST = frozenset({int, float, bool, str, type(None), torch.dtype})  # most attributes: no isinstance chain
_CODE_HOOKS = frozenset({"_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks",
                         "_forward_hooks_with_kwargs", "_forward_pre_hooks_with_kwargs",
                         "_forward_hooks_always_called"})  # non-empty: code runs that is not the class's own
_IGNORED = frozenset({"_state_dict_hooks", "_state_dict_pre_hooks", "_load_state_dict_pre_hooks",
                      "_load_state_dict_post_hooks", "_non_persistent_buffers_set", "_is_full_backward_hook"})


class _Unknown(Exception):
    """An attribute the key cannot describe: this module is traced every time."""


def _describe(value: Any) -> Hashable:
    if isinstance(value, _PLAIN):
        return value
    if isinstance(value, (tuple, list)):
        return type(value), tuple(_describe(v) for v in value)
    if isinstance(value, (set, frozenset)):
        return type(value), frozenset(_describe(v) for v in value)
    if isinstance(value, dict):
        return dict, tuple((_describe(k), _describe(v)) for k, v in value.items())
    if isinstance(value, type):
        return value
    if isinstance(value, torch.Tensor):  # a plain tensor attribute: its values could steer the code
        raise _Unknown
    if isinstance(value, (types.FunctionType, types.BuiltinFunctionType)) and not getattr(value, "__closure__", None):
        return value
    if isinstance(value, functools.partial):
        return functools.partial, _describe(value.func), _describe(value.args), _describe(value.keywords)
    raise _Unknown


def _tensors(slots: dict[str, Any]) -> Hashable:
    return tuple((n, None if t is None else (t.shape, t.dtype, t.device)) for n, t in slots.items())


def _module_key(module: nn.Module) -> Hashable:
    attrs = []
    for name, value in module.__dict__.items():
        if type(value) in _FAST:
            attrs.append((name, value))
        elif name in _IGNORED:
            continue
        elif name in _CODE_HOOKS:
            if value:
                raise _Unknown
        elif name == "_parameters" or name == "_buffers":
            attrs.append((name, _tensors(value)))
        elif name == "_modules":
            attrs.append((name, tuple((n, m is None) for n, m in value.items())))
        elif name == "forward":
            raise _Unknown  # an instance's own forward, not the class's
        else:
            attrs.append((name, _describe(value)))
    return type(module), tuple(attrs)


def architecture_key(module: nn.Module, leaves: tuple[Any, ...], autowrap: tuple[Any, ...]) -> Hashable | None:
    """What determines ``module``'s traced graph under this leaf policy; None when that cannot be told."""
    from torch.nn.modules import module as torch_module

    if any(getattr(torch_module, n) for n in ("_global_forward_hooks", "_global_forward_pre_hooks")):
        return None
    try:
        return leaves, autowrap, tuple((name, _module_key(m)) for name, m in module.named_modules())
    except _Unknown:
        return None


def lookup(key: Hashable | None) -> fx.Graph | None:
    """A private copy of the graph kept for ``key``, or None."""
    kept = _KEPT.get(key) if key is not None else None
    if kept is None:
        return None
    _KEPT.move_to_end(key)
    return copy.deepcopy(kept.graph)


def store(key: Hashable | None, graph: fx.Graph) -> None:
    """Keep a copy of ``graph`` (as traced, before any pass) for ``key``; not one that reads constants the
    tracer attached to its root (another instance would not have them)."""
    if key is None or any(n.op == "get_attr" and str(n.target).startswith(("_tensor_constant", "_param_constant"))
                          for n in graph.nodes):
        return
    if hash(key) not in _SEEN:  # a process that compiles an architecture once pays neither the copy nor its memory
        _SEEN[hash(key)] = None
        while len(_SEEN) > 4 * _LIMIT:
            _SEEN.popitem(last=False)
        return
    _KEPT[key] = _Kept(copy.deepcopy(graph))
    while len(_KEPT) > _LIMIT:
        _KEPT.popitem(last=False)


def remember_shapes(key: Hashable | None, example: Hashable, graph: fx.Graph) -> None:
    """Keep the shapes just propagated through ``graph``, a copy of the kept graph no pass has edited yet."""
    kept = _KEPT.get(key) if key is not None else None
    if kept is not None:
        kept.shapes[example] = [{k: n.meta[k] for k in _SHAPE_KEYS if k in n.meta} for n in graph.nodes]


def recall_shapes(key: Hashable | None, example: Hashable, graph: fx.Graph) -> bool:
    """Put the kept shapes for ``example`` into ``graph`` (an unedited copy of the kept graph); False if none."""
    kept = _KEPT.get(key) if key is not None else None
    shapes = kept.shapes.get(example) if kept is not None else None
    if shapes is None or len(shapes) != len(graph.nodes):
        return False
    for node, meta in zip(graph.nodes, shapes):
        node.meta.update(meta)
    return True


def clear() -> None:
    """Forget every kept graph (benchmarks time a cold trace this way; the architectures seen stay seen, so the
    next trace of one pays for keeping its graph again)."""
    _KEPT.clear()
