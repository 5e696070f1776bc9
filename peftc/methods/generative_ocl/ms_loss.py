"""The Multi-Similarity loss (Wang, Han, Huang, Dong & Scott, CVPR 2019, eq. 10-12), in plain tensor ops.

With S = the cosine similarities of the L2-normalised features of a batch, for each anchor i:

* mining (margin ε): a negative k (y_k ≠ y_i) is kept when S_ik > min_{y_j = y_i, j ≠ i} S_ij − ε; a positive j
  (y_j = y_i, j ≠ i) is kept when S_ij < max_{y_k ≠ y_i} S_ik + ε;
* weighting: L_i = 1/α · log(1 + Σ_{kept positives j} e^{−α (S_ij − λ)})
                + 1/β · log(1 + Σ_{kept negatives k} e^{β (S_ik − λ)});
* L = the mean of L_i over the batch (an anchor with nothing kept adds 0, as in the authors' code, which also
  divides by the batch size).

An anchor without a positive in the batch mines no negative (nothing to compare against), and vice versa.
"""

from __future__ import annotations

import torch

__all__ = ["multi_similarity_loss"]


def multi_similarity_loss(features: torch.Tensor, labels: torch.Tensor, *, alpha: float = 2.0, beta: float = 50.0,
                          lam: float = 1.0, margin: float = 0.1) -> torch.Tensor:
    """MS loss of L2-normalised ``features`` (n × d) with ``labels`` (n); see the module docstring."""
    sim = features @ features.T
    same = labels[:, None] == labels[None, :]
    eye = torch.eye(len(labels), dtype=torch.bool, device=labels.device)
    pos, neg = same & ~eye, ~same
    inf = torch.tensor(float("inf"), dtype=sim.dtype, device=sim.device)
    hardest_pos = torch.where(pos, sim, inf).min(1, keepdim=True).values  # +inf: no positive
    hardest_neg = torch.where(neg, sim, -inf).max(1, keepdim=True).values  # -inf: no negative
    kept_neg = neg & (sim + margin > hardest_pos)
    kept_pos = pos & (sim - margin < hardest_neg)
    zero = torch.zeros((), dtype=sim.dtype, device=sim.device)
    pos_term = torch.log1p(torch.where(kept_pos, torch.exp(-alpha * (sim - lam)), zero).sum(1)) / alpha
    neg_term = torch.log1p(torch.where(kept_neg, torch.exp(beta * (sim - lam)), zero).sum(1)) / beta
    return (pos_term + neg_term).mean()
