"""LayerNorm tuning's three training stages (arXiv 2308.09610), on :mod:`peftc.methods.ln_tuning.select`'s API.

Per task, in order (``specs/ln_tuning.yaml``'s ``train.stages``):

* ``task_keys`` — only the task's key learns, ``loss = −mean cos(query, key_t)`` with the query from the frozen
  pretrained forward (:meth:`TaskSelector.key_loss`). No labels, no validation.
* ``fit`` with ``args: {temporary_head: true}`` — the task's LN rows and a *temporary copy* of the head, CE
  with the true task (the generic fit stage; the copy is checkpointed as stage state and dropped afterwards).
* ``rectify_head`` — only the real (shared) head learns, on features made with the *predicted* task of every
  sample (:meth:`TaskSelector.features`), over every class seen so far, so the head learns to live with
  selection errors. It validates the same way (predicted task, seen classes), which is what early stopping
  and the best-epoch restore use.

Importing this module registers ``task_keys`` and ``rectify_head``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from peftc.methods.ln_tuning.select import task_selector
from peftc.train.context import batches
from peftc.train.stages import Stage, register_stage

__all__ = ["RectifyHeadStage", "TaskKeysStage"]


@register_stage("task_keys")
class TaskKeysStage(Stage):
    """Stage (a): pull the task's key towards the frozen queries of its images."""

    validates = False
    ddp = False  # the query pass runs through the selector, not run.forward

    def parameters(self) -> list[nn.Parameter]:
        return task_selector(self.run.model).key_parameters()

    def loss(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return task_selector(self.run.model).key_loss(images)


@register_stage("rectify_head")
class RectifyHeadStage(Stage):
    """Stage (c): the shared head on predicted-task features, over all classes seen so far."""

    ddp = False  # features come from the selector's routed forward

    def _selector(self):  # type: ignore[no-untyped-def]
        sel = task_selector(self.run.model)
        sel.candidates = self.run.seen_tasks
        return sel

    def parameters(self) -> list[nn.Parameter]:
        return task_selector(self.run.model).head_parameters()

    def _logits(self, images: torch.Tensor) -> torch.Tensor:
        sel = self._selector()
        with torch.no_grad():
            features = sel.features(images)  # rows and keys stay out of this stage's graph
        return sel.classify(features)[:, : self.run.seen_classes]

    def loss(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(self._logits(images), labels + self.run.offset,
                               label_smoothing=self.recipe.label_smoothing)

    @torch.no_grad()
    def validate(self) -> float:
        model = self.run.model
        was = model.training
        model.train(False)
        correct = total = 0
        try:
            for images, labels, bad in batches(self.run.val_loader(self.recipe.batch_size), self.run.device):
                self.run.note_corrupt(bad)
                if labels.numel() == 0:
                    continue
                correct += int((self._logits(images).argmax(1) == labels + self.run.offset).sum())
                total += len(labels)
        finally:
            model.train(was)
        correct, total = self.run.dist.sum([correct, total])
        return correct / total if total else 0.0

    def end(self) -> None:
        task_selector(self.run.model).candidates = None
