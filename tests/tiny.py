"""The tiny CNN the trainer's tests train (importable by worker processes without pulling in pytest)."""

from __future__ import annotations

import torch
from torch import nn


class Tiny(nn.Module):
    """One conv, one BatchNorm, one Linear: BitFit trains the biases; frozen BN statistics keep it batch-free."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.bn(self.conv(x))).mean((2, 3)))
