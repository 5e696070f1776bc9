"""Task-free streams for online class-incremental learning: a stream file → one ordered pass of samples.

A stream file is a ``tasks.yaml`` (so ``--online --sequence tasks.yaml`` reads the same thing) or one data
folder cut into tasks by a seeded class order, plus the protocol a comparison keeps fixed::

    name: digits             # the task (head) the stream trains in the artifact (default: stream)
    tasks:                   # either: the tasks, in order, as in tasks.yaml ...
      - {name: task1, data: task1, classes: [zero, one]}
    data: imagefolder/       # ... or: one ImageFolder (or train/ + val/) ...
    split: 5                 #     cut into 5 tasks of consecutive classes ...
    class_order: seeded      #     in a seeded order (or sorted, or a list of class names)
    batch_size: 10           # optional: override the recipe's train.online values
    memory: 200
    sampling: reservoir
    seed: 0                  # the class order and the order within each task (default: --seed)

Every class belongs to exactly one task; class c of task k is output ``offset_k + c`` of one head over all the
stream's classes. The stream is the tasks' training samples in task order, each task's shuffled by the seed;
it is cut into batches without regard to task ends, so a batch may hold the end of one task and the start of
the next. Only :attr:`Stream.boundaries` (for the evaluator) knows where tasks end.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import Field, model_validator

from peftc.errors import PeftcError
from peftc.train.data import Corrupt, ImageDataset, SequenceTask, TaskData, TaskSequence, discover, read_sequence

__all__ = ["Stream", "StreamError", "StreamFile", "StreamSamples", "build_stream", "read_stream"]


class StreamError(PeftcError):
    """The stream file or the stream it describes cannot be used."""


class StreamFile(TaskSequence):
    """A stream file (see the module docstring): a tasks.yaml, or one folder and a split. A tasks.yaml's
    ``epochs`` are ignored: a stream is learned in one pass."""

    name: str = "stream"
    tasks: list[SequenceTask] = Field(default_factory=list)
    data: Path | None = None
    split: int | None = Field(default=None, ge=1)
    class_order: Literal["sorted", "seeded"] | list[str] = "seeded"
    batch_size: int | None = Field(default=None, ge=1)
    memory: int | None = Field(default=None, ge=1)
    sampling: Literal["reservoir", "balanced"] | None = None
    seed: int | None = None

    @model_validator(mode="after")
    def _one_source(self) -> StreamFile:
        if bool(self.tasks) == (self.data is not None):
            raise ValueError("give either tasks: (a list of {name, data}) or data: with split:")
        if self.data is not None and self.split is None:
            raise ValueError("data: needs split: (the number of tasks to cut its classes into)")
        if self.tasks and (self.split is not None or self.class_order != "seeded"):
            raise ValueError("split: and class_order: go with data:, not with tasks:")
        return self


def read_stream(path: str | Path) -> StreamFile:
    """Parse and check a stream file; folders become absolute (relative to the file and ``root``)."""
    path = Path(path)
    stream = read_sequence(path, StreamFile)
    assert isinstance(stream, StreamFile)
    if stream.data is not None and not stream.data.is_absolute():
        stream.data = (path.parent / stream.root).resolve() / stream.data
    return stream


@dataclass(frozen=True)
class Stream:
    """The tasks' data, where each task's classes sit in the head, and the order of the one pass."""

    name: str
    tasks: tuple[str, ...]
    data: tuple[TaskData, ...]
    order: tuple[tuple[int, int], ...]  # (task index, index into that task's training split), in stream order

    @property
    def offsets(self) -> list[int]:
        sizes = [len(d.classes) for d in self.data]
        return [sum(sizes[:k]) for k in range(len(sizes))]

    @property
    def classes(self) -> list[str]:
        return [c for d in self.data for c in d.classes]

    @property
    def boundaries(self) -> list[int]:
        """Stream positions where each task ends (exclusive): the evaluator's business, never the learner's."""
        sizes = [len(d.train) for d in self.data]
        return [sum(sizes[: k + 1]) for k in range(len(sizes))]

    def __len__(self) -> int:
        return len(self.order)

    def steps(self, batch_size: int) -> int:
        return -(-len(self) // batch_size)


def _split_folder(spec: StreamFile, seed: int, val_fraction: float) -> list[tuple[str, TaskData]]:
    assert spec.data is not None and spec.split is not None
    whole = discover(spec.data, spec.class_order if isinstance(spec.class_order, list) else None,
                     val_fraction=val_fraction, seed=seed)
    names = list(whole.classes)
    if spec.class_order == "seeded":
        random.Random(seed).shuffle(names)
    if spec.split > len(names):
        raise StreamError(f"split: {spec.split} tasks, but {spec.data} has only {len(names)} classes")
    cuts = [round(k * len(names) / spec.split) for k in range(spec.split + 1)]
    return [(f"task{k + 1}", discover(spec.data, names[cuts[k]: cuts[k + 1]], val_fraction=val_fraction,
                                      seed=seed)) for k in range(spec.split)]


def build_stream(spec: StreamFile, seed: int = 0, val_fraction: float = 0.2) -> Stream:
    """Find every task's data (bad folders fail here, before training) and fix the order of the pass."""
    seed = spec.seed if spec.seed is not None else seed
    if spec.tasks:
        tasks = [(t.name, discover(t.data, t.classes, val_fraction=val_fraction, seed=seed)) for t in spec.tasks]
    else:
        tasks = _split_folder(spec, seed, val_fraction)
    owner: dict[str, str] = {}
    for name, data in tasks:
        for c in data.classes:
            if c in owner:
                raise StreamError(f"class {c!r} is in tasks {owner[c]!r} and {name!r}; in a class-incremental "
                                  "stream each class belongs to one task")
            owner[c] = name
    order: list[tuple[int, int]] = []
    for k, (name, data) in enumerate(tasks):
        within = list(range(len(data.train)))
        random.Random(f"{seed}/{name}").shuffle(within)
        order += [(k, i) for i in within]
    return Stream(spec.name, tuple(n for n, _ in tasks), tuple(d for _, d in tasks), tuple(order))


class StreamSamples(torch.utils.data.Dataset):
    """Stream position → (image tensor, label over all the stream's classes); corrupt files → Corrupt."""

    def __init__(self, stream: Stream, transform: Callable[[Any], torch.Tensor]):
        self.stream = stream
        self.sets = [ImageDataset(d.train, transform) for d in stream.data]
        self.offsets = stream.offsets

    def __len__(self) -> int:
        return len(self.stream)

    def __getitem__(self, position: int) -> tuple[torch.Tensor, int] | Corrupt:
        k, i = self.stream.order[position]
        item = self.sets[k][i]
        return item if isinstance(item, Corrupt) else (item[0], item[1] + self.offsets[k])
