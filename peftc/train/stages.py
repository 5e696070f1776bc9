"""Training stages: the steps of a method's per-task procedure, named in a spec's ``train.stages``.

Most methods have one stage, ``fit``: cross-entropy on the task's classes over everything the spec trains (and,
when the spec has a ``schedule:``, only what the active phase trains — ConFiT's hierarchical fine-tuning,
applied through ``model.schedule_at(epoch / epochs)`` at the start of every epoch). Methods whose papers train
in several steps list them (keys → LN rows → head rectification, say).

A stage is a class registered under a name with :func:`register_stage`; the epoch loop asks it which
parameters to optimise, the loss of a batch, and whether it validates (stages that validate get early stopping
and the best-epoch restore). Stages that belong to one method live in its room (:mod:`peftc.methods`) and register
themselves when it is imported (:mod:`peftc.plugins` does, on the first lookup); third-party stages register
from Python, like blocks.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from peftc.errors import SpecError
from peftc.language import StageDecl, TrainSection
from peftc.plugins import Registry
from peftc.train.context import TaskRun
from peftc.train.heads import get_head

__all__ = ["FitStage", "Stage", "make_stage", "register_stage", "stage_names"]

_STAGES: Registry[type[Stage]] = Registry("training stage", "stages")



class Stage:
    """One stage of a task's training. Subclasses override what differs from plain supervised fitting."""

    name: ClassVar[str] = "stage"
    validates: ClassVar[bool] = True  # has a validation accuracy: early stopping and best-epoch restore apply
    # The loss goes through ``run.forward`` (DistributedDataParallel syncs the gradients). A stage whose loss
    # takes another path (a selector's routed forward, say) sets False: the loop then averages gradients itself.
    ddp: ClassVar[bool] = True

    def __init__(self, decl: StageDecl, run: TaskRun, recipe: TrainSection):
        self.decl = decl
        self.run = run
        self.recipe = recipe

    @property
    def label(self) -> str:
        return self.decl.label or self.decl.stage

    def parameters(self) -> list[nn.Parameter]:
        """What this stage's optimizer updates."""
        return list(self.run.model.trainable_parameters())

    def begin(self) -> None:
        """Called once before the first epoch this process runs (also after a resume)."""

    def begin_epoch(self, epoch: int, epochs: int) -> bool:
        """Called before each epoch; returns True when the set of trainable parameters changed."""
        return False

    def loss(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def validate(self) -> float | None:
        return self.run.validate() if self.validates else None

    def end(self) -> None:
        """Called once after the last epoch (after the best epoch was restored)."""

    def extra_state(self) -> dict[str, torch.Tensor]:
        """Tensors this stage keeps outside the model (a temporary head, say) that a checkpoint must hold."""
        return {}

    def load_extra_state(self, tensors: dict[str, torch.Tensor]) -> None:
        """Restore what :meth:`extra_state` returned (on resume)."""


def register_stage(name: str) -> Callable[[type[Stage]], type[Stage]]:
    """Class decorator: make a Stage subclass available to specs as ``stage: name``."""
    return _STAGES.named(name)


def stage_names() -> list[str]:
    return _STAGES.names()


def make_stage(decl: StageDecl, run: TaskRun, recipe: TrainSection, where: Any = None) -> Stage:
    """Build the stage a spec names; an unknown name is a SpecError at ``where``."""
    try:
        stage = _STAGES.find(decl.stage)
    except KeyError:
        raise _STAGES.unknown(decl.stage, where) from None
    return stage(decl, run, recipe)


def supervised_loss(logits: torch.Tensor, labels: torch.Tensor, recipe: TrainSection) -> torch.Tensor:
    return F.cross_entropy(logits, labels, label_smoothing=recipe.label_smoothing)


@register_stage("fit")
class FitStage(Stage):
    """Cross-entropy on the task's own head over what the spec trains, or the recipe's training head's loss.

    With a ``schedule:`` in the spec, the optimizer covers every tensor any phase trains and each epoch starts
    with ``model.schedule_at(epoch / epochs)``, which switches ``requires_grad`` for the phase.
    """

    def __init__(self, decl: StageDecl, run: TaskRun, recipe: TrainSection):
        super().__init__(decl, run, recipe)
        unknown = sorted(set(decl.args) - {"temporary_head"})
        if unknown:
            raise SpecError(f"stage 'fit' takes args temporary_head, not {', '.join(unknown)}")
        self._temporary: TemporaryHead | None = None
        self.head = get_head(recipe.head)(run, recipe)

    @property
    def _scheduled(self) -> bool:
        model = self.run.model
        return bool(model.spec.schedule) and hasattr(model, "schedule_at")

    def parameters(self) -> list[nn.Parameter]:
        model = self.run.model
        if self._scheduled:
            return list(model.schedule.parameters(model.net))
        params = super().parameters()
        frozen = {id(p) for p in self.head.frozen_parameters()}  # e.g. old tasks' heads, read detached
        return [p for p in params if id(p) not in frozen]

    def begin(self) -> None:
        if self.decl.args.get("temporary_head"):
            self._temporary = TemporaryHead(self.run.model)
        self.head.begin()

    def extra_state(self) -> dict[str, torch.Tensor]:
        return self._temporary.state() if self._temporary is not None else {}

    def load_extra_state(self, tensors: dict[str, torch.Tensor]) -> None:
        if self._temporary is not None and tensors:
            self._temporary.load(tensors)

    def begin_epoch(self, epoch: int, epochs: int) -> bool:
        if not self._scheduled:
            return False
        change = self.run.model.schedule_at(min(1.0, epoch / max(1, epochs)))
        if change.changed:
            self.run.reporter.note(f"  schedule phase {change.label!r} from epoch {epoch + 1}: "
                                   f"+{len(change.trained)} / -{len(change.frozen)} trainable tensors")
        return change.changed

    def loss(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        loss = self.head.loss(images, labels)
        if loss is not None:
            return loss
        return supervised_loss(self.run.task_logits(self.run.forward(images)), labels, self.recipe)

    def validate(self) -> float | None:
        accuracy = self.head.validate()
        return accuracy if accuracy is not None else super().validate()

    def end(self) -> None:
        if self._temporary is not None:
            self._temporary.remove()
            self._temporary = None
        self.head.end()
        if self._scheduled:
            self.run.model.schedule_at(1.0)  # leave the model as the rules made it (every phase's tensors)


class TemporaryHead:
    """A trainable copy of the classification head(s) in place of the real one(s), for one stage.

    LayerNorm tuning fits each task's LN rows with a temporary head and trains the real, shared head in a later
    stage; the real head is untouched meanwhile and comes back by :meth:`remove`.
    """

    def __init__(self, model: Any):
        from peftc.analysis.index import NodeIndex, block_positions
        from peftc.analysis.roles import head

        self.model = model
        net = model.net
        self.paths = [str(c.node.target) for c in head(NodeIndex(net, block_positions(net)))]
        if not self.paths:
            raise SpecError(f"temporary_head: spec {model.spec.name!r} has no classification head to copy")
        self.originals = {p: net.get_submodule(p) for p in self.paths}
        self.copies = {p: copy.deepcopy(m) for p, m in self.originals.items()}
        for module in self.copies.values():
            module.requires_grad_(True)
        for path, module in self.copies.items():
            net.set_submodule(path, module)

    def state(self) -> dict[str, torch.Tensor]:
        return {f"{p}.{k}": v for p, m in self.copies.items() for k, v in m.state_dict().items()}

    def load(self, tensors: dict[str, torch.Tensor]) -> None:
        for path, module in self.copies.items():
            prefix = f"{path}."
            module.load_state_dict({k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)})

    def remove(self) -> None:
        for path, module in self.originals.items():
            self.model.net.set_submodule(path, module)

