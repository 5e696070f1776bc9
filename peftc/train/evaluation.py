"""``peftc eval``: accuracy per task, with the task given (oracle) or predicted by the method's task selection.

With the task given, each task's validation images go through that task's state and head, and accuracy is
the share whose predicted class is right. With ``select``, nobody tells the model the task: the method's own
selector predicts it per image — a block's task predictor (:mod:`peftc.blocks.contract`: task keys, say), or
the training head's selection (an incremental classifier over all seen classes) — and an image counts as correct
only when both the task and the class are right. Task-selection accuracy (right task, whatever the class) is
reported beside it.

Data: a task's folder (``--task``), a folder holding one sub-folder per task, a ``tasks.yaml`` sequence, or
nothing — then each task is read from the folder it was trained on (``train/tasks.json``). Images are read
with the class order stored at training time, so label ``i`` means the same class as it did in training.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from peftc.blocks.contract import TaskPredictor, offers
from peftc.errors import PeftcError, TaskError
from peftc.train.context import batches
from peftc.train.data import ImageDataset, TaskData, collate, discover
from peftc.train.distributed import DistContext, setup
from peftc.train.heads import TaskGuess, get_head
from peftc.train.journal import Journal
from peftc.train.transforms import backbone_stats, eval_transform

__all__ = ["EvalError", "TaskGuess", "evaluate", "evaluate_model", "task_accuracy", "task_guess_for"]


class EvalError(PeftcError):
    """Evaluation cannot run as asked (no such task, no data for it, no task selection in this method)."""




@dataclass(frozen=True)
class _Eval:
    size: int
    augment: str
    batch_size: int
    workers: int
    dist: DistContext


def _loader(data: TaskData, cfg: _Eval, model: Any, split: str) -> torch.utils.data.DataLoader:
    mean, std = backbone_stats(model.backbone.id)
    chosen = data.val if split == "val" else data.train
    dataset = ImageDataset(chosen, eval_transform(cfg.size, cfg.augment, mean, std))
    indices = list(range(cfg.dist.rank, len(dataset), cfg.dist.world))
    return torch.utils.data.DataLoader(torch.utils.data.Subset(dataset, indices), batch_size=cfg.batch_size,
                                       collate_fn=collate, num_workers=cfg.workers)


@torch.no_grad()
def task_accuracy(model: Any, task: str, loader: torch.utils.data.DataLoader, dist: DistContext,
                  offset: int = 0, classes: int | None = None) -> tuple[float, int, int]:
    """(accuracy, images, corrupt skipped) of ``task``'s own state and head on ``loader``; with a head shared
    by all tasks, the task's classes are outputs ``offset .. offset + classes``."""
    was_task, was_training = model.active_task, model.training
    model.set_task(task)
    model.train(False)
    correct = total = skipped = 0
    try:
        for images, labels, bad in batches(loader, dist.device):
            skipped += len(bad)
            if labels.numel() == 0:
                continue
            logits = model(images)
            if classes is not None:
                logits = logits[:, offset: offset + classes]
            correct += int((logits.argmax(1) == labels).sum())
            total += len(labels)
    finally:
        model.set_task(was_task)
        model.train(was_training)
    correct, total, skipped = dist.sum([correct, total, skipped])
    return (correct / total if total else 0.0), int(total), int(skipped)


def _routed_guess(model: Any, tasks: list[str], spans: list[tuple[int, int]]) -> TaskGuess | None:
    """Task selection by a block of the model (the contract's ``task_predictor``), or None when none offers it."""
    predictor = task_predictor(model)
    if predictor is None:
        return None

    def pick(images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        index, logits = predictor.route(images, tasks)
        index = index.cpu()
        local = torch.stack([logits[i, spans[t][0]: spans[t][0] + spans[t][1]].argmax().cpu()
                             for i, t in enumerate(index.tolist())])
        return index, local

    return pick


def task_predictor(model: Any) -> TaskPredictor | None:
    """The first task predictor a block class of ``model`` offers (see :mod:`peftc.blocks.contract`)."""
    kinds = dict.fromkeys(type(m) for m in model.net.modules() if offers(m, "task_predictor"))
    for kind in kinds:
        predictor = kind.task_predictor(model)
        if predictor is not None:
            return predictor
    return None


def task_guess_for(model: Any, tasks: list[str], journal: Journal | None) -> TaskGuess:
    """The method's task selection over ``tasks``: a block's task predictor, or the training head's."""
    entries = [(journal.task(t) if journal else None) or {} for t in tasks]
    spans = [(e.get("offset", 0), len(e.get("classes") or []) or int(model.bank.classes(t) or 0))
             for e, t in zip(entries, tasks)]
    routed = _routed_guess(model, tasks, spans)
    if routed is not None:
        return routed
    heads = {(journal.task(t) or {}).get("head") for t in tasks} if journal else set()
    if len(heads) == 1 and None not in heads:
        chosen = get_head(heads.pop()).guess_tasks(model, tasks)
        if chosen is not None:
            return chosen
    raise EvalError(f"spec {model.spec.name!r} has no task selection (no block predicts tasks and the tasks' "
                    "training head selects none); evaluate with the task given (--task NAME, or per task "
                    "without --select)")


@torch.no_grad()
def selection_accuracy(model: Any, select: TaskGuess, candidates: list[str], loaders: Mapping[str, Any],
                       dist: DistContext) -> dict[str, dict[str, float]]:
    """Per true task (the keys of ``loaders``): accuracy (task and class right) and task-selection accuracy
    (task right), the selector choosing among ``candidates``."""
    out = {}
    was_training = model.training
    model.train(False)
    try:
        for task in loaders:
            j = candidates.index(task)
            right = task_right = total = 0
            for images, labels, _ in batches(loaders[task], dist.device):
                if labels.numel() == 0:
                    continue
                pred_task, pred_class = select(images)
                hit_task = pred_task.cpu() == j
                task_right += int(hit_task.sum())
                right += int((hit_task & (pred_class.cpu() == labels.cpu())).sum())
                total += len(labels)
            right, task_right, total = dist.sum([right, task_right, total])
            out[task] = {"accuracy": right / total if total else 0.0,
                         "task_selection_accuracy": task_right / total if total else 0.0}
    finally:
        model.train(was_training)
    return out


def evaluate_model(model: Any, data: Mapping[str, TaskData], *, journal: Journal | None = None,
                   select: bool = False, image_size: int | None = None, augment: str = "standard",
                   batch_size: int = 64, workers: int = 0, dist: DistContext | None = None,
                   split: str = "val", candidates: list[str] | None = None) -> dict[str, Any]:
    """Accuracy of every task in ``data`` (task → its data) on an in-memory model; with ``select``, the
    selector chooses among ``candidates`` (default: the tasks in ``data``)."""
    dist = dist or DistContext()
    size = image_size or int(model.backbone.input_size[-1])
    cfg = _Eval(size, augment, batch_size, workers, dist)
    tasks = list(data)
    for task in tasks:
        if task not in model.bank:
            raise EvalError(f"the artifact has no task {task!r}; its tasks: {', '.join(model.tasks)}")
    loaders = {t: _loader(data[t], cfg, model, split) for t in tasks}
    result: dict[str, Any] = {"tasks": {}, "split": split, "select": select}
    for task in tasks:
        offset = ((journal.task(task) if journal else None) or {}).get("offset", 0)
        acc, n, skipped = task_accuracy(model, task, loaders[task], dist, offset, len(data[task].classes))
        result["tasks"][task] = {"accuracy": acc, "images": n, "classes": list(data[task].classes),
                                 "chance": 1.0 / len(data[task].classes), "corrupt_skipped": skipped}
    if select:
        candidates = list(candidates or tasks)
        missing = [t for t in tasks if t not in candidates]
        if missing:
            raise EvalError(f"task {missing[0]!r} is not among the tasks the selector chooses from")
        chosen = task_guess_for(model, candidates, journal)
        for task, numbers in selection_accuracy(model, chosen, candidates, loaders, dist).items():
            result["tasks"][task]["oracle_accuracy"] = result["tasks"][task]["accuracy"]
            result["tasks"][task].update(numbers)
        total = sum(v["images"] for v in result["tasks"].values())
        result["task_selection_accuracy"] = sum(
            v["task_selection_accuracy"] * v["images"] for v in result["tasks"].values()) / max(1, total)
    result["average_accuracy"] = sum(v["accuracy"] for v in result["tasks"].values()) / max(1, len(tasks))
    return result


def _task_data(artifact: Path, journal: Journal, tasks: list[str], data: str | Path | None, single: bool
               ) -> dict[str, TaskData]:
    """Each task's data: the given task folder, a folder of task folders, a tasks.yaml, or where it trained."""
    from peftc.train.data import read_sequence

    out = {}
    by_yaml: dict[str, Path] = {}
    if data is not None and Path(data).is_file():
        by_yaml = {item.name: item.data for item in read_sequence(data).tasks}
    for task in tasks:
        entry = journal.task(task) or {}
        classes = entry.get("classes")
        if data is None:
            if not entry.get("data"):
                raise EvalError(f"no data folder is known for task {task!r}; pass --data")
            folder = Path(entry["data"])
        elif by_yaml:
            if task not in by_yaml:
                raise EvalError(f"{data} lists no task {task!r}")
            folder = by_yaml[task]
        elif single:
            folder = Path(data)
        else:
            folder = Path(data) / task
            if not folder.is_dir():
                raise EvalError(f"no folder for task {task!r} in {data} (expected {folder}); pass --task NAME to "
                                "evaluate one task on this folder")
        seed = entry.get("seed", 0)
        out[task] = discover(folder, classes, seed=seed)
    return out


def evaluate(artifact: str | Path, data: str | Path | None = None, *, task: str | None = None,
             select: bool = False, device: str = "cpu", batch_size: int = 64, image_size: int | None = None,
             workers: int = 0, split: str = "val") -> dict[str, Any]:
    """Load the artifact at ``artifact`` and report accuracy per task (see the module docstring)."""
    from peftc.compiler import load

    artifact = Path(artifact)
    model = load(artifact)
    journal = Journal(artifact)
    trained = journal.trained_tasks()
    if task is not None:
        if task not in model.bank:
            raise TaskError(f"the artifact has no task {task!r}; its tasks: {', '.join(model.tasks)}")
        tasks = [task]
    else:
        tasks = trained or [t for t in model.tasks if t != "default"]
        if not tasks:
            raise EvalError(f"{artifact} has no trained task to evaluate")
    dist = setup(device)
    model.to(dist.device)
    sizes = {(journal.task(t) or {}).get("image_size") for t in tasks} - {None}
    augments = {((journal.task(t) or {}).get("recipe") or {}).get("augment") for t in tasks} - {None}
    size = image_size or (sizes.pop() if len(sizes) == 1 else None)
    augment = augments.pop() if len(augments) == 1 else "standard"
    task_data = _task_data(artifact, journal, tasks, data, single=task is not None)
    candidates = list(dict.fromkeys([*trained, *tasks]))  # selection chooses among every trained task
    result = evaluate_model(model, task_data, journal=journal, select=select, image_size=size, augment=augment,
                            batch_size=batch_size, workers=workers, dist=dist, split=split, candidates=candidates)
    result["artifact"] = str(artifact)
    return result
