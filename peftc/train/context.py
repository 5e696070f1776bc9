"""One task's training run: the model, the data, the recipe, and what every stage needs from them.

A :class:`TaskRun` is what stages (:mod:`peftc.train.stages`) and the epoch loop (:mod:`peftc.train.epochs`)
share: loaders built the same way on every process (seeded per stage and epoch, so an epoch replays exactly
after a resume), the forward (through DistributedDataParallel when there is one), accuracy on the validation
split, the corrupt-image tally, and snapshots of the task's state for early stopping.
"""

from __future__ import annotations

import contextlib
import os
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from peftc.language import TrainSection
from peftc.train.data import DataError, ImageDataset, TaskData, check_readable, collate
from peftc.train.distributed import DistContext
from peftc.train.logs import RunLog
from peftc.train.precision import Precision
from peftc.train.progress import Reporter
from peftc.train.sharding import Sharding
from peftc.train.transforms import backbone_stats, eval_transform, train_transform

__all__ = ["Hooks", "TaskRun", "batches", "default_workers", "head_classes", "predict"]


@dataclass
class Hooks:
    """Callbacks for tools and tests: ``on_step(run, stage, epoch, step, loss)``, ``on_epoch_end(run, stage,
    epoch, record)``. Raising from one (KeyboardInterrupt, say) interrupts the run like Ctrl-C would."""

    on_step: Callable[..., None] | None = None
    on_epoch_end: Callable[..., None] | None = None


def default_workers() -> int:
    """DataLoader workers when none are asked for: one per CPU, at most 8 (decoding keeps up; more rarely helps)."""
    return min(8, os.cpu_count() or 1)


class _EpochShuffle(torch.utils.data.Sampler[int]):
    """A permutation of ``range(n)`` seeded per epoch (``set_epoch``), so one loader — and its persistent workers —
    serves every epoch of a stage while each epoch's order stays a function of (seed, task, stage, epoch)."""

    def __init__(self, n: int, seed_of: Callable[[int], int]):
        self.n, self.seed_of, self.epoch = n, seed_of, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self.seed_of(self.epoch))
        # skip the one draw a DataLoader takes from its sampler's generator (the workers' base seed): the order
        # is then the one a per-epoch DataLoader(RandomSampler(generator)) gave, as in earlier peftc versions
        torch.empty((), dtype=torch.int64).random_(generator=generator)
        return iter(torch.randperm(self.n, generator=generator).tolist())

    def __len__(self) -> int:
        return self.n


class _Shard(torch.utils.data.Sampler[int]):
    """Indices ``rank, rank + world, …`` without padding: every sample is evaluated exactly once in all."""

    def __init__(self, n: int, rank: int, world: int):
        self.indices = list(range(rank, n, world))

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


@dataclass
class TaskRun:
    """Everything a stage of one task's training can reach."""

    model: Any  # peftc.runtime.model.Compiled
    task: str
    data: TaskData
    recipe: TrainSection
    dist: DistContext
    reporter: Reporter
    artifact: Path
    seed: int = 0
    image_size: int = 224
    workers: int = 0
    hooks: Hooks = field(default_factory=Hooks)
    memory: Any = None  # what the recipe's training head keeps across tasks (peftc.train.heads), e.g. a replay memory
    forward_module: nn.Module | None = None  # what a stage's loss runs through: DDP and/or torch.compile
    corrupt: set[Path] = field(default_factory=set)
    # Where this task's classes sit in the head's outputs: 0 for a per-task head; with one head shared by all
    # tasks (class-incremental), after the classes of the tasks trained before it.
    offset: int = 0
    seen_tasks: list[str] = field(default_factory=list)  # tasks trained so far, this one last (task selection)
    precision: Precision | None = None  # autocast and loss scaling (peftc.train.precision); None: fp32
    compile: bool = False  # torch.compile the forward the stage's loss runs through (peftc.train.epochs._wrap)
    memory_format: torch.memory_format = torch.contiguous_format  # channels_last for CNNs on CUDA
    log: RunLog | None = None  # per-step / per-epoch metric files (main process only)
    ddp: nn.Module | None = None  # the DDP wrapper while a stage trains in parallel (gradient sync control)
    sharding: Sharding | None = None  # FSDP: frozen weights sharded over the processes (no DDP wrapper then)
    _loaders: dict[tuple[int, int], torch.utils.data.DataLoader] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        if self.precision is None:
            self.precision = Precision("fp32", self.dist.device)
        mean, std = backbone_stats(self.model.backbone.id)
        self.mean, self.std = mean, std
        augment = self.recipe.augment
        self.train_set = ImageDataset(self.data.train, train_transform(self.image_size, augment, mean, std))
        self.val_set = ImageDataset(self.data.val, eval_transform(self.image_size, augment, mean, std))

    @property
    def device(self) -> torch.device:
        return self.dist.device

    @property
    def classes(self) -> int:
        return len(self.data.classes)

    @property
    def seen_classes(self) -> int:
        return self.offset + self.classes

    def task_logits(self, logits: torch.Tensor) -> torch.Tensor:
        """The logits of this task's classes (a slice of a shared head; everything of a per-task one)."""
        return logits[:, self.offset: self.offset + self.classes]

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return (self.model if self.forward_module is None else self.forward_module)(images)

    def epoch_seed(self, stage: int, epoch: int) -> int:
        return zlib.crc32(f"{self.seed}/{self.task}/{stage}/{epoch}".encode())

    def _loader_options(self) -> dict[str, Any]:
        cuda = self.device.type == "cuda"
        return {"collate_fn": collate, "num_workers": self.workers, "pin_memory": cuda,
                "persistent_workers": cuda and self.workers > 0}

    def train_loader(self, batch_size: int, stage: int, epoch: int) -> torch.utils.data.DataLoader:
        """The epoch's shuffled training batches (this process's share), seeded by stage and epoch.

        One loader per stage serves all its epochs (on CUDA its workers persist); ``set_epoch`` reshuffles, and
        the workers' seeds are re-drawn from the same (stage, epoch) seed each epoch they start.

        A last batch of a single image is dropped (a different one each epoch): BatchNorm cannot train on one
        sample. Other incomplete last batches are kept.
        """
        loader = self._loaders.get((stage, batch_size))
        if loader is None:
            dataset = self.train_set
            if self.dist.enabled:
                sampler: Any = torch.utils.data.DistributedSampler(
                    dataset, num_replicas=self.dist.world, rank=self.dist.rank, shuffle=True,
                    seed=self.epoch_seed(stage, 0))
            else:
                sampler = _EpochShuffle(len(dataset), lambda e: self.epoch_seed(stage, e))
            share = len(sampler)
            loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, sampler=sampler,
                                                 generator=torch.Generator(),
                                                 drop_last=share > batch_size and share % batch_size == 1,
                                                 **self._loader_options())
            self._loaders[(stage, batch_size)] = loader
        loader.sampler.set_epoch(epoch)  # type: ignore[attr-defined]
        assert loader.generator is not None
        loader.generator.manual_seed(self.epoch_seed(stage, epoch))
        return loader

    def val_loader(self, batch_size: int) -> torch.utils.data.DataLoader:
        sampler = _Shard(len(self.val_set), self.dist.rank, self.dist.world)
        options = {**self._loader_options(), "persistent_workers": False}  # a loader per call: nothing to keep
        return torch.utils.data.DataLoader(self.val_set, batch_size=batch_size, sampler=sampler, **options)

    def close(self) -> None:
        """Stop the loaders' worker processes and close the metric files."""
        self._loaders.clear()
        if self.log is not None:
            self.log.close()
            self.log = None

    def note_corrupt(self, paths: list[Path]) -> None:
        if paths:
            self.corrupt.update(paths)
            check_readable(self.data, self.corrupt)

    def validate(self, batch_size: int | None = None) -> float:
        """Accuracy of the active task's head on the validation split (exact across processes)."""
        correct, total = 0, 0
        loader = self.val_loader(batch_size or self.recipe.batch_size)
        with self.sharding.gathered() if self.sharding is not None else contextlib.nullcontext():
            for images, labels, bad in batches(loader, self.device, self.memory_format):
                self.note_corrupt(bad)
                with self.precision.autocast():  # type: ignore[union-attr]
                    logits = self.task_logits(predict(self.model, images))
                correct += int((logits.argmax(1) == labels).sum())
                total += len(labels)
        correct, total = self.dist.sum([correct, total])
        if not total:
            raise DataError(f"task {self.task!r}: no validation image could be read ({self.data.val.root}); an "
                            "accuracy over none would steer early stopping blind")
        return correct / total

    # -- early-stopping snapshots -----------------------------------------------------------------------------
    def snapshot(self) -> dict[str, torch.Tensor]:
        """A copy of what training this task can change: its own tensors and the shared trained ones."""
        out = {f"task/{k}": v.detach().clone() for k, v in self.model.bank.task_tensors(self.task).items()}
        out.update({f"shared/{k}": v.detach().clone() for k, v in self.model.shared_state().items()})
        return out

    def restore(self, snapshot: dict[str, torch.Tensor]) -> None:
        own = {k[5:]: v for k, v in snapshot.items() if k.startswith("task/")}
        self.model.bank.load_task_tensors(self.task, own)
        shared = self.model.shared_state()
        with torch.no_grad():
            for key, value in snapshot.items():
                if key.startswith("shared/"):
                    shared[key[7:]].copy_(value)


Batch = tuple[torch.Tensor, torch.Tensor, list[Path]]


def batches(loader: torch.utils.data.DataLoader, device: torch.device,
            memory_format: torch.memory_format = torch.contiguous_format) -> Iterator[Batch]:
    """(images, labels, corrupt paths) on ``device``; batches with no good sample are skipped."""
    for images, labels, bad in loader:
        if labels.numel() == 0:
            if bad:
                yield images, labels, bad  # let the caller count them
            continue
        images = images.to(device, non_blocking=True)
        if memory_format is not torch.contiguous_format:
            images = images.contiguous(memory_format=memory_format)
        yield images, labels.to(device, non_blocking=True), bad


def head_classes(model: Any) -> int | None:
    """Outputs of the model's classification head (the active task's), or None when it has none."""
    from peftc.analysis.index import NodeIndex, block_positions
    from peftc.analysis.roles import head

    net = model.net
    for cand in head(NodeIndex(net, block_positions(net))):
        out = getattr(net.get_submodule(str(cand.node.target)), "out_features", None)
        if isinstance(out, int):
            return out
    return None


@torch.no_grad()
def predict(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """Logits in eval mode (the model's mode is restored afterwards)."""
    was = model.training
    model.train(False)
    try:
        if images.numel() == 0:
            return torch.empty(0, 1)
        return model(images)
    finally:
        model.train(was)
