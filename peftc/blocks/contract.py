"""The block contract: everything a block may offer the compiler, the task bank, storage, export and the trainer.

A block is an ``nn.Module`` a primitive puts into the graph (``insert``, ``parallel``, ``replace``, …). It
subclasses :class:`Block`, whose every hook has a no-op default, and overrides what it offers. Shared code
reaches a method only through these hooks and the registries (blocks, primitives, stages), never by naming it.

================  ======================================================================================
what              hook (default)
================  ======================================================================================
ownership         ``shared_state`` — glob patterns of the block's own tensors that stay *one copy for all
                  tasks* even when the rule makes the block per task (VeRA's frozen random projections);
                  ``reused`` — what happens to tensors the block takes over from the module it replaces or
                  finds in the model: ``"borrowed"`` (default: they keep their owner, flag and ownership —
                  DoRA's frozen base weight) or ``"owned"`` (the block *is* that module now and its tensors
                  become the block's state — ConFiT's cross-conv BN holds the BN's own tensors).
role              ``stands_for`` — the layer type a stand-in computes as (a DoRA block for a ``Linear``), so
                  ``type:`` selectors and roles (``qkv``, ``fc1``, …) of later rules still find it.
folding           ``delta_weight(base)`` — a bypass's change of the bypassed layer's weight; ``folded()`` —
                  the plain module this block equals at inference; ``fold_graph(gm)`` — a graph-level fold
                  run once per block class before the per-node merges (tied layers materialise their mix).
task hooks        ``init_task(name, tensors)`` — make a new task's own tensors (orthogonal keys, LoRA from its
                  seed; the bank then keeps no snapshot of them);
                  ``add_task(name, source)`` / ``set_task(name)`` — blocks that see every task at once.
packed storage    ``packed_bits()`` — tensors stored below 32 bits; ``pack``/``unpack`` (the codec is
                  :mod:`peftc.storage.codec`).
deployment        ``deploy_modes()`` — extra ways to deploy a model holding this block (LN tuning's
                  ``select_task``: one graph that picks each sample's task itself).
task prediction   ``task_predictor(model)`` — how evaluation predicts an image's task when it is not given.
================  ======================================================================================

Training stages are per method, not per block: a method's room registers them with
:func:`peftc.train.stages.register_stage` and a spec names them in ``train.stages``.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Literal, Protocol

import torch
from torch import fx, nn

if TYPE_CHECKING:
    from peftc.storage.codec import Packed

__all__ = ["Block", "Deployment", "GraphFoldAction", "TaskPredictor", "acts_as", "is_shared_state", "layer_type",
           "offers", "task_tensors"]


@dataclass(frozen=True)
class GraphFoldAction:
    """One merge a graph-level fold made (``kind`` of ``source`` into ``target``), for the fold report."""

    kind: str
    source: str
    target: str


@dataclass
class Deployment:
    """What a deploy mode builds: a module (image → logits), the tasks it serves, the eager model it must match."""

    module: nn.Module
    tasks: list[str]
    reference: Callable[..., torch.Tensor]


class TaskPredictor(Protocol):
    """Predicts the task of each image when nobody gives it (task-agnostic evaluation)."""

    def route(self, images: torch.Tensor, candidates: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Each image's predicted task (an index into ``candidates``) and the model's logits with every image
        run as its predicted task."""
        ...


class Block(nn.Module):
    """Base of peftc's blocks: every hook of the contract with its no-op default (see the module docstring)."""

    shared_state: ClassVar[Sequence[str]] = ()
    reused: ClassVar[Literal["borrowed", "owned"]] = "borrowed"
    stands_for: ClassVar[type[nn.Module] | None] = None
    fold_kind: ClassVar[str] = "folded"  # how the fold report names this block's ``folded()`` merge

    # -- folding ------------------------------------------------------------------------------------------
    def delta_weight(self, base: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None] | None:
        """``(dW, db | None)`` in ``base``'s weight/bias shapes, without the rule's scale; None declines."""
        return None

    def folded(self) -> nn.Module | None:
        """The plain module this block equals at inference (None: it does not fold)."""
        return None

    @classmethod
    def fold_graph(cls, gm: fx.GraphModule) -> list[GraphFoldAction]:
        """Rewrite ``gm`` (a private copy) before the per-node merges; returns what it merged."""
        return []

    # -- tasks --------------------------------------------------------------------------------------------
    def init_task(self, name: str, tensors: dict[str, torch.Tensor]) -> None:
        """Fill task ``name``'s tensors under this block (by relative name, ``A.weight``) in place. Overriding it
        means the block makes its ``new`` tensors itself: they arrive unfilled, and the bank keeps no compile-time
        copy of them. Default: a new task gets a copy of the compile-time values."""

    def add_task(self, name: str, source: str) -> None:
        """A task was added (its state copied from ``source``); only for blocks that route tasks themselves."""

    def set_task(self, name: str) -> None:
        """Task ``name`` became the active one; only for blocks that route tasks themselves."""

    # -- storage ------------------------------------------------------------------------------------------
    def packed_bits(self) -> Mapping[str, int]:
        """Attribute name → bits for tensors stored packed (below 32 bits) in artifacts."""
        return {}

    def pack(self, name: str, tensor: torch.Tensor) -> Packed:
        raise NotImplementedError(f"{type(self).__name__} stores no packed tensors")

    def unpack(self, name: str, packed: Packed) -> torch.Tensor:
        raise NotImplementedError(f"{type(self).__name__} stores no packed tensors")

    # -- deployment and evaluation ------------------------------------------------------------------------
    @classmethod
    def deploy_modes(cls) -> Mapping[str, Callable[[Any], Deployment]]:
        """Mode name → builder from a compiled model holding this block (``select_task``, …)."""
        return {}

    @classmethod
    def task_predictor(cls, model: Any) -> TaskPredictor | None:
        """How to predict an image's task in ``model`` (None: this block cannot)."""
        return None


def offers(module: nn.Module, hook: str) -> bool:
    """True when ``module`` offers ``hook``: a :class:`Block` overriding the contract's default, or any module
    defining it (the contract is structural, like a ``Protocol``: a plain module with ``delta_weight`` folds)."""
    if not isinstance(module, Block):
        return callable(getattr(module, hook, None)) and hook in _HOOKS
    mine, default = getattr(type(module), hook), getattr(Block, hook)
    return getattr(mine, "__func__", mine) is not getattr(default, "__func__", default)  # classmethods too


_HOOKS = frozenset(name for name, value in vars(Block).items() if callable(value) or isinstance(value, classmethod))


def layer_type(module: nn.Module) -> type[nn.Module]:
    """The layer type ``module`` computes as: a stand-in block's ``stands_for``, else its own type."""
    return (module.stands_for if isinstance(module, Block) else None) or type(module)


def acts_as(module: nn.Module | None, kind: type[nn.Module] | tuple[type[nn.Module], ...]) -> bool:
    """``isinstance`` that also accepts a block standing in for ``kind`` (roles use it to find layers)."""
    return module is not None and (isinstance(module, kind) or issubclass(layer_type(module), kind))


def task_tensors(module: nn.Module) -> Iterator[tuple[str, torch.Tensor, bool]]:
    """(local name, tensor, is a parameter) of what a block offers as per-task state: its parameters and
    floating-point buffers, without those its ``shared_state`` keeps one copy of."""
    for local, p in module.named_parameters():
        if not is_shared_state(module, local):
            yield local, p, True
    for local, b in module.named_buffers():
        if b.is_floating_point() and not is_shared_state(module, local):
            yield local, b, False


def is_shared_state(module: nn.Module, local: str) -> bool:
    """True when the tensor at ``local`` (a name relative to ``module``) is in the block's ``shared_state``."""
    patterns = tuple(module.shared_state) if isinstance(module, Block) else ()
    return any(fnmatch.fnmatchcase(local, p) for p in patterns)
