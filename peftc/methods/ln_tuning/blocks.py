"""LayerNorm tuning for continual learning (arXiv 2308.09610; tdemin16/Continual-LayerNorm-Tuning).

Two blocks:

* ``ln_bank`` (:class:`TaskLayerNorm`) replaces a ``LayerNorm``: a non-affine normalisation followed by the
  active task's scale/bias row ``w, b ∈ R^C``, initialised from the pretrained γ/β. The rows are task state of
  the :class:`~peftc.runtime.tasks.TaskBank` (``task_state: inherit``), so each task owns its own row objects — one
  row of the ``T×C`` tables ``w, b`` of the paper — and a new task starts as a copy of the previous task's rows.
  For per-sample task selection a :class:`~peftc.methods.ln_tuning.select.TaskSelector` hands the block one row
  per sample
  for a single forward (:meth:`TaskLayerNorm.routed`).
* ``task_key`` (:class:`TaskKey`) sits after the final norm, on the data path as an identity. It owns the
  active task's key ``∈ R^C`` (``task_state: new``): task ``k`` (in order of creation) starts at row ``k`` of
  a fixed orthogonal matrix, so keys start mutually orthogonal. It also reads the query — the CLS token of the
  final-norm output — when a selector asks for it.

Folding: :meth:`TaskLayerNorm.folded` is an ``nn.LayerNorm`` holding the active task's row; :meth:`TaskKeyCore.folded`
is an identity. The deployed graph is the plain backbone for that task.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import lru_cache

import torch
import torch.nn.functional as F
from torch import nn

from peftc.blocks.contract import Block
from peftc.blocks.registry import Site, block_factory
from peftc.errors import PeftcError
from peftc.methods.ln_tuning.args import LNBankArgs, TaskKeyArgs

__all__ = ["QueryReady", "TaskKeyArgs", "TaskKeyCore", "TaskLayerNorm"]


class TaskLayerNorm(Block):
    """A normalisation without its own affine, followed by the active task's row (or one row per sample).

    ``layout`` says what it normalises, as the norm it replaces did: ``last`` (``LayerNorm`` over the trailing
    dims), ``channels_first`` (a ``LayerNorm2d`` over dim 1 of ``B×C×H×W``: ConvNeXt's stem and downsampling)
    or ``group`` (``GroupNorm`` with ``groups`` groups, GroupNorm(1, C) being LayerNorm over ``C×H×W``). The
    row is per channel in all three.
    """

    def __init__(self, normalized_shape: tuple[int, ...], eps: float = 1e-5,
                 weight: torch.Tensor | None = None, bias: torch.Tensor | None = None,
                 layout: str = "last", groups: int = 1, template: nn.Module | None = None):
        super().__init__()
        self.normalized_shape = tuple(normalized_shape)
        self.eps = eps
        self.layout = layout
        self.groups = groups
        w = weight.detach().clone() if weight is not None else torch.ones(self.normalized_shape)
        b = bias.detach().clone() if bias is not None else torch.zeros(self.normalized_shape, dtype=w.dtype,
                                                                       device=w.device)
        self.weight = nn.Parameter(w)
        self.bias = nn.Parameter(b)
        # The pretrained γ/β, for the selector's frozen pass. Plain tensors, not buffers: they are not task state
        # and not part of the delta (the backbone recreates them); _apply moves them with the module.
        self._pretrained = (w.clone(), b.clone())
        self._route: tuple[torch.Tensor, torch.Tensor] | None = None
        # the replaced norm (outside the module tree: never counted or saved), what ``folded`` gives back
        self._template = (template,)

    @classmethod
    def from_layernorm(cls, norm: nn.LayerNorm) -> TaskLayerNorm:
        return cls(tuple(norm.normalized_shape), norm.eps, norm.weight, norm.bias)

    @property
    def pretrained(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The pretrained (γ, β) this bank started from."""
        return self._pretrained

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w, b = self._route if self._route is not None else (self.weight, self.bias)
        one = w.dim() == len(self.normalized_shape)  # one row for the batch: the norm's own fused affine
        if self.layout == "group":
            if one:
                return F.group_norm(x, self.groups, w, b, self.eps)
            y = F.group_norm(x, self.groups, None, None, self.eps)
            view = (w.shape[0], -1) + (1,) * (y.dim() - 2)
            return y * w.reshape(view) + b.reshape(view)
        if self.layout == "channels_first":
            return self._last(x.movedim(1, -1), w, b, one).movedim(-1, 1)
        return self._last(x, w, b, one)

    def _last(self, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor, one: bool) -> torch.Tensor:
        """LayerNorm over the trailing dims with one row, or with one row per sample (``(B, *shape)``)."""
        if one:
            return F.layer_norm(x, self.normalized_shape, w, b, self.eps)
        y = F.layer_norm(x, self.normalized_shape, None, None, self.eps)
        view = (w.shape[0],) + (1,) * (y.dim() - 1 - len(self.normalized_shape)) + self.normalized_shape
        return y * w.reshape(view) + b.reshape(view)

    @contextmanager
    def routed(self, weight: torch.Tensor, bias: torch.Tensor) -> Iterator[None]:
        """Use these rows (``(C,)`` for all samples, or ``(B, C)`` one per sample) instead of the active task's."""
        previous = self._route
        self._route = (weight, bias)
        try:
            yield
        finally:
            self._route = previous

    def folded(self) -> nn.Module:
        """The replaced norm (an ``nn.LayerNorm`` for the last-dims layout) with the active task's row; modules
        rules attached under this path come along."""
        template = self._template[0]
        if template is None:
            norm: nn.Module = nn.LayerNorm(self.normalized_shape, eps=self.eps)
        else:
            norm = copy.deepcopy(template)
        norm.to(device=self.weight.device, dtype=self.weight.dtype)
        with torch.no_grad():
            norm.weight = nn.Parameter(self.weight.detach().clone())
            norm.bias = nn.Parameter(self.bias.detach().clone())
        for name, child in self.named_children():
            norm.add_module(name, child)
        return norm

    def _apply(self, fn: Callable[[torch.Tensor], torch.Tensor], recurse: bool = True) -> TaskLayerNorm:
        super()._apply(fn, recurse)
        self._pretrained = (fn(self._pretrained[0]), fn(self._pretrained[1]))
        return self

    def extra_repr(self) -> str:
        layout = "" if self.layout == "last" else f", {self.layout}" + (f"({self.groups})" if self.layout == "group"
                                                                         else "")
        return f"{self.normalized_shape}, eps={self.eps}{layout}, per-task affine"


class QueryReady(Exception):  # control flow, not an error
    """Raised by :class:`TaskKeyCore` to end a query-only forward once the query is read."""


def orthogonal_row(dim: int, index: int, seed: int = 0) -> torch.Tensor:
    """Row ``index`` of a fixed random orthogonal ``dim×dim`` matrix (a unit vector; rows are orthonormal).

    Past ``dim`` rows there is no orthogonal direction left; a seeded random unit vector is returned.
    """
    if index < dim:
        return _orthogonal(dim, seed)[index].clone()
    gen = torch.Generator().manual_seed(seed + 1 + index)
    v = torch.randn(dim, generator=gen)
    return v / v.norm()


@lru_cache(maxsize=4)
def _orthogonal(dim: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(dim, dim, generator=gen, dtype=torch.float64))
    return q.float()


class TaskKeyCore(Block):
    """The mechanics of the task key (the registered block is :class:`~peftc.methods.ln_tuning.key.TaskKey`):
    the active task's key (``R^C``); an identity on the data path that can read the query (the CLS token)."""

    def __init__(self, dim: int, seed: int = 0):
        super().__init__()
        self.dim = dim
        self.seed = seed
        self.key = nn.Parameter(orthogonal_row(dim, 0, seed))
        self._created = 1  # tasks created so far (the bank's first task owns row 0)
        self._capture: list[torch.Tensor] | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._capture is not None:
            self._capture.append(self.query_of(x))
            raise QueryReady
        return x

    @staticmethod
    def query_of(x: torch.Tensor) -> torch.Tensor:
        """The query from the final-norm output: the CLS token of ``(B, N, C)`` tokens, or pooled ``(B, C)``."""
        return x[:, 0] if x.dim() == 3 else x.flatten(1)

    @contextmanager
    def capturing(self) -> Iterator[list[torch.Tensor]]:
        """Within this context a forward stops here (:class:`QueryReady`) after storing the query."""
        box: list[torch.Tensor] = []
        self._capture = box
        try:
            yield box
        finally:
            self._capture = None

    def init_task(self, name: str, tensors: dict[str, torch.Tensor]) -> None:
        """A new task's key starts at the next orthogonal row (fresh per task, not a copy)."""
        key = tensors.get("key")
        if key is not None:
            with torch.no_grad():
                key.copy_(orthogonal_row(self.dim, self._created, self.seed).to(key))
        self._created += 1

    def folded(self) -> nn.Module:
        return nn.Identity()

    def extra_repr(self) -> str:
        return f"dim={self.dim}"


def _layout(norm: nn.Module, name: str) -> str:
    """Which normalisation ``norm`` computes, found by running it: over the trailing dims (``LayerNorm``), over
    the channels of ``B×C×H×W`` (``LayerNorm2d``), or GroupNorm's; anything else is refused."""
    weight, bias, eps = norm.weight, norm.bias, norm.eps
    like = weight if isinstance(weight, torch.Tensor) else torch.empty(0)
    gen = torch.Generator().manual_seed(0)
    x4 = x = torch.empty(0)
    if isinstance(norm, nn.GroupNorm):
        x = torch.randn(2, norm.num_channels, 3, 3, generator=gen).to(like)
        candidates = {"group": lambda: F.group_norm(x, norm.num_groups, weight, bias, eps)}
    else:
        shape = tuple(norm.normalized_shape)
        x = torch.randn(2, 3, *shape, generator=gen).to(like)
        candidates = {"last": lambda: F.layer_norm(x, shape, weight, bias, eps)}
        if len(shape) == 1:
            x4 = torch.randn(2, shape[0], 3, 3, generator=gen).to(like)
            candidates["channels_first"] = lambda: F.layer_norm(x4.movedim(1, -1), shape, weight, bias,
                                                                eps).movedim(-1, 1)
    for layout, expected in candidates.items():
        probe = x4 if layout == "channels_first" else x
        try:
            with torch.no_grad():
                if torch.allclose(norm(probe), expected(), atol=1e-5):
                    return layout
        except (RuntimeError, ValueError):
            continue
    raise PeftcError(f"ln_bank replaces a LayerNorm (over the trailing dims or, channels-first, over dim 1) or a "
                     f"GroupNorm; {name!r} ({type(norm).__name__}) normalises differently")


@block_factory("ln_bank")
def ln_bank(site: Site, args: LNBankArgs) -> nn.Module:
    """A norm with one scale/bias row per task, initialised from the pretrained γ/β (LN tuning)."""
    norm = site.module
    if not isinstance(norm, (nn.LayerNorm, nn.GroupNorm)):
        kind = type(norm).__name__ if norm is not None else "an operation"
        raise PeftcError(f"ln_bank replaces a LayerNorm or GroupNorm; {site.name!r} is {kind}")
    layout = _layout(norm, site.name)
    if layout == "last":
        return TaskLayerNorm.from_layernorm(norm)
    if isinstance(norm, nn.GroupNorm):
        return TaskLayerNorm((norm.num_channels,), norm.eps, norm.weight, norm.bias, layout, norm.num_groups,
                             _tensorless(norm))
    return TaskLayerNorm(tuple(norm.normalized_shape), norm.eps, norm.weight, norm.bias, layout,
                         template=_tensorless(norm))


def _tensorless(norm: nn.Module) -> nn.Module:
    """A copy of ``norm``'s code and configuration; ``folded`` gives it the task's row."""
    return copy.deepcopy(norm, {id(t): None for t in (*norm.parameters(), *norm.buffers())})
