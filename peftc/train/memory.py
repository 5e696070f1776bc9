"""The replay memory of online learning: a fixed number of stream samples, kept by reservoir sampling.

Online class-incremental learning sees every sample once, so the memory is the only way an old class comes back.
Two policies, both decided per incoming sample from the stream alone (no task boundary is needed):

* ``reservoir`` — Vitter's algorithm R: after n samples every one of them is in the memory with the same
  probability ``capacity / n`` (the ER baseline of Chaudhry et al. 2019, Mammoth's ``Buffer``).
* ``balanced`` — class-balanced reservoir sampling (CBRS, Chrysakis & Moens, ICML 2020): when the memory is full,
  a sample of a class that is not among the largest replaces a random sample of a largest class; a sample of a
  largest class replaces a random sample of its own class with probability ``stored_c / seen_c``.

The memory holds the transformed image tensors (what the learner trains on) and their labels, plus its own
random generator; :meth:`state` / :meth:`load_state` round-trip all of it through safetensors for checkpoints.
"""

from __future__ import annotations

import torch

__all__ = ["ReplayMemory"]


class ReplayMemory:
    """``capacity`` (image, label) pairs chosen from the stream by ``policy`` (see the module docstring)."""

    def __init__(self, capacity: int, policy: str = "reservoir", seed: int = 0):
        if policy not in ("reservoir", "balanced"):
            raise ValueError(f"unknown memory policy {policy!r}")
        self.capacity = capacity
        self.policy = policy
        self._images = torch.empty(0)  # preallocated to ``capacity`` on the first sample
        self._labels = torch.empty(0, dtype=torch.long)
        self.size = 0
        self.seen = 0  # stream samples offered so far
        self.seen_per_class: dict[int, int] = {}
        self.generator = torch.Generator().manual_seed(seed)

    def __len__(self) -> int:
        return self.size

    @property
    def images(self) -> torch.Tensor:
        return self._images[: self.size]

    @property
    def labels(self) -> torch.Tensor:
        return self._labels[: self.size]

    def _randint(self, high: int) -> int:
        return int(torch.randint(high, (1,), generator=self.generator))

    def _slot(self, label: int) -> int | None:
        """Where an incoming sample goes when the memory is full (None: it is not kept)."""
        if self.policy == "reservoir":
            j = self._randint(self.seen)
            return j if j < self.capacity else None
        counts = torch.bincount(self.labels)
        largest = (counts == counts.max()).nonzero().flatten()
        if label >= len(counts) or label not in largest:  # replace a random sample of a largest class
            victim = largest[self._randint(len(largest))]
        else:  # reservoir sampling within the sample's own class
            if self._randint(self.seen_per_class[label]) >= int(counts[label]):
                return None
            victim = torch.tensor(label)
        slots = (self.labels == victim).nonzero().flatten()
        return int(slots[self._randint(len(slots))])

    def add(self, images: torch.Tensor, labels: torch.Tensor) -> None:
        """Offer a stream batch, sample by sample, in order."""
        images, labels = images.detach().cpu(), labels.detach().cpu()
        if not len(self._images):
            self._images = images.new_zeros((self.capacity, *images.shape[1:]))
            self._labels = torch.zeros(self.capacity, dtype=torch.long)
        for image, label in zip(images, labels.tolist()):
            self.seen += 1
            self.seen_per_class[label] = self.seen_per_class.get(label, 0) + 1
            slot: int | None = self.size
            if self.size < self.capacity:
                self.size += 1
            else:
                slot = self._slot(label)
            if slot is not None:
                self._images[slot] = image
                self._labels[slot] = label

    def sample(self, n: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """``n`` stored samples drawn uniformly without replacement (all of them when fewer are stored)."""
        idx = torch.randperm(len(self), generator=generator)[:n]
        return self.images[idx], self.labels[idx]

    # -- checkpoints ------------------------------------------------------------------------------------------
    def state(self) -> dict[str, torch.Tensor]:
        classes = sorted(self.seen_per_class)
        return {"images": self._images.contiguous(), "labels": self._labels,
                "size": torch.tensor([self.size]), "seen": torch.tensor([self.seen]),
                "generator": self.generator.get_state(),
                "class_ids": torch.tensor(classes, dtype=torch.long),
                "class_seen": torch.tensor([self.seen_per_class[c] for c in classes], dtype=torch.long)}

    def load_state(self, state: dict[str, torch.Tensor]) -> None:
        self._images, self._labels = state["images"].clone(), state["labels"].clone()
        self.size = int(state["size"])
        self.seen = int(state["seen"])
        self.generator.set_state(state["generator"])
        self.seen_per_class = dict(zip(state["class_ids"].tolist(), state["class_seen"].tolist()))
