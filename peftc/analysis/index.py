"""The node index: every selectable node of a traced graph, with what selectors and roles ask about it.

A :class:`Candidate` is one node — its qualified name, its module or tensor, its type names along the MRO (a
stand-in block also answers to the layer type it ``stands_for``) and its position in a run of repeated blocks.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field

import torch
from torch import fx, nn

from peftc.analysis.paths import resolve
from peftc.analysis.trace import node_name
from peftc.blocks.contract import layer_type

__all__ = ["Candidate", "NodeIndex", "block_positions", "enclosing_block", "operation_name"]

_SELECTABLE_OPS = ("call_module", "call_function", "call_method", "get_attr")


@dataclass
class Candidate:
    """A selectable graph node and what selectors can ask about it."""

    node: fx.Node
    name: str
    module: nn.Module | None
    tensor: torch.Tensor | None
    block: tuple[str, int, int] | None  # (container path, index, container length)
    _types: tuple[str, ...] = field(default=(), repr=False)

    @property
    def kind(self) -> str:
        return {"call_module": "module", "get_attr": "tensor"}.get(self.node.op, "function")

    @property
    def type_name(self) -> str:
        return self._types[0] if self._types else "?"

    @property
    def types(self) -> tuple[str, ...]:
        return self._types


def _type_names(node: fx.Node, module: nn.Module | None, tensor: torch.Tensor | None) -> tuple[str, ...]:
    if module is not None:
        names: list[str] = []
        for kind in dict.fromkeys((type(module), layer_type(module))):  # a stand-in also answers to its layer
            for cls in kind.__mro__:
                if cls in (nn.Module, object):
                    break
                names += [cls.__name__, f"{cls.__module__}.{cls.__qualname__}"]
        return tuple(dict.fromkeys(names))
    if tensor is not None:
        return ("Parameter",) if isinstance(tensor, nn.Parameter) else ("Buffer",)
    return (operation_name(node),)


def block_positions(root: nn.Module) -> dict[str, tuple[str, int, int]]:
    """Module path → (container, index, count) for children of Sequential/ModuleList/ModuleDict runs of one class.

    ``blocks.3`` of a timm ViT → ``("blocks", 3, 12)``; ``layer2.1`` of a ResNet → ``("layer2", 1, 4)``. Indices count
    only siblings of the same class, so a stage that starts with a different module still numbers its blocks 0..n.
    """
    out: dict[str, tuple[str, int, int]] = {}
    for path, module in root.named_modules():
        if not isinstance(module, (nn.Sequential, nn.ModuleList, nn.ModuleDict)):
            continue
        by_class: dict[type, list[str]] = {}
        for child_name, child in module.named_children():
            by_class.setdefault(type(child), []).append(child_name)
        for names in by_class.values():
            if len(names) < 2:
                continue
            for i, child_name in enumerate(names):
                out[f"{path}.{child_name}" if path else child_name] = (path, i, len(names))
    return out


def enclosing_block(name: str, positions: Mapping[str, tuple[str, int, int]], *, itself: bool = False) -> str | None:
    """The path of the innermost repeated block that ``name`` lies in (a ``#k`` call suffix ignored); with
    ``itself``, ``name`` when no block encloses it but it is one."""
    parts = name.split("#")[0].split(".")
    for cut in range(len(parts) - 1, 0, -1):
        prefix = ".".join(parts[:cut])
        if prefix in positions:
            return prefix
    return name if itself and name in positions else None


def operation_name(node: fx.Node) -> str:
    """``fn:NAME`` for a function or method call (``fn:add``, ``fn:scaled_dot_product_attention``)."""
    target = node.target
    name = str(target) if node.op == "call_method" else getattr(target, "__name__", str(target))
    return f"fn:{name}"


def _position(name: str, positions: Mapping[str, tuple[str, int, int]]) -> tuple[str, int, int] | None:
    block = enclosing_block(name, positions, itself=True)
    return positions[block] if block is not None else None


class NodeIndex:
    """The selectable nodes of one graph state, with the structure of the original backbone."""

    def __init__(self, gm: fx.GraphModule, positions: Mapping[str, tuple[str, int, int]]):
        self.gm = gm
        self.positions = positions
        self.candidates: list[Candidate] = []
        modules = dict(gm.named_modules(remove_duplicate=False))  # one walk, not one get_submodule per node
        for node in gm.graph.nodes:
            if node.op not in _SELECTABLE_OPS:
                continue
            module = modules[node.target] if node.op == "call_module" else None
            tensor = None
            if node.op == "get_attr":
                value = resolve(gm, str(node.target))
                tensor = value if isinstance(value, torch.Tensor) else None
            name = node_name(node)
            self.candidates.append(
                Candidate(node, name, module, tensor, _position(name, positions),
                          _type_names(node, module, tensor))
            )
        self.by_node = {c.node: c for c in self.candidates}

    def __iter__(self) -> Iterator[Candidate]:
        return iter(self.candidates)


