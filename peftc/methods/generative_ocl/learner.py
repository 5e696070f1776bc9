"""The online generative classifier as an online learner (``train.online.learner: generative_ocl``).

Shen, Jie, Li & Deng, "Bypassing Logits Bias in Online Class-Incremental Learning with a Generative Framework"
(arXiv 2205.09347). The abstract (all that is public) says: the softmax classifier's logits are biased towards
recent classes; classify instead with a generative classifier in feature space built from the replay memory;
train the features with a pair-based metric-learning loss (which, the paper proves, optimises the feature
space generatively) plus a discriminative term that speeds up learning new classes. Our choices, each an arg:

* feature: the input of the model's classification head (``feature: head``), or the output of a named module
  (pooled over space when it is a map); L2-normalised (``normalize``).
* metric loss: Multi-Similarity (:mod:`.ms_loss`) with α = 2, β = 50, λ = 1, margin 0.1 (Wang et al. 2019, their
  CUB setting), over the incoming batch together with the replayed batch.
* discriminative term: cross-entropy of the model's own head (a proxy classifier, never used to predict) over
  the classes seen so far, on the same joint batch, weighted by ``ce_weight``.
* classifier: nearest class mean over the memory's features (:mod:`.ncm`), refreshed from the memory before
  every evaluation; the proxy head's softmax prediction is reported beside it.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any, ClassVar

import torch
import torch.nn.functional as F

from peftc.methods.generative_ocl.ms_loss import multi_similarity_loss
from peftc.methods.generative_ocl.ncm import class_means, ncm_predict
from peftc.train.learners import LearnerError, OnlineLearner, Replay, head_path, register_learner

__all__ = ["GenerativeLearner"]


@register_learner("generative_ocl")
class GenerativeLearner(OnlineLearner):
    """Multi-Similarity + weighted proxy cross-entropy in training; nearest class mean over the memory to predict."""

    classifiers: ClassVar[tuple[str, ...]] = ("ncm", "softmax")
    defaults: ClassVar[dict[str, Any]] = {"alpha": 2.0, "beta": 50.0, "lam": 1.0, "margin": 0.1,
                                          "ms_weight": 1.0, "ce_weight": 1.0, "feature": "head",
                                          "normalize": True, "eval_batch_size": 256}

    def __init__(self, model: Any, num_classes: int, args: Mapping[str, Any]):
        super().__init__(model, num_classes, args)
        feature = self.args["feature"]
        self.head_input = feature == "head"
        path = head_path(model) if self.head_input else str(feature)
        try:
            model.net.get_submodule(path)
        except AttributeError:
            raise LearnerError(f"online.args.feature: the model has no module {path!r}") from None
        self.path = path
        self.means = torch.zeros(0)
        self.present = torch.zeros(num_classes, dtype=torch.bool)

    @contextmanager
    def _tap(self) -> Iterator[list[torch.Tensor]]:
        """Capture the feature of every forward inside the block."""
        out: list[torch.Tensor] = []
        module = self.model.net.get_submodule(self.path)
        if self.head_input:
            handle = module.register_forward_pre_hook(lambda m, args: out.append(args[0]))
        else:
            handle = module.register_forward_hook(lambda m, args, y: out.append(y))
        try:
            yield out
        finally:
            handle.remove()

    def embed(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(logits of the proxy head, features) from one forward."""
        with self._tap() as taps:
            logits = self.model(images)
        feats = taps[-1]
        if feats.dim() == 4:
            feats = feats.mean((2, 3))
        feats = feats.flatten(1)
        return logits, F.normalize(feats, dim=1) if self.args["normalize"] else feats

    def loss(self, images: torch.Tensor, labels: torch.Tensor, replay: Replay) -> torch.Tensor:
        if replay is not None:
            images, labels = torch.cat([images, replay[0]]), torch.cat([labels, replay[1]])
        logits, feats = self.embed(images)
        a = self.args
        metric = multi_similarity_loss(feats, labels, alpha=a["alpha"], beta=a["beta"], lam=a["lam"],
                                       margin=a["margin"])
        return a["ms_weight"] * metric + a["ce_weight"] * F.cross_entropy(self.masked(logits), labels)

    @torch.no_grad()
    def prepare(self, memory: Any) -> None:
        if not len(memory):
            self.means, self.present = torch.zeros(0), torch.zeros_like(self.seen)
            return
        device = next(iter(self.model.parameters())).device
        step = int(self.args["eval_batch_size"])
        feats = torch.cat([self.embed(memory.images[i: i + step].to(device))[1]
                           for i in range(0, len(memory), step)])
        self.means, self.present = class_means(feats, memory.labels.to(device), len(self.seen),
                                               bool(self.args["normalize"]))

    @torch.no_grad()
    def predict(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        logits, feats = self.embed(images)
        softmax = self.masked(logits).argmax(1)
        if not self.present.any():  # an empty memory has no class means yet: the proxy head answers
            return {"ncm": softmax, "softmax": softmax}
        return {"ncm": ncm_predict(feats, self.means, self.present, bool(self.args["normalize"])),
                "softmax": softmax}
