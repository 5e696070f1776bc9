"""ER-ACE — experience replay with asymmetric cross-entropy (Caccia et al., ICLR 2022, "New Insights on Reducing
Abrupt Representation Change in Online Continual Learning"), as Mammoth's ``models/er_ace.py`` computes it:

* stream loss: cross-entropy of the incoming batch with the logits of every class absent from that batch masked
  out, except the classes from the highest label seen so far upwards (Mammoth unmasks ``seen_so_far.max():``,
  i.e. that class and every class above it, while the highest label is not the last class); the mask applies
  once replay has begun;
* replay loss: plain cross-entropy of a replayed batch over all classes, added with weight 1.

Mammoth starts masking and replaying at the second task (``current_task > 0``): a boundary the task-free stream
does not give, so here both start as soon as the memory holds a sample — our only departure.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from peftc.train.learners import OnlineLearner, Replay, register_learner

__all__ = ["ErAce"]


@register_learner("er_ace")
class ErAce(OnlineLearner):
    """Asymmetric cross-entropy: the incoming batch competes only with its own (and future) classes."""

    def loss(self, images: torch.Tensor, labels: torch.Tensor, replay: Replay) -> torch.Tensor:
        logits = self.model(images)
        if replay is None:
            return F.cross_entropy(logits, labels)
        keep = torch.zeros_like(self.seen)
        keep[labels.cpu()] = True
        highest = int(self.seen.nonzero().max())
        if highest < len(self.seen) - 1:  # Mammoth: unmask from the highest seen label on, while any is unseen
            keep[highest:] = True
        stream = F.cross_entropy(self.masked(logits, keep), labels)
        return stream + F.cross_entropy(self.model(replay[0]), replay[1])
