"""Training heads (``train.head``): how a task's classifier learns, beside the default of one head per task.

The default, ``task``, trains each task's own head with cross-entropy on its own classes. A method that learns
its classifier differently — TaER's incremental classifier over every class seen so far, trained with a replay
memory — subclasses :class:`TrainHead` in its room and registers it with :func:`register_head`; the trainer,
the fit stage and evaluation reach it only through these hooks.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from peftc.plugins import Registry

__all__ = ["TaskGuess", "TrainHead", "get_head", "head_names", "register_head"]

# Maps a batch of images to the index (into the task list it was built for) of each image's predicted task and
# the class predicted within that task.
TaskGuess = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


class TrainHead:
    """The default head: each task trains its own; every hook here is what the trainer does without one."""

    name: ClassVar[str] = "task"

    def __init__(self, run: Any, recipe: Any):
        self.run = run
        self.recipe = recipe

    # -- across tasks (class level: the memory outlives one task's run) -----------------------------------
    @classmethod
    def open_memory(cls, train_dir: Path, recipe: Any) -> Any:
        """What this head keeps across tasks (a replay memory), read from the artifact's ``train/`` folder."""
        return None

    @classmethod
    def close_memory(cls, memory: Any, train_dir: Path, task: str, data: Any, classes: int, image_size: int,
                     seed: int) -> None:
        """Task ``task`` finished: update the memory with its data and write it back."""

    @classmethod
    def guess_tasks(cls, model: Any, tasks: list[str]) -> TaskGuess | None:
        """How an image's task is predicted among ``tasks`` for models trained with this head (None: it is not)."""
        return None

    @classmethod
    def guesses_tasks(cls) -> bool:
        """True when models trained with this head can predict an image's task (it overrides guess_tasks)."""
        return cls.guess_tasks.__func__ is not TrainHead.guess_tasks.__func__

    # -- within the fit stage -----------------------------------------------------------------------------
    def begin(self) -> None:
        """Before the first epoch (also after a resume)."""

    def end(self) -> None:
        """After the last epoch."""

    def frozen_parameters(self) -> list[nn.Parameter]:
        """Trainable-looking parameters the optimizer must leave alone (old tasks' heads read detached)."""
        return []

    def loss(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor | None:
        """The batch's loss; None: the fit stage's cross-entropy on the task's own head."""
        return None

    def validate(self) -> float | None:
        """Validation accuracy; None: the run's own."""
        return None


_HEADS: Registry[type[TrainHead]] = Registry("training head", "heads", {"task": TrainHead})


def register_head(name: str) -> Callable[[type[TrainHead]], type[TrainHead]]:
    """Class decorator: make a TrainHead subclass available to recipes as ``train.head: name``."""
    return _HEADS.named(name)


def head_names() -> list[str]:
    return _HEADS.names()


def get_head(name: str, where: Any = None) -> type[TrainHead]:
    """The head registered as ``name``; an unknown one is a SpecError at ``where``."""
    try:
        return _HEADS.find(name)
    except KeyError:
        raise _HEADS.unknown(name, where) from None
