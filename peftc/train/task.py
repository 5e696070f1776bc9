"""``peftc train DIR --task NAME --data PATH``: train one task of an artifact, stage by stage, resumably.

The artifact directory is both input and output: it is loaded, the task is added (with a head for its
classes), trained as the spec's ``train:`` recipe says, and saved back with the task's delta — only when the
task has finished. Meanwhile ``DIR/train/<task>/checkpoint`` holds a complete checkpoint after every epoch
(:mod:`peftc.train.checkpoint`); ``--resume`` continues from it with the recipe, classes and seed the run
started with. ``DIR/train/tasks.json`` remembers each task's classes and history (:mod:`peftc.train.journal`).
"""

from __future__ import annotations

import random
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from peftc.errors import PeftcError
from peftc.language import StageDecl, TrainSection
from peftc.train.checkpoint import Checkpoint
from peftc.train.context import Hooks, TaskRun, default_workers
from peftc.train.data import discover
from peftc.train.distributed import DistContext, setup
from peftc.train.epochs import StageOutcome, run_stage
from peftc.train.heads import get_head
from peftc.train.journal import TRAIN_DIR, Journal
from peftc.train.logs import RunLog
from peftc.train.precision import FrozenCast, Precision, cast_frozen, restore_frozen
from peftc.train.progress import Reporter
from peftc.train.recipe import resolve, stage_recipe
from peftc.train.sharding import SHARDINGS, Sharding, ShardingError, shard_model
from peftc.train.stages import make_stage

__all__ = ["TaskResult", "TrainError", "TrainOptions", "train_task"]


class TrainError(PeftcError):
    """A training run cannot start or continue as asked."""


@dataclass
class TaskResult:
    """What :func:`train_task` returns: a JSON-able summary and the trained model (still on its device)."""

    summary: dict[str, Any]
    model: Any


@dataclass
class TrainOptions:
    """How to run: everything ``peftc train`` takes besides the artifact, the task and the data."""

    classes: Sequence[str] | None = None
    overrides: Mapping[str, Any] = field(default_factory=dict)  # recipe keys (--recipe, --lr, --batch-size, ...)
    epochs: int | None = None  # overrides the recipe's epochs and caps every stage's
    device: str = "auto"  # auto: CUDA when it really works, else CPU
    resume: bool = False
    seed: int = 0
    image_size: int | None = None
    workers: int | None = 0  # DataLoader workers; None: min(8, CPUs) (the CLI's default)
    val_fraction: float = 0.2
    quiet: bool = False
    hooks: Hooks = field(default_factory=Hooks)
    frozen_dtype: str | None = None  # bf16 | fp16: frozen conv/linear weights stored in 16 bits (peftc.train.precision)
    compile: bool = False  # torch.compile the training forward (and its backward)
    channels_last: bool | None = None  # None: on for CNNs on CUDA
    log: tuple[str, ...] = ()  # extra loggers beside JSONL + CSV: "tensorboard"
    sharding: str = "ddp"  # under torchrun: ddp (replicas) | fsdp (frozen weights sharded; peftc.train.sharding)

    def __post_init__(self) -> None:
        if self.workers is None:
            self.workers = default_workers()


def _checkpoint(artifact: Path, task: str) -> Checkpoint:
    return Checkpoint(artifact / TRAIN_DIR / task / "checkpoint")


def _load_start(artifact: Path, task: str, options: TrainOptions, reporter: Reporter, model: Any,
                state: dict[str, Any] | None) -> tuple[Any, TrainSection]:
    """(model, recipe) for a fresh start or a resume from ``state``; ``model``: the artifact, already loaded."""
    from peftc.compiler import load

    ckpt = _checkpoint(artifact, task)
    if state is not None:
        model = ckpt.load_model()
        recipe = TrainSection.model_validate(state["recipe"])
        if options.overrides or options.epochs is not None:
            reporter.note("resuming with the recipe the interrupted run started with (recipe flags ignored)")
        return model, recipe
    if ckpt.exists:
        reporter.note(f"discarding the unfinished run of task {task!r} (pass --resume to continue it)")
        ckpt.remove()
    if model is None:
        model = load(artifact)
    overrides = dict(options.overrides)
    if options.epochs is not None:
        overrides["epochs"] = options.epochs
    return model, resolve(model.spec.train, overrides)


def _label_offset(model: Any, task: str, classes: int, journal: Journal, before: list[str]) -> int:
    """Where the task's classes start in the head's outputs (see TaskRun.offset)."""
    from peftc.train.context import head_classes

    if model.bank.module_slots:
        return 0  # every task has its own head
    size = head_classes(model)
    if size is None or size == classes:
        return 0  # no head, or one label space shared by all tasks
    offset = max([(journal.task(t) or {}).get("offset", 0) + len((journal.task(t) or {}).get("classes", []))
                  for t in before] or [0])
    if offset + classes > size:
        raise TrainError(f"the head of spec {model.spec.name!r} is shared by all tasks and has {size} classes; the "
                         f"tasks trained so far use {offset}, so task {task!r} does not fit its {classes} more "
                         "(compile with num_classes set to the total number of classes)")
    return offset


def _add_task(model: Any, task: str, classes: int) -> None:
    if task in model.bank:
        if model.bank.classes(task) not in (None, classes):
            raise TrainError(f"task {task!r} has a {model.bank.classes(task)}-class head but the data has {classes} "
                             "classes")
        return
    if model.bank.module_slots:
        model.add_task(task, num_classes=classes)
        return
    model.add_task(task)
    have = model.bank.classes(task)
    if have is not None and have != classes:
        raise TrainError(f"spec {model.spec.name!r} has no per-task head: its head has {have} classes but the data "
                         f"has {classes}; add a head rule with task_state: new, or set the spec's num_classes")


def train_task(artifact: str | Path, task: str, data: str | Path, options: TrainOptions | None = None,
               *, model: Any = None, dist: DistContext | None = None, reporter: Reporter | None = None,
               untrained: dict[str, torch.Tensor] | None = None) -> TaskResult:
    """Train ``task`` of the artifact at ``artifact`` on the data at ``data``; returns a summary (JSON-able).

    ``model`` may be the artifact already in memory (a sequence passes it on from task to task); it is
    trained in place. Returns the JSON-able summary and the trained model. Before training, the new task's
    validation accuracy is measured (``start_accuracy``: a[j-1][j] of forward transfer) and, given the
    ``untrained`` shared state of a sequence's start, also with that state (``untrained_accuracy``: b_j).
    """
    options = options or TrainOptions()
    if options.sharding not in SHARDINGS:
        raise ShardingError(f"--sharding must be one of {', '.join(SHARDINGS)}, got {options.sharding!r}")
    artifact = Path(artifact)
    dist = dist or setup(options.device)
    reporter = reporter or Reporter(quiet=options.quiet or not dist.main, warnings=dist.main)
    journal = Journal(artifact)
    if journal.finished(task):
        if options.resume:
            entry = journal.task(task) or {}
            summary = {"task": task, "status": "already finished", "val_accuracy": entry.get("val_accuracy"),
                       "classes": entry.get("classes"), "artifact": str(artifact)}
            return TaskResult(summary, model)
        raise TrainError(f"task {task!r} is already trained in {artifact}; train a new task name (a finished "
                         "task's delta is never overwritten)")
    started = time.perf_counter()
    ckpt = _checkpoint(artifact, task)
    state = ckpt.read_state() if options.resume and ckpt.exists else None
    if options.resume and state is None:
        reporter.note(f"no checkpoint of task {task!r} to resume: starting it from the beginning")
    classes = state["classes"] if state else options.classes
    if state and options.classes and list(options.classes) != list(state["classes"]):
        raise TrainError(f"the interrupted run of {task!r} used classes {state['classes']}, not "
                         f"{list(options.classes)}")
    seed = state["seed"] if state else options.seed
    task_data = discover(data, classes, val_fraction=options.val_fraction, seed=seed)  # bad data fails fast
    for note in task_data.notes:
        reporter.note(note)
    model, recipe = _load_start(artifact, task, options, reporter, model, state)
    if state is None and task in model.bank:
        raise TrainError(f"{artifact} already has a task named {task!r} that `peftc train` did not train; choose "
                         "another name")
    if state is None:  # the seed decides the new head's init, the shuffles and the augmentation
        torch.manual_seed(seed)
        random.seed(seed)
    _add_task(model, task, len(task_data.classes))
    model.set_task(task)
    model.to(dist.device)
    precision, memory_format, frozen, sharding = _hardware(model, recipe, options, dist, reporter)
    seen = [*(t for t in journal.trained_tasks() if t != task), task]
    offset = (state or {}).get("offset")
    if offset is None:
        offset = _label_offset(model, task, len(task_data.classes), journal, seen[:-1])
    image_size = (state or {}).get("image_size") or options.image_size or int(model.backbone.input_size[-1])
    head = get_head(recipe.head, model.spec.locate(("train", "head")))
    memory = head.open_memory(artifact / TRAIN_DIR, recipe)
    log = RunLog(artifact / TRAIN_DIR / task / "log", fresh=state is None, loggers=options.log) if dist.main else None
    run = TaskRun(model, task, task_data, recipe, dist, reporter, artifact, seed=seed, image_size=image_size,
                  workers=int(options.workers or 0), hooks=options.hooks, memory=memory,
                  offset=offset, seen_tasks=seen, precision=precision, compile=options.compile,
                  memory_format=memory_format, log=log, sharding=sharding)
    try:
        start = _start_accuracy(run, untrained) if state is None else (state.get("start_accuracy") or {})
        return _train(run, artifact, task, data, task_data, options, journal, state, ckpt, started, head, frozen,
                      start)
    finally:
        run.close()


def _hardware(model: Any, recipe: TrainSection, options: TrainOptions, dist: DistContext, reporter: Reporter
              ) -> tuple[Precision, torch.memory_format, FrozenCast | None, Sharding | None]:
    """How the model computes on this hardware: precision, memory format, 16-bit frozen weights, FSDP."""
    precision = Precision(recipe.precision, dist.device)
    memory_format = _memory_format(model, dist.device, options.channels_last)
    if memory_format is torch.channels_last:
        model.to(memory_format=memory_format)
    frozen = cast_frozen(model, options.frozen_dtype, precision)
    if frozen is not None:
        reporter.note(f"frozen conv/linear weights in {options.frozen_dtype}: {frozen.bytes_before / 2**20:,.1f} MiB → "
                      f"{frozen.bytes_after / 2**20:,.1f} MiB ({len(frozen.names)} tensors)")
    sharding = None
    if options.sharding == "fsdp":
        sharding = shard_model(model, dist, options.frozen_dtype)
        reporter.note(f"FSDP: {sharding.tensors} frozen tensors sharded over {dist.world} processes")
    return precision, memory_format, frozen, sharding


def _start_accuracy(run: TaskRun, untrained: dict[str, torch.Tensor] | None) -> dict[str, float]:
    """The new task's accuracy before any training, with the model as it is and with the untrained shared state
    (forward transfer's a[j-1][j] and b_j); the random generators are left as they were."""
    devices = [run.device.index or 0] if run.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        out = {"start_accuracy": run.validate()}
        if untrained is not None:
            shared = run.model.shared_state()
            now = {k: shared[k].clone() for k in untrained}
            with torch.no_grad():
                for key, value in untrained.items():
                    shared[key].copy_(value)
                out["untrained_accuracy"] = run.validate()
                for key, value in now.items():
                    shared[key].copy_(value)
    return out


def _memory_format(model: Any, device: torch.device, asked: bool | None) -> torch.memory_format:
    """channels_last for a CNN when asked, or by default on CUDA (where cuDNN's NHWC kernels are faster)."""
    has_conv = any(isinstance(m, torch.nn.Conv2d) for m in model.modules())
    wanted = device.type == "cuda" if asked is None else asked
    return torch.channels_last if wanted and has_conv else torch.contiguous_format


def _train(run: TaskRun, artifact: Path, task: str, data: str | Path, task_data: Any, options: TrainOptions,
           journal: Journal, state: dict[str, Any] | None, ckpt: Checkpoint, started: float, head: Any,
           frozen: FrozenCast | None, start: dict[str, float]) -> TaskResult:
    """The stages of one task, then the journal and the artifact (see :func:`train_task`)."""
    model, recipe, dist, reporter, memory = run.model, run.recipe, run.dist, run.reporter, run.memory
    seed, image_size, offset = run.seed, run.image_size, run.offset
    info = {"classes": list(task_data.classes), "data": str(Path(data).resolve()),
            "recipe": recipe.model_dump(mode="json"),
            "seed": seed, "image_size": image_size, "head": recipe.head, "offset": offset, "start_accuracy": start}
    decls = recipe.stages or [StageDecl(stage="fit")]
    outcomes: list[dict[str, Any]] = list((state or {}).get("outcomes", []))
    recipes = [stage_recipe(recipe, decl, options.epochs) for decl in decls]
    stages = [make_stage(decl, run, r, where=model.spec.locate(("train", "stages", i, "stage")))
              for i, (decl, r) in enumerate(zip(decls, recipes))]  # unknown stage names fail before training
    if dist.main and state is None:
        journal.update(task, status="running", **info)
    if state is not None:
        ckpt.restore_rng(state)
        reporter.note(f"resuming task {task!r} after stage {state['stage'] + 1}, epoch {state['epoch'] + 1}")
    for i, (stage, srecipe) in enumerate(zip(stages, recipes)):
        if state is not None and (i < state["stage"] or (i == state["stage"] and state.get("stage_done"))):
            continue
        resume = None
        resume_tensors = None
        if state is not None and i == state["stage"]:
            resume = {**state, "optimizer_state": ckpt.optimizer_state(state)}
            resume_tensors = (ckpt.best(), ckpt.extra())
        base = {**info, "task": task, "stage": i, "stage_label": stage.label, "outcomes": outcomes}

        def save(epoch_state: dict[str, Any], optimizer: Any, best: Any, extra: Any, base: dict = base) -> None:
            ckpt.write(model, {**base, **epoch_state}, optimizer, best, extra)

        outcome = run_stage(run, stage, srecipe, i, resume, save, resume_tensors)
        outcomes.append(_outcome(outcome))
        state = None
        if dist.main:  # the stage is over: a resume starts with the next one
            ckpt.write(model, {**base, "outcomes": outcomes, "epoch": -1, "stage_done": True})
        dist.barrier()
    accuracy = run.validate() if any(s.validates for s in stages) else None
    summary = {**_summary(run, task_data, outcomes, accuracy, time.perf_counter() - started), **start}
    if run.sharding is not None:
        run.sharding.gather()  # plain tensors for the save and the sequence's evaluations
    restore_frozen(model, frozen)
    if dist.main:
        if memory is not None:
            head.close_memory(memory, artifact / TRAIN_DIR, task, task_data.train, len(task_data.classes),
                              image_size, seed)
        journal.update(task, status="finished", **info, val_accuracy=accuracy, stages=outcomes,
                        corrupt_skipped=summary["corrupt_skipped"])
        model.save(artifact)
        ckpt.remove()
    dist.barrier()
    if run.corrupt:
        example = sorted(run.corrupt)[0]
        reporter.warn(f"skipped {len(run.corrupt)} corrupt image(s) that did not decode, e.g. {example}")
    return TaskResult(summary, model)


def _outcome(o: StageOutcome) -> dict[str, Any]:
    return {"stage": o.label, "epochs": o.epochs_run, "best_accuracy": o.best_accuracy,
            "best_epoch": None if o.best_epoch is None else o.best_epoch + 1, "stopped_early": o.stopped_early,
            "history": o.history}


def _summary(run: TaskRun, data: Any, outcomes: list[dict[str, Any]], accuracy: float, seconds: float
             ) -> dict[str, Any]:
    images = sum(r["images"] for o in outcomes for r in o["history"])
    train_seconds = sum(r["seconds"] for o in outcomes for r in o["history"])
    return {
        "task": run.task,
        "status": "finished",
        "artifact": str(run.artifact),
        "classes": list(data.classes),
        "train_images": len(data.train),
        "val_images": len(data.val),
        "val_accuracy": accuracy,
        "chance": 1.0 / len(data.classes),
        "stages": outcomes,
        "lr": run.recipe.effective_lr(),
        "batch_size": run.recipe.batch_size,
        "image_size": run.image_size,
        "device": str(run.device),
        "world_size": run.dist.world,
        "images_per_second": round(images / train_seconds, 1) if train_seconds else None,
        "seconds": round(seconds, 2),
        "corrupt_skipped": len(run.corrupt),
        "corrupt_examples": [str(p) for p in sorted(run.corrupt)[:5]],
    }
