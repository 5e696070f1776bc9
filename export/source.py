"""What a backend deploys: a compiled model (given, or loaded from an artifact), prepared for one task or all.

Every backend starts here, so every backend agrees on what "the model for task T" is: a deep copy of the
compiled model switched to T, folded unless asked not to, in eval mode with frozen parameters — and the eager,
unfolded model it must match (the reference the exporters check parity against).
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from peftc.analysis.trace import image_input_size
from peftc.blocks.contract import Deployment, offers
from peftc.export.errors import ExportError
from peftc.export.fold import FoldReport, fold

__all__ = ["Deployable", "NamedInputs", "deploy_mode", "prepare", "resolve_model"]


def resolve_model(model_or_dir: Any) -> Any:
    """A compiled model: the one given, or the one an artifact directory holds (``peftc.load``)."""
    from peftc.runtime.model import Compiled

    if isinstance(model_or_dir, Compiled):
        return model_or_dir
    if isinstance(model_or_dir, (str, Path)):
        from peftc.compiler import load

        return load(model_or_dir)  # ArtifactError names a directory that is not an artifact
    raise ExportError(f"expected a compiled peftc model or an artifact directory, got {type(model_or_dir).__name__}")


@dataclass
class Deployable:
    """A module ready for a backend, the inputs it takes, and the eager reference it must reproduce."""

    module: nn.Module
    input_size: tuple[int, int, int]
    task: str | None  # None when all tasks are served (a ``task`` input selects per sample)
    tasks: list[str]
    classes: list[int | None]
    reference: Callable[..., torch.Tensor]
    fold: FoldReport | None
    spec: str
    backbone: str
    selects_task: bool = False  # the graph picks each sample's task itself (a block's deploy mode): no task input
    streams: tuple[Any, ...] = field(default=())  # second inputs (``stream`` rules' StreamInput), after the image

    @property
    def input_names(self) -> list[str]:
        return ["image", *(s.name for s in self.streams), *(["task"] if self.all_tasks else [])]

    @property
    def all_tasks(self) -> bool:
        """True when a ``task`` input chooses each sample's task."""
        return self.task is None and not self.selects_task

    def example(self, batch: int, seed: int = 0) -> tuple[torch.Tensor, ...]:
        """A seeded random input batch (with a task id per sample, cycling through tasks, when all tasks); second
        inputs get ``batch + 1`` tokens, so checks at another batch also run another token count."""
        gen = torch.Generator().manual_seed(seed)
        x = torch.randn(batch, *self.input_size, generator=gen)
        streams = tuple(s.example(batch, batch + 1, generator=gen) for s in self.streams)
        if self.all_tasks:
            return x, *streams, torch.arange(batch, dtype=torch.int64) % len(self.tasks)
        return (x, *streams)


def prepare(
    model: Any,
    *,
    task: str | None = None,
    fold_weights: bool = True,
    all_tasks: bool = False,
    select_task: bool = False,
    image_size: tuple[int, int] | None = None,
) -> Deployable:
    """The module a backend should run for ``task`` (default: the active one) or for all tasks at once —
    chosen per sample by a ``task`` input (``all_tasks``) or by the model itself (``select_task``: the deploy mode
    of that name a block of the model offers, see :mod:`peftc.blocks.contract`)."""
    if sum((task is not None, all_tasks, select_task)) > 1:
        raise ExportError("give one of a task, all tasks or task selection, not several")
    size = image_input_size(tuple(model.backbone.input_size), image_size)
    streams = tuple(model.ledger.streams.values())
    if streams and (all_tasks or select_task):
        raise ExportError(f"a model with a second input ({', '.join(s.name for s in streams)}) exports one task")
    reference_model = copy.deepcopy(model).eval()
    info = {"spec": model.spec.name, "backbone": model.backbone.id, "input_size": size, "tasks": list(model.tasks),
            "classes": [model.bank.classes(t) for t in model.tasks]}
    if all_tasks:
        from peftc.export.multitask import all_tasks_graph

        routed = all_tasks_graph(model)
        return Deployable(routed.module, task=None, reference=_per_sample(reference_model), fold=None, **info)
    if select_task:
        selected = deploy_mode(model, "select_task")
        info["tasks"] = selected.tasks
        info["classes"] = [model.bank.classes(t) for t in selected.tasks]
        return Deployable(selected.module, task=None, reference=selected.reference, fold=None, selects_task=True,
                          **info)
    if task is not None:
        reference_model.set_task(task)  # TaskError lists the known tasks
    active = reference_model.active_task
    if fold_weights:
        folded = fold(model, task=active)
        module, report = folded.module, folded.report
    else:
        module, report = copy.deepcopy(reference_model.net).eval(), None
        for p in module.parameters():
            p.requires_grad_(False)
    if streams:
        module = NamedInputs(module, [s.name for s in streams])
    return Deployable(module, task=active, reference=_no_grad(NamedInputs(reference_model, [s.name for s in streams])),
                      fold=report, streams=streams, **info)


class NamedInputs(nn.Module):
    """Takes the second inputs (``stream`` rules) by position and passes them by name, so a backend feeds every
    input by position: ``(image, memory)``."""

    def __init__(self, net: nn.Module, names: list[str]):
        super().__init__()
        self.net = net
        self.names = names

    def forward(self, x: torch.Tensor, *streams: torch.Tensor) -> torch.Tensor:
        return self.net(x, **dict(zip(self.names, streams)))


def _no_grad(model: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
    def run(*inputs: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return model(*inputs)

    return run


def _per_sample(model: Any) -> Callable[..., torch.Tensor]:
    """The eager all-tasks reference: each sample through ``set_task(its task)``, heads padded with -inf."""

    def run(x: torch.Tensor, task: torch.Tensor) -> torch.Tensor:
        outs = []
        with torch.no_grad():
            for name in model.tasks:
                model.set_task(name)
                outs.append(model(x))
        width = max(o.shape[-1] for o in outs)
        result = torch.full((x.shape[0], width), float("nan"))
        for row, t in enumerate(task.tolist()):
            if 0 <= t < len(outs):
                result[row] = float("-inf")
                result[row, : outs[t].shape[-1]] = outs[t][row]
        return result

    return run


def deploy_mode(model: Any, mode: str) -> Deployment:
    """Build deploy mode ``mode`` from the first block class of ``model`` that offers it."""
    offered: dict[str, Any] = {}
    for module in model.net.modules():
        if offers(module, "deploy_modes"):
            for name, build in type(module).deploy_modes().items():
                offered.setdefault(name, build)
    if mode not in offered:
        what = f"; this model offers {', '.join(sorted(offered))}" if offered else ""
        raise ExportError(f"spec {model.spec.name!r} has no block that offers the {mode!r} deployment (a graph "
                          f"that selects each sample's task itself needs task keys, for instance){what}")
    return offered[mode](model)
