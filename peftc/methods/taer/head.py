"""TaER as a training head (``train.head: taer``): the replay memory across tasks, the loss, the task selection."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from peftc.methods.taer.taer import REPLAY, ReplayBuffer, TaerObjective, taer_logits
from peftc.train.heads import TaskGuess, TrainHead, register_head

__all__ = ["TaerHead"]


@register_head("taer")
class TaerHead(TrainHead):
    """An incremental classifier over every class seen so far, trained with task-balanced experience replay."""

    def __init__(self, run: Any, recipe: Any):
        super().__init__(run, recipe)
        self.objective = TaerObjective(run, recipe)

    @classmethod
    def open_memory(cls, train_dir: Path, recipe: Any) -> ReplayBuffer:
        return ReplayBuffer.load(train_dir / REPLAY, recipe.replay.memory)

    @classmethod
    def close_memory(cls, memory: ReplayBuffer, train_dir: Path, task: str, data: Any, classes: int,
                     image_size: int, seed: int) -> None:
        memory.add_task(task, data, classes, image_size, seed)
        memory.save(train_dir / REPLAY)

    @classmethod
    def guess_tasks(cls, model: Any, tasks: list[str]) -> TaskGuess:
        """The argmax over the concatenated heads of ``tasks``: the class it falls in names the task."""
        classes = [model.bank.classes(t) for t in tasks]
        offsets = torch.tensor([0, *torch.tensor(classes).cumsum(0).tolist()[:-1]])

        def pick(images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            flat = taer_logits(model, images, tasks).argmax(1).cpu()
            task = torch.bucketize(flat, offsets, right=True) - 1
            return task, flat - offsets[task]

        return pick

    def begin(self) -> None:
        self.objective.begin()

    def end(self) -> None:
        self.objective.end()

    def frozen_parameters(self) -> list[nn.Parameter]:
        return self.objective.frozen_parameters()

    def loss(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return self.objective.loss(images, labels)

    def validate(self) -> float:
        return self.objective.validate()
