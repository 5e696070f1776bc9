"""Numeric precision of a training run: autocast, fp16's loss scaling, and a frozen backbone kept in 16 bits.

* ``fp32``: no autocast. ``bf16``: ``torch.autocast`` in bfloat16 (CPU and CUDA); bf16 keeps fp32's exponent
  range, so no loss scaling. ``fp16``: autocast in float16 with a ``GradScaler`` (fp16 gradients underflow
  without it); CUDA only — CPUs have no fast fp16 arithmetic, so it is refused there with one message.
* Trained tensors always stay fp32 (autocast casts them per op; the optimizer updates fp32 masters).
* ``frozen_dtype`` stores the frozen weights of convolutions and linear layers — the bulk of a backbone's bytes,
  and exactly the ops autocast runs in low precision anyway — in bf16/fp16 for the run: half their memory
  (ViT-B/16 with LoRA: 85.6 M of its 86.9 M parameters, 342 MB → 171 MB). Tensors the artifact saves (trained, per
  task, shared) are never cast. Afterwards they return to fp32, rounded: evaluation then sees the weights the
  deltas were trained against.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from peftc.errors import PeftcError

__all__ = ["DTYPES", "FrozenCast", "Precision", "PrecisionError", "cast_frozen", "restore_frozen", "saved_names"]

DTYPES: dict[str, torch.dtype | None] = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
_LOW = {"bf16": torch.bfloat16, "fp16": torch.float16}
_CAST_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)


class PrecisionError(PeftcError):
    """A precision setting that this device or this combination of settings cannot run."""


def _check(name: str, what: str, choices: dict[str, Any]) -> None:
    if name not in choices:
        raise PrecisionError(f"{what} must be one of {', '.join(choices)}, got {name!r}")


@dataclass
class Precision:
    """How one run computes: the autocast dtype and, for fp16, the gradient scaler."""

    name: str
    device: torch.device
    scaler: Any = field(default=None, init=False)

    def __post_init__(self) -> None:
        _check(self.name, "--precision", DTYPES)
        if self.name == "fp16":
            if self.device.type != "cuda":
                raise PrecisionError(f"--precision fp16 needs a CUDA device (this run is on {self.device}); on a CPU "
                                     "use --precision bf16, which needs no loss scaling")
            self.scaler = torch.amp.GradScaler("cuda")

    @property
    def dtype(self) -> torch.dtype | None:
        return DTYPES[self.name]

    def autocast(self) -> contextlib.AbstractContextManager[Any]:
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)

    def backward(self, loss: torch.Tensor) -> None:
        (self.scaler.scale(loss) if self.scaler is not None else loss).backward()

    def unscale(self, optimizer: torch.optim.Optimizer) -> None:
        """Bring the gradients to their true scale (before clipping them)."""
        if self.scaler is not None:
            self.scaler.unscale_(optimizer)

    def step(self, optimizer: torch.optim.Optimizer) -> None:
        """The optimizer step; with fp16 it is skipped when a gradient overflowed, and the scale adapts."""
        if self.scaler is None:
            optimizer.step()
            return
        self.scaler.step(optimizer)
        self.scaler.update()


@dataclass
class FrozenCast:
    """What :func:`cast_frozen` changed (undone by :func:`restore_frozen`)."""

    names: list[str]
    bytes_before: int
    bytes_after: int


def saved_names(model: Any) -> set[str]:
    """Names (in ``model.net``) of every tensor the artifact stores: never cast."""
    names = set(model.shared_state()) | set(model.bank.tensor_slots) | set(model.schedule.managed)
    heads = tuple(f"{p}." for p in model.bank.module_slots)
    return {n for n, _ in model.net.named_parameters() if n in names or n.startswith(heads)}


def _frozen_weights(model: Any) -> Iterator[tuple[str, nn.Parameter]]:
    keep = saved_names(model)
    for path, module in model.net.named_modules():
        if not isinstance(module, _CAST_TYPES):
            continue
        for key, param in module.named_parameters(recurse=False):
            name = f"{path}.{key}" if path else key
            if not param.requires_grad and name not in keep and param.dtype == torch.float32:
                yield name, param


def cast_frozen(model: Any, name: str | None, precision: Precision) -> FrozenCast | None:
    """Store the frozen conv/linear weights of ``model`` in ``name`` (bf16 / fp16); None when ``name`` is None."""
    if name is None:
        return None
    _check(name, "--frozen-dtype", _LOW)
    if precision.dtype is None:
        raise PrecisionError(f"--frozen-dtype {name} needs autocast to compute with 16-bit weights: add --precision "
                             "bf16 (or fp16 on CUDA)")
    found = list(_frozen_weights(model))
    before = sum(p.numel() * p.element_size() for _, p in found)
    with torch.no_grad():
        for _, param in found:
            param.data = param.data.to(_LOW[name])
    after = sum(p.numel() * p.element_size() for _, p in found)
    return FrozenCast([n for n, _ in found], before, after)


def restore_frozen(model: Any, cast: FrozenCast | None) -> None:
    """Frozen weights back to fp32 (their values rounded to the 16-bit ones the run trained against)."""
    if cast is None:
        return
    with torch.no_grad():
        for name in cast.names:
            param = model.net.get_parameter(name)
            param.data = param.data.float()
