"""TaER in the online runtime (``train.online.learner: taer``): its two mechanisms without task boundaries.

The epoch trainer's TaER (:mod:`.taer`) knows tasks: old tasks' heads enter detached, and the replay loss is
balanced per task. A task-free stream names no task, so our reading turns both into per-batch rules: the
classes of the incoming batch are the "current task" — every other class's row of the head enters the logits
through ``weight.detach()`` (no gradient reaches it, from the stream or from the replayed batch), and the loss
over the joint batch is balanced per class (each class present counts equally: ``balance: class``), or is
``L_stream + λ · L_replay`` for a number λ. This is the nearest task-free analogue we could derive from the
abstract (arXiv 2302.11730), not the authors' algorithm; ER-ACE (``er_ace``) is the published mechanism closest
to it (it masks absent classes' logits instead of detaching their weights).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from peftc.train.learners import LearnerError, OnlineLearner, Replay, head_path, register_learner

__all__ = ["TaerOnline"]


@register_learner("taer")
class TaerOnline(OnlineLearner):
    """Classes absent from the incoming batch keep their head rows; the joint loss is balanced per class."""

    defaults: ClassVar[dict[str, Any]] = {"balance": "class"}

    def __init__(self, model: Any, num_classes: int, args: Mapping[str, Any]):
        super().__init__(model, num_classes, args)
        self.path = head_path(model)
        if not isinstance(model.net.get_submodule(self.path), nn.Linear):
            raise LearnerError(f"online learner 'taer' detaches rows of a Linear head; {self.path} is not one")
        balance = self.args["balance"]
        if balance != "class" and not (isinstance(balance, (int, float)) and balance >= 0):
            raise LearnerError(f"online.args.balance: 'class' or a number >= 0, got {balance!r}")

    def loss(self, images: torch.Tensor, labels: torch.Tensor, replay: Replay) -> torch.Tensor:
        head = self.model.net.get_submodule(self.path)
        live = torch.zeros_like(self.seen)
        live[labels.cpu()] = True
        live = live.to(head.weight.device)

        def detach_absent(module: nn.Linear, args: tuple[torch.Tensor, ...], out: torch.Tensor) -> torch.Tensor:
            weight = torch.where(live[:, None], module.weight, module.weight.detach())
            bias = None if module.bias is None else torch.where(live, module.bias, module.bias.detach())
            return F.linear(args[0], weight, bias)

        b = len(labels)
        if replay is not None:
            images, labels = torch.cat([images, replay[0]]), torch.cat([labels, replay[1]])
        handle = head.register_forward_hook(detach_absent)
        try:
            logits = self.model(images)
        finally:
            handle.remove()
        per_sample = F.cross_entropy(self.masked(logits), labels, reduction="none")
        balance = self.args["balance"]
        if balance == "class":
            weights = 1.0 / torch.bincount(labels, minlength=len(self.seen)).to(per_sample.dtype)[labels]
            return (weights * per_sample).sum() / weights.sum()
        if replay is None:
            return per_sample.mean()
        return per_sample[:b].mean() + float(balance) * per_sample[b:].mean()
