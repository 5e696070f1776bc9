"""The block registry: the nn.Modules that graph primitives insert, attach in parallel, or put in place.

A spec names blocks (``block: channel_conv``) and gives them ``args``; it never contains code. Blocks are
registered from Python: peftc's own in :mod:`peftc.blocks`, each method's in its room under
:mod:`peftc.methods`, third-party ones with :func:`register_block` in a module loaded by ``--plugin MODULE`` /
:func:`peftc.plugins.load_plugin` or through an entry point (:mod:`peftc.plugins`).

Each block declares a pydantic ``args`` model (validated when the spec loads, so a typo in an argument is a spec
error with a line number) and a factory ``(site, args) -> nn.Module`` that reads what it needs — channel counts,
the original module — from the :class:`Site` it is built for. peftc's own blocks are declared without torch
(:func:`declare_block`, in a room's ``__init__``) and get their factory when first built (:func:`block_factory`),
so reading a spec never imports torch; a plugin registers both at once (:func:`register_block`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

from peftc.blocks.args import BlockArgs
from peftc.errors import PeftcError
from peftc.plugins import Registry

if TYPE_CHECKING:
    import torch
    from torch import fx, nn

__all__ = ["BLOCKS", "BlockArgs", "BlockType", "Site", "block_factory", "block_names", "declare_block",
           "declared_block", "get_block", "register_block"]


@dataclass
class Site:
    """Where a block is being built: the selected graph node and what can be known about it."""

    name: str
    node: fx.Node
    module: nn.Module | None
    shapes: Callable[[fx.Node], torch.Size | None] = field(repr=False, default=lambda node: None)
    extras: dict[str, Any] = field(default_factory=dict)
    block: tuple[str, int, int] | None = None  # (container, index, count) of the repeated block around it
    # State one block type keeps across all its sites in one compilation (FacT's U and V, shared by every
    # layer): a factory that finds its part here returns the same submodule, so the tensor exists once.
    shared: dict[str, Any] = field(default_factory=dict, repr=False)

    def shape(self, port: str = "output") -> torch.Size | None:
        """The example tensor shape at this node's output (``port='output'``) or its first input."""
        if port == "output":
            return self.shapes(self.node)
        first = next(iter(self.node.all_input_nodes), None)
        return self.shapes(first) if first is not None else None

    def channels(self, port: str = "output") -> int:
        """Feature/channel count at the node's output or input, from module attributes or example shapes."""
        module = self.module
        attrs = (
            ("out_channels", "out_features", "num_features", "embed_dim")
            if port == "output"
            else ("in_channels", "in_features", "num_features", "embed_dim")
        )
        if module is not None:
            for attr in attrs:
                value = getattr(module, attr, None)
                if isinstance(value, int):
                    return value
            shape = getattr(module, "normalized_shape", None)
            if shape:
                return int(shape[-1])
        size = self.shape(port)
        if size is not None and len(size) >= 2:
            # NCHW feature maps carry channels in dim 1; token sequences (B, N, C) in the last dim.
            return int(size[1] if len(size) == 4 else size[-1])
        raise PeftcError(f"cannot tell the channel count at {port} of {self.name!r}")


@dataclass(frozen=True)
class BlockType:
    name: str
    factory: Callable[[Site, Any], nn.Module] | None  # None while only declared
    args: type[BlockArgs]
    suffix: str
    summary: str

    def build(self, site: Site, args: dict[str, Any] | BlockArgs) -> nn.Module:
        parsed = args if isinstance(args, self.args) else self.args.model_validate(args)
        factory = self.factory or get_block(self.name).factory
        assert factory is not None  # get_block imports the implementation or raises
        return factory(site, parsed)


BLOCKS: Registry[BlockType] = Registry("block", "blocks", declared=True)

Factory = Callable[[Site, Any], "nn.Module"]


def _summary(obj: Any) -> str:
    doc = (obj.__doc__ or "").strip().splitlines()
    return doc[0] if doc else ""


def declare_block(name: str, *, args: type[BlockArgs] = BlockArgs, suffix: str | None = None, home: str) -> None:
    """Declare block ``name`` and its argument model; importing ``home`` gives it its factory
    (:func:`block_factory`). ``suffix`` names the module the block becomes in the rewritten graph: inserted
    after ``layer1.0.conv2`` with suffix ``clr`` it is ``layer1.0.conv2.clr``."""
    BLOCKS.declare(name, BlockType(name, None, args, suffix or name, _summary(args)), home)


def block_factory(name: str) -> Callable[[Factory], Factory]:
    """Attach ``factory(site, args) -> nn.Module`` to the declared block ``name`` (decorator)."""

    def decorate(factory: Factory) -> Factory:
        declared = BLOCKS.find(name, declared=True)
        BLOCKS.implement(name, replace(declared, factory=factory, summary=_summary(factory) or declared.summary))
        return factory

    return decorate


def register_block(
    name: str, *, args: type[BlockArgs] = BlockArgs, suffix: str | None = None
) -> Callable[[Factory], Factory]:
    """Declare and implement block ``name`` in one step (decorator on its factory; for plugins).
    Registering a name twice replaces the earlier block."""

    def decorate(factory: Factory) -> Factory:
        BLOCKS.implement(name, BlockType(name, factory, args, suffix or name, _summary(factory)))
        return factory

    return decorate


def get_block(name: str) -> BlockType:
    """The block ``name`` with its factory; raises KeyError when there is none."""
    return BLOCKS.find(name)


def declared_block(name: str) -> BlockType:
    """The block ``name`` as declared (its argument model; no factory imported, so no torch)."""
    return BLOCKS.find(name, declared=True)


def block_names() -> list[str]:
    return BLOCKS.names()
