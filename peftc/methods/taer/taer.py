"""Task-aware experience replay (TaER): an incremental classifier over a body shared by all tasks.

Source: Li, Jie & Deng, "Detachedly Learn a Classifier for Class-Incremental Learning" (arXiv 2302.11730); only
the abstract is public to us, which says: learn a classifier on a pretrained extractor under continual learning
with a replay buffer, *rebalance the replay loss* and *detach the classifier weights of old tasks from the
update*, so previous knowledge stays intact and the buffer is not over-fitted. Our reading, as implemented:

* The incremental classifier is the concatenation of every seen task's head (each task's head is already its
  own module in the task bank): logits over all classes seen so far, in task order.
* While task t trains, the heads of tasks < t enter the logits through ``weight.detach()`` / ``bias.detach()``:
  no gradient ever reaches an old task's class weights, from the current data or from the replayed data. The
  replayed samples therefore teach the *new* head (and a shared trainable body, if any) where the old classes
  lie — telling the current task from the previous ones — without re-learning, and over-fitting, the old
  heads on a few stored samples.
* One forward runs over the current batch and a replayed batch (class-balanced memory); with
  ``balance: task`` every sample is weighted so that each seen task contributes 1/t of the loss (the current
  task by its batch, each old task by its replayed samples), which is what the loss would be under joint
  training on balanced tasks; ``none`` averages over samples; a number λ gives ``L_cur + λ · L_replay``.

The buffer keeps ``memory`` images (uint8, at the training size) split equally over the classes seen so far;
it lives in ``<artifact>/train/replay.safetensors`` so a sequence can continue in a later command. TaER needs
the body to be shared by all tasks (frozen, like the paper's pretrained extractor, or trained): a spec that
keeps per-task body tensors (CLR's kernels, say) computes a different feature per task, and one incremental
classifier cannot sit on top of it — that combination is refused with a clear error.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from peftc.errors import PeftcError
from peftc.train.data import Split, load_rgb

__all__ = ["ConcatHead", "ReplayBuffer", "TaerError", "TaerObjective", "head_path", "taer_logits"]

REPLAY = "replay.safetensors"


class TaerError(PeftcError):
    """TaER cannot run with this spec or buffer."""


def head_path(model: Any) -> str:
    """The module path of the per-task head TaER concatenates; refuses specs with per-task body state."""
    bank = model.bank
    if bank.tensor_slots:
        example = next(iter(bank.tensor_slots))
        raise TaerError(f"head: taer needs a body shared by all tasks, but spec {model.spec.name!r} keeps per-task "
                        f"tensors (e.g. {example}); use a spec whose only per-task state is the head "
                        "(linear_probe, or full fine-tuning with a per-task head)")
    if len(bank.module_slots) != 1:
        raise TaerError(f"head: taer needs exactly one per-task head; spec {model.spec.name!r} has "
                        f"{len(bank.module_slots)} per-task modules")
    return next(iter(bank.module_slots))


class ConcatHead(nn.Module):
    """Logits of several task heads side by side; ``frozen`` heads enter through detached weights."""

    def __init__(self, heads: list[nn.Module], frozen: int):
        super().__init__()
        for head in heads:
            if not isinstance(head, nn.Linear):
                raise TaerError(f"head: taer concatenates Linear heads, found {type(head).__name__}")
        self.heads = nn.ModuleList(heads)
        self.frozen = frozen

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        outs = []
        for i, head in enumerate(self.heads):
            if i < self.frozen:
                bias = head.bias.detach() if head.bias is not None else None
                outs.append(F.linear(x, head.weight.detach(), bias))
            else:
                outs.append(head(x))
        return torch.cat(outs, dim=-1)


def _heads(model: Any, tasks: list[str], path: str) -> list[nn.Module]:
    """Each task's own head module (the bank's objects), collected through public task switching."""
    active = model.active_task
    heads = []
    for task in tasks:
        model.set_task(task)
        heads.append(model.net.get_submodule(path))
    model.set_task(active)
    return heads


@torch.no_grad()
def taer_logits(model: Any, images: torch.Tensor, tasks: list[str]) -> torch.Tensor:
    """Logits over every class of ``tasks`` (in order) from one forward: the class-incremental prediction."""
    path = head_path(model)
    active = model.active_task
    heads = _heads(model, tasks, path)
    model.net.set_submodule(path, ConcatHead(heads, frozen=len(heads)))
    was = model.training
    model.train(False)
    try:
        return model(images)
    finally:
        model.set_task(active)
        model.train(was)


class ReplayBuffer:
    """A class-balanced episodic memory of uint8 images, with the task and task-local label of each."""

    def __init__(self, memory: int):
        self.memory = memory
        self.tasks: list[str] = []
        self.classes: list[int] = []  # class count per task, in task order
        self.images = torch.empty(0, 3, 1, 1, dtype=torch.uint8)
        self.labels = torch.empty(0, dtype=torch.long)  # task-local
        self.task_index = torch.empty(0, dtype=torch.long)

    def __len__(self) -> int:
        return len(self.labels)

    def offset(self, task: str) -> int:
        i = self.tasks.index(task)
        return sum(self.classes[:i])

    def global_labels(self) -> torch.Tensor:
        offsets = torch.tensor([0, *torch.tensor(self.classes).cumsum(0).tolist()[:-1]], dtype=torch.long)
        return offsets[self.task_index] + self.labels if len(self) else self.labels

    def add_task(self, task: str, split: Split, classes: int, image_size: int, seed: int) -> None:
        """Store an equal share of ``memory`` for each class of ``task``; old classes shrink to the same share."""
        from torchvision import transforms as T

        if task in self.tasks:
            raise TaerError(f"the replay memory already holds task {task!r}")
        per_class = self.memory // (sum(self.classes) + classes)
        if per_class < 1:
            raise TaerError(f"replay memory {self.memory} is smaller than the {sum(self.classes) + classes} classes "
                            "seen so far; raise train.replay.memory")
        keep: list[int] = []
        for t in range(len(self.tasks)):
            for c in range(self.classes[t]):
                idx = ((self.task_index == t) & (self.labels == c)).nonzero().flatten().tolist()
                keep += idx[:per_class]
        images = [self.images[i] for i in keep]
        labels = [int(self.labels[i]) for i in keep]
        tasks = [int(self.task_index[i]) for i in keep]
        to_uint8 = T.Compose([T.Resize(image_size, antialias=True), T.CenterCrop(image_size), T.PILToTensor()])
        rng = random.Random(seed)
        new_index = len(self.tasks)
        for c in range(classes):
            paths = [p for p, label in split.samples if label == c]
            rng.shuffle(paths)
            taken = 0
            for path in paths:
                if taken == per_class:
                    break
                try:
                    image = load_rgb(path)
                except ValueError:  # corrupt: skipped, as in training
                    continue
                images.append(to_uint8(image))
                labels.append(c)
                tasks.append(new_index)
                taken += 1
        self.tasks.append(task)
        self.classes.append(classes)
        self.images = torch.stack(images) if images else self.images
        self.labels = torch.tensor(labels, dtype=torch.long)
        self.task_index = torch.tensor(tasks, dtype=torch.long)

    def sample(self, n: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``n`` stored samples drawn uniformly (with replacement when the memory is smaller)."""
        if not len(self):
            raise TaerError("the replay memory is empty")
        replace = n > len(self)
        if replace:
            idx = torch.randint(len(self), (n,), generator=generator)
        else:
            idx = torch.randperm(len(self), generator=generator)[:n]
        return self.images[idx], self.global_labels()[idx], self.task_index[idx]

    # -- persistence (safetensors + JSON metadata, no pickles) ------------------------------------------------
    def save(self, path: Path) -> None:
        from safetensors.torch import save

        from peftc.storage.atomic import write_file

        meta = {"memory": str(self.memory), "tasks": json.dumps(self.tasks), "classes": json.dumps(self.classes)}
        write_file(path, save({"images": self.images.contiguous(), "labels": self.labels, "tasks": self.task_index},
                              metadata=meta))

    @classmethod
    def load(cls, path: Path, memory: int) -> ReplayBuffer:
        from safetensors import safe_open

        buffer = cls(memory)
        if not path.is_file():
            return buffer
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
                buffer.images = f.get_tensor("images")
                buffer.labels = f.get_tensor("labels")
                buffer.task_index = f.get_tensor("tasks")
            buffer.tasks = json.loads(meta["tasks"])
            buffer.classes = json.loads(meta["classes"])
        except Exception as exc:
            raise TaerError(f"cannot read the replay memory {path}: {exc}") from None
        return buffer


class TaerObjective:
    """The TaER loss for the task being trained (see the module docstring)."""

    def __init__(self, run: Any, recipe: Any):
        self.run = run
        self.recipe = recipe
        self.path = head_path(run.model)
        self.buffer: ReplayBuffer = run.memory
        self.old = [t for t in self.buffer.tasks if t != run.task]
        self.offset = sum(self.buffer.classes[self.buffer.tasks.index(t)] for t in self.old)
        self.generator = torch.Generator().manual_seed(run.epoch_seed(-1, 0))
        mean = torch.tensor(run.mean).view(1, 3, 1, 1)
        std = torch.tensor(run.std).view(1, 3, 1, 1)
        self.mean, self.std = mean.to(run.device), std.to(run.device)
        self.head: ConcatHead | None = None

    def begin(self) -> None:
        model = self.run.model
        heads = _heads(model, [*self.old, self.run.task], self.path)
        self.head = ConcatHead(heads, frozen=len(self.old))
        model.net.set_submodule(self.path, self.head)

    def frozen_parameters(self) -> list[nn.Parameter]:
        """The old tasks' head parameters (read detached; never optimised)."""
        if self.head is None:
            return []
        return [p for head in list(self.head.heads)[: self.head.frozen] for p in head.parameters()]

    def end(self) -> None:
        self.run.model.set_task(self.run.task)  # the task's own head back in place
        self.head = None

    def validate(self) -> float:
        self.run.model.set_task(self.run.task)
        try:
            return self.run.validate()
        finally:
            if self.head is not None:
                self.run.model.net.set_submodule(self.path, self.head)

    def loss(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        target = labels + self.offset
        if not self.old or not len(self.buffer):
            return F.cross_entropy(self.run.forward(images), target, label_smoothing=self.recipe.label_smoothing)
        n = self.recipe.replay.batch_size or len(images)
        stored, stored_labels, stored_tasks = self.buffer.sample(n, self.generator)
        replayed = (stored.to(self.run.device).float() / 255.0 - self.mean) / self.std
        logits = self.run.forward(torch.cat([images, replayed]))
        targets = torch.cat([target, stored_labels.to(self.run.device)])
        per_sample = F.cross_entropy(logits, targets, reduction="none", label_smoothing=self.recipe.label_smoothing)
        b = len(images)
        balance = self.recipe.replay.balance
        if balance == "none":
            return per_sample.mean()
        if balance == "task":
            t = len(self.old) + 1
            weights = torch.empty_like(per_sample)
            weights[:b] = 1.0 / (t * b)
            tasks = stored_tasks.to(self.run.device)
            counts = torch.bincount(tasks, minlength=len(self.buffer.tasks)).to(per_sample.dtype)
            weights[b:] = 1.0 / (t * counts[tasks])
            # an old task absent from this replayed batch leaves its 1/t share out: renormalise
            return (weights * per_sample).sum() / weights.sum()
        return per_sample[:b].mean() + float(balance) * per_sample[b:].mean()
