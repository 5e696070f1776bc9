"""The epoch loop of one stage: batches → loss → optimizer and lr steps, then validation, early stopping and a
checkpoint after every epoch.

Resuming restores the optimizer, the lr schedule's step, the early-stopping bookkeeping, the stage's own
tensors and the random generators from the last checkpoint, then replays the next epoch with the same shuffle
(the loader's generator is seeded by stage and epoch), so an interrupted run ends bit-identical to an
uninterrupted one on the same hardware.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from peftc.language import TrainSection
from peftc.train.context import TaskRun, batches
from peftc.train.recipe import LRSchedule, build_optimizer
from peftc.train.stages import Stage
from peftc.train.step import Stepper, average_gradients, optimizer_steps

__all__ = ["StageOutcome", "run_stage"]

SaveFn = Callable[[dict[str, Any], torch.optim.Optimizer | None, dict[str, torch.Tensor] | None,
                   dict[str, torch.Tensor] | None], None]


@dataclass
class StageOutcome:
    """What a stage did: per-epoch records, the best validation accuracy and whether it stopped early."""

    label: str
    epochs_run: int
    history: list[dict[str, Any]] = field(default_factory=list)
    best_accuracy: float | None = None
    best_epoch: int | None = None
    stopped_early: bool = False


def _wrap(run: TaskRun, stage: Stage) -> nn.Module | None:
    """The module the stage's loss runs through: DDP when distributed (not with FSDP, whose trained tensors are
    plain and averaged by the stepper), compiled with ``--compile``; None = the model itself, eager."""
    module: nn.Module | None = None
    if run.dist.enabled and stage.ddp and run.sharding is None:
        device_ids = [run.device.index] if run.device.type == "cuda" else None
        module = nn.parallel.DistributedDataParallel(run.model, device_ids=device_ids, find_unused_parameters=True)
    run.ddp = module
    if run.compile:
        # fullgraph: a graph break is an error, not a silent fallback to eager (tests train with it)
        module = torch.compile(run.model if module is None else module, fullgraph=True)
    return module


def run_stage(run: TaskRun, stage: Stage, recipe: TrainSection, index: int, resume: dict[str, Any] | None,
              save: SaveFn, resume_tensors: tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]] | None = None
              ) -> StageOutcome:
    """Train one stage for ``recipe.epochs`` epochs (fewer with early stopping); see the module docstring."""
    per_batch = run.dist.per_process_batch(recipe.batch_size)
    lr = recipe.effective_lr()  # for the effective batch: batch_size × accumulate
    epochs = recipe.epochs
    outcome = StageOutcome(stage.label, 0)
    stage.begin()
    if epochs == 0:
        stage.end()
        return outcome
    params = stage.parameters()
    optimizer = build_optimizer(params, recipe, lr)
    batches_per_epoch = len(run.train_loader(per_batch, index, 0))
    schedule = LRSchedule(optimizer, recipe.scheduler, optimizer_steps(batches_per_epoch, recipe.accumulate), epochs)
    average = (lambda ps: average_gradients(ps, run.dist.world, run.device)) if (
        run.dist.enabled and (not stage.ddp or run.sharding is not None)) else None  # FSDP leaves them to us
    stepper = Stepper(optimizer, schedule, params, run.precision, recipe.accumulate, recipe.grad_clip, average)
    start, best, bad = 0, None, 0
    if resume is not None:
        optimizer.load_state_dict(resume["optimizer_state"])
        schedule.load_state_dict(resume["schedule"])
        start = epochs if resume.get("stopped") else resume["epoch"] + 1
        outcome.history = list(resume["history"])
        outcome.best_accuracy, outcome.best_epoch = resume["best_accuracy"], resume["best_epoch"]
        bad = resume["bad_epochs"]
        best_tensors, extra = resume_tensors or ({}, {})
        best = best_tensors or None
        stage.load_extra_state(extra)
    run.forward_module = _wrap(run, stage)
    patience = recipe.early_stop
    title = f"{run.task} · {stage.label}"
    run.reporter.start(title, batches_per_epoch * (epochs - start))
    try:
        for epoch in range(start, epochs):
            if stage.begin_epoch(epoch, epochs) and run.dist.enabled:
                run.forward_module = _wrap(run, stage)  # DDP fixes its parameter set at construction
            record = _epoch(run, stage, stepper, per_batch, index, epoch)
            with run.sharding.gathered() if run.sharding is not None else contextlib.nullcontext():
                accuracy = stage.validate()  # any stage's evaluation: its shards are not padded
            record["val_accuracy"] = accuracy
            if run.log is not None:
                run.log.epoch(record)
            improved = accuracy is not None and (outcome.best_accuracy is None or accuracy > outcome.best_accuracy)
            if improved:
                outcome.best_accuracy, outcome.best_epoch, bad = accuracy, epoch, 0
                if patience is not None:
                    best = run.snapshot()
            elif accuracy is not None:
                bad += 1
            outcome.history.append(record)
            stop = patience is not None and accuracy is not None and bad >= patience
            run.reporter.epoch(_line(stage.label, epoch, epochs, record, improved))
            state = {"epoch": epoch, "history": outcome.history, "best_accuracy": outcome.best_accuracy,
                     "best_epoch": outcome.best_epoch, "bad_epochs": bad, "schedule": schedule.state_dict(),
                     "stopped": stop}
            if run.dist.main:
                save(state, optimizer, best, stage.extra_state())
            run.dist.barrier()
            if run.hooks.on_epoch_end is not None:
                run.hooks.on_epoch_end(run, stage, epoch, record)
            outcome.epochs_run = epoch + 1
            if stop:
                outcome.stopped_early = True
                run.reporter.note(f"  early stop: no better validation accuracy for {patience} epochs; "
                                  f"keeping epoch {outcome.best_epoch + 1}")
                break
    finally:
        run.reporter.stop()
        run.forward_module = None
    if patience is not None and best is not None:
        run.restore(best)
    stage.end()
    return outcome


def _epoch(run: TaskRun, stage: Stage, stepper: Stepper, per_batch: int, index: int, epoch: int) -> dict[str, Any]:
    run.model.train()
    loader = run.train_loader(per_batch, index, epoch)
    samples = len(loader.sampler)  # type: ignore[arg-type]
    stepper.start_epoch(samples - (samples % per_batch if loader.drop_last else 0), len(loader), per_batch)
    started = last = time.perf_counter()
    total_loss, seen, steps, corrupt_before = 0.0, 0, 0, len(run.corrupt)
    step_loss, step_images = 0.0, 0
    for batch, (images, labels, bad) in enumerate(batches(loader, run.device, run.memory_format)):
        run.note_corrupt(bad)
        if labels.numel() == 0:
            continue
        with stepper.sync(run.ddp, batch):
            with run.precision.autocast():
                loss = stage.loss(images, labels)
            if not torch.isfinite(loss):
                from peftc.errors import PeftcError

                raise PeftcError(f"task {run.task!r}, stage {stage.label!r}: the loss became {loss.item()} at epoch "
                                 f"{epoch + 1}, step {batch + 1}; lower the learning rate (train.lr)")
            lr = stepper.schedule.lr  # the lr this step updates with (the schedule moves on after it)
            stepped = stepper.backward(batch, loss, len(labels))
        value = float(loss.detach())
        total_loss += value * len(labels)
        seen += len(labels)
        step_loss += value * len(labels)
        step_images += len(labels)
        run.reporter.step(len(labels) * run.dist.world, value)
        if stepped:
            steps += 1
            now = time.perf_counter()
            if run.log is not None:
                speed = round(step_images * run.dist.world / max(now - last, 1e-9), 1)
                run.log.step({"stage": stage.label, "epoch": epoch + 1, "step": steps,
                              "global_step": stepper.schedule.step_count, "loss": step_loss / step_images,
                              "lr": lr, "images_per_second": speed})
            last, step_loss, step_images = now, 0.0, 0
        if run.hooks.on_step is not None:
            run.hooks.on_step(run, stage, epoch, batch, value)
    stepper.update()  # a group cut short by skipped batches
    loss_sum, count = run.dist.sum([total_loss, seen])
    seconds = time.perf_counter() - started
    return {"stage": stage.label, "epoch": epoch + 1, "loss": loss_sum / count if count else math.nan,
            "lr": stepper.schedule.lr, "images": int(count), "steps": steps, "seconds": round(seconds, 3),
            "images_per_second": round(count / seconds, 1) if seconds > 0 else None,
            "corrupt_skipped": len(run.corrupt) - corrupt_before}


def _line(label: str, epoch: int, epochs: int, record: dict[str, Any], improved: bool) -> str:
    acc = record["val_accuracy"]
    acc_text = f"  val acc {acc:.4f}{' *' if improved else ''}" if acc is not None else ""
    skipped = f"  [yellow]{record['corrupt_skipped']} corrupt skipped[/]" if record["corrupt_skipped"] else ""
    return (f"  {label} epoch {epoch + 1}/{epochs}  loss {record['loss']:.4f}  lr {record['lr']:.2e}"
            f"  {record['images_per_second'] or 0:,.0f} img/s{acc_text}{skipped}")
