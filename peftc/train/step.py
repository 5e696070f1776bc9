"""One optimizer step from one or more micro-batches: loss weighting, gradient accumulation, the cross-process
gradient mean for stages outside DDP, loss scaling (fp16), clipping, the optimizer and the lr schedule.

With ``accumulate`` N each optimizer step sees N micro-batches. Each micro-batch's mean loss is weighted by its
share of the step's samples, so the summed gradient is the gradient of the mean loss over all N × batch
samples — exactly what one batch N times larger gives (tested to 1e-5 when nothing in the model depends on the
batch: no dropout, no batch statistics). The lr schedule counts optimizer steps. Under DDP the gradient
all-reduce runs once per optimizer step (``no_sync`` on the other micro-batches).
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch
from torch import nn

from peftc.train.precision import Precision
from peftc.train.recipe import LRSchedule

__all__ = ["Stepper", "average_gradients", "optimizer_steps"]


def optimizer_steps(batches: int, accumulate: int) -> int:
    """Optimizer steps in an epoch of ``batches`` micro-batches (a last, shorter group still steps)."""
    return -(-batches // accumulate)


class Stepper:
    """Feeds micro-batch losses in; steps the optimizer every ``accumulate`` of them and at the epoch's end."""

    def __init__(self, optimizer: torch.optim.Optimizer, schedule: LRSchedule, params: list[nn.Parameter],
                 precision: Precision, accumulate: int = 1, grad_clip: float | None = None,
                 average: Any = None):
        self.optimizer = optimizer
        self.schedule = schedule
        self.params = params
        self.precision = precision
        self.accumulate = accumulate
        self.grad_clip = grad_clip
        self.average = average  # callable(params) for stages whose loss does not go through DDP, else None
        self._samples = 0  # samples this process sees in the epoch
        self._batches = 0
        self._per_batch = 1
        self._group = 1
        self._pending = False

    def start_epoch(self, samples: int, batches: int, per_batch: int) -> None:
        self._samples, self._batches, self._per_batch = samples, batches, per_batch
        self._pending = False

    def _closes_group(self, index: int) -> bool:
        return index % self.accumulate == self.accumulate - 1 or index == self._batches - 1

    def sync(self, ddp: nn.Module | None, index: int) -> contextlib.AbstractContextManager[Any]:
        """Wrap micro-batch ``index``'s forward and backward: no gradient all-reduce until the step's last one."""
        if ddp is None or self._closes_group(index) or not hasattr(ddp, "no_sync"):
            return contextlib.nullcontext()
        return ddp.no_sync()

    def backward(self, index: int, loss: torch.Tensor, samples: int) -> bool:
        """Accumulate micro-batch ``index``'s gradient; True when this closed a group and the optimizer stepped."""
        if not self._pending:
            self.optimizer.zero_grad(set_to_none=True)
            start = (index // self.accumulate) * self.accumulate * self._per_batch
            self._group = max(1, min(self.accumulate * self._per_batch, self._samples - start))
        weight = 1.0 if self.accumulate == 1 else samples / self._group
        self.precision.backward(loss * weight if weight != 1.0 else loss)
        self._pending = True
        if self._closes_group(index):
            self.update()
            return True
        return False

    def update(self) -> None:
        """The optimizer step for the gradients gathered so far (no-op when there are none)."""
        if not self._pending:
            return
        if self.average is not None:
            self.average(self.params)
        if self.grad_clip is not None:
            self.precision.unscale(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.params, self.grad_clip)
        self.precision.step(self.optimizer)
        self.schedule.step()
        self._pending = False


def average_gradients(params: list[nn.Parameter], world: int, device: torch.device) -> None:
    """Mean of every gradient over the processes (for stages whose loss does not go through DDP).

    A parameter without a gradient on some process joins with zeros; one without a gradient anywhere keeps
    none, so the optimizer skips it as it would in a single process.
    """
    has = torch.tensor([p.grad is not None for p in params], dtype=torch.float32, device=device)
    torch.distributed.all_reduce(has)
    for p, flag in zip(params, has.tolist()):
        if not flag:
            continue
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        torch.distributed.all_reduce(p.grad)
        p.grad.div_(world)
