"""The generative classifier: nearest class mean over the replay memory's features (Mensink et al. 2013; iCaRL's
NME; Avalanche ``NCMClassifier``; PyCIL's NME accuracy).

Each class present in the memory is represented by the mean of its samples' L2-normalised features, itself
L2-normalised (``normalize``); an image goes to the class whose mean is nearest in squared Euclidean distance.
With unit vectors that is the class of highest cosine similarity — a classifier with no trained weights, so it
has no logits bias towards the classes the stream showed last.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["class_means", "ncm_predict"]


def class_means(features: torch.Tensor, labels: torch.Tensor, num_classes: int,
                normalize: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """(means, present): one row per class (zeros for classes without a sample), and which classes have one."""
    if normalize:
        features = F.normalize(features, dim=1)
    sums = torch.zeros(num_classes, features.shape[1], dtype=features.dtype, device=features.device)
    sums.index_add_(0, labels, features)
    counts = torch.bincount(labels, minlength=num_classes)
    present = counts > 0
    means = sums / counts.clamp(min=1)[:, None].to(features.dtype)
    return (F.normalize(means, dim=1) if normalize else means), present


def ncm_predict(features: torch.Tensor, means: torch.Tensor, present: torch.Tensor,
                normalize: bool = True) -> torch.Tensor:
    """The nearest present class mean of each feature row."""
    if normalize:
        features = F.normalize(features, dim=1)
    distance = torch.cdist(features, means).pow(2)
    return distance.masked_fill(~present, float("inf")).argmin(1)
