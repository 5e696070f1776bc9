"""Online learners (``train.online.learner``): how a compiled model learns from a task-free stream with replay.

The online runtime (:mod:`peftc.train.online`) owns the stream, the memory and the optimizer; a learner owns the
loss of one step and the predictions. It is told the labels it receives and nothing else — never a task
boundary. The default, ``er``, is experience replay with a softmax head (Chaudhry et al. 2019, "On Tiny Episodic
Memories in Continual Learning"; Mammoth ``models/er.py``): cross-entropy over the incoming batch and a batch
drawn from the memory. Methods subclass :class:`OnlineLearner` in their room and register it with
:func:`register_learner`; the runtime reaches them only through this registry.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, ClassVar

import torch
import torch.nn.functional as F

from peftc.errors import PeftcError, did_you_mean
from peftc.plugins import Registry

__all__ = ["LearnerError", "OnlineLearner", "Replay", "get_learner", "head_path", "learner_names", "register_learner"]

Replay = tuple[torch.Tensor, torch.Tensor] | None  # (images, labels) drawn from the memory; None while it is empty


class LearnerError(PeftcError):
    """An online learner cannot run with these arguments or this model."""


class OnlineLearner:
    """ER: softmax cross-entropy over the incoming batch and a replayed batch, over the classes seen so far.

    ``seen`` marks the labels received so far; logits of classes never received are masked in training and
    prediction (a class the learner has no sample of cannot be predicted). Subclasses override :meth:`loss` and,
    when they classify differently, :meth:`predict` and ``classifiers`` (the first is the learner's own).
    """

    name: ClassVar[str] = "er"
    classifiers: ClassVar[tuple[str, ...]] = ("softmax",)
    defaults: ClassVar[dict[str, Any]] = {}  # the learner's ``args`` and their defaults

    def __init__(self, model: Any, num_classes: int, args: Mapping[str, Any]):
        unknown = sorted(set(args) - set(self.defaults))
        if unknown:
            known = ", ".join(self.defaults) or "none"
            raise LearnerError(f"online learner {self.name!r} has no argument {unknown[0]!r}"
                               + did_you_mean(unknown[0], list(self.defaults)) + f" (its arguments: {known})")
        self.model = model
        self.args = {**self.defaults, **args}
        self.seen = torch.zeros(num_classes, dtype=torch.bool)

    def observe(self, labels: torch.Tensor) -> None:
        """Labels of the incoming batch: the only thing the stream tells the learner besides the images."""
        self.seen[labels.cpu()] = True

    def masked(self, logits: torch.Tensor, classes: torch.Tensor | None = None) -> torch.Tensor:
        """``logits`` with every class outside ``classes`` (default: the seen ones) at the dtype's minimum."""
        keep = (self.seen if classes is None else classes).to(logits.device)
        return logits.masked_fill(~keep, torch.finfo(logits.dtype).min)

    def loss(self, images: torch.Tensor, labels: torch.Tensor, replay: Replay) -> torch.Tensor:
        if replay is not None:
            images, labels = torch.cat([images, replay[0]]), torch.cat([labels, replay[1]])
        return F.cross_entropy(self.masked(self.model(images)), labels)

    def prepare(self, memory: Any) -> None:
        """Before an evaluation pass (the model in eval mode): refresh what prediction reads from ``memory``."""

    @torch.no_grad()
    def predict(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """Predicted labels per classifier (``classifiers`` order), the model in eval mode."""
        return {"softmax": self.masked(self.model(images)).argmax(1)}

    def state(self) -> dict[str, torch.Tensor]:
        """What the learner keeps between steps (checkpointed)."""
        return {"seen": self.seen.clone()}

    def load_state(self, state: Mapping[str, torch.Tensor]) -> None:
        self.seen = state["seen"].clone()


def head_path(model: Any) -> str:
    """The module path of the model's classification head (the graph's ``head`` role), for learners that read
    its input (features) or treat its rows per class."""
    from peftc.analysis.index import NodeIndex, block_positions
    from peftc.analysis.roles import head

    net = model.net
    for cand in head(NodeIndex(net, block_positions(net))):
        return str(cand.node.target)
    raise LearnerError(f"spec {model.spec.name!r} on {model.backbone.id}: the model has no classification head")


_LEARNERS: Registry[type[OnlineLearner]] = Registry("online learner", "online learners", {"er": OnlineLearner})


def register_learner(name: str) -> Callable[[type[OnlineLearner]], type[OnlineLearner]]:
    """Class decorator: make an OnlineLearner subclass available as ``train.online.learner: name``."""
    return _LEARNERS.named(name)


def learner_names() -> list[str]:
    return _LEARNERS.names()


def get_learner(name: str) -> type[OnlineLearner]:
    """The learner registered as ``name``; an unknown one is an error listing the known ones."""
    try:
        return _LEARNERS.find(name)
    except KeyError:
        raise _LEARNERS.unknown(name, "train.online.learner") from None
