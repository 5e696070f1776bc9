"""``peftc train DIR --sequence tasks.yaml``: train tasks in order and measure forgetting.

The sequence file::

    root: .                      # optional: where task folders are, relative to this file
    epochs: 3                    # optional: for every task (a task's own `epochs` wins, --epochs wins over all)
    tasks:
      - {name: task1, data: task1, classes: [zero, one]}
      - {name: task2, data: task2}

After each task i every task j ≤ i is evaluated with its task given (the oracle protocol of task-incremental
papers) — row i of the accuracy matrix. The matrix, the summary metrics (:mod:`peftc.train.metrics`) and a
heat map go to ``DIR/train/accuracy.json`` and ``DIR/train/accuracy.png``, rewritten after every task, so
``--resume`` continues an interrupted sequence with the rows it already has.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from peftc.compiler import load
from peftc.storage.atomic import write_file
from peftc.train.data import SequenceError, discover, read_sequence
from peftc.train.distributed import setup
from peftc.train.evaluation import evaluate_model
from peftc.train.journal import TRAIN_DIR, Journal
from peftc.train.metrics import DEFINITIONS, continual_metrics, heatmap
from peftc.train.progress import Reporter
from peftc.train.task import TrainError, TrainOptions, train_task

__all__ = ["train_sequence"]

ACCURACY_JSON = "accuracy.json"
ACCURACY_PNG = "accuracy.png"


def _write(directory: Path, record: dict[str, Any]) -> None:
    write_file(directory / ACCURACY_JSON, json.dumps(record, indent=1) + "\n")


def _check_selection(artifact: Path, options: TrainOptions) -> None:
    """Refuse ``select`` before training when the method has no task selection (not after the whole sequence)."""
    from peftc.train.evaluation import EvalError, task_predictor
    from peftc.train.heads import get_head
    from peftc.train.recipe import resolve

    model = load(artifact)
    head = get_head(resolve(model.spec.train, options.overrides).head)
    if head.guesses_tasks() or task_predictor(model) is not None:
        return
    raise EvalError(f"spec {model.spec.name!r} has no task selection (no block predicts tasks and its training "
                    "head selects none); drop --select")


def _row(model: Any, names: list[str], i: int, data: dict[str, Any], settings: dict[str, tuple[int, str]],
         journal: Journal, workers: int, dist: Any) -> list[float | None]:
    """Row i of the accuracy matrix: every task j <= i with its task given; None after i."""
    row: list[float | None] = []
    for j, other in enumerate(names):
        if j > i:
            row.append(None)
            continue
        size, augment = settings[other]
        result = evaluate_model(model, {other: data[other]}, journal=journal, image_size=size, augment=augment,
                                workers=workers, dist=dist)
        row.append(result["tasks"][other]["accuracy"])
    return row


def _metrics(matrix: list[list[float | None]], starts: list[dict[str, float]]) -> dict[str, Any]:
    """The metrics, with forward transfer when every task has its start and untrained accuracy, and what each
    key means (``metrics.DEFINITIONS``)."""
    before = [s.get("start_accuracy") for s in starts]
    baselines = [s.get("untrained_accuracy") for s in starts]
    return {**continual_metrics(matrix, before=before, baselines=baselines), "start_accuracy": before,
            "untrained_accuracy": baselines, "definitions": DEFINITIONS}


def train_sequence(artifact: str | Path, sequence: str | Path, options: TrainOptions | None = None,
                   *, select: bool = False) -> dict[str, Any]:
    """Train every task of ``sequence`` in order on the artifact; returns the accuracy matrix and metrics."""
    options = options or TrainOptions()
    artifact = Path(artifact)
    seq = read_sequence(sequence)
    if select:
        _check_selection(artifact, options)
    dist = setup(options.device)
    reporter = Reporter(quiet=options.quiet or not dist.main, warnings=dist.main)
    journal = Journal(artifact)
    names = [t.name for t in seq.tasks]
    out_dir = artifact / TRAIN_DIR
    previous: dict[str, Any] = {}
    if (out_dir / ACCURACY_JSON).is_file() and options.resume:
        previous = json.loads((out_dir / ACCURACY_JSON).read_text(encoding="utf-8"))
        if previous.get("tasks") != names:
            raise SequenceError(f"{out_dir / ACCURACY_JSON} belongs to another sequence ({previous.get('tasks')})")
    matrix: list[list[float | None]] = []
    summaries: list[dict[str, Any]] = []
    model = None
    data = {}
    settings: dict[str, tuple[int, str]] = {}
    finished = [journal.finished(t.name) for t in seq.tasks]
    untrained = None  # forward transfer's baseline: the shared state before any task trained (a fresh sequence)
    if not any(finished) and not journal.trained_tasks():
        model = load(artifact)
        untrained = {k: v.clone() for k, v in model.shared_state().items()}
    starts: list[dict[str, float]] = []
    for i, task in enumerate(seq.tasks):
        if finished[i]:
            if not options.resume:
                raise TrainError(f"task {task.name!r} of the sequence is already trained in {artifact}; pass "
                                 "--resume to continue the sequence, or use a fresh artifact")
            entry = journal.task(task.name) or {}
            starts.append(entry.get("start_accuracy") or {})
            data[task.name] = discover(task.data, entry.get("classes"), seed=entry.get("seed", options.seed))
            settings[task.name] = (entry.get("image_size"), (entry.get("recipe") or {}).get("augment", "standard"))
            reporter.note(f"task {i + 1}/{len(names)} {task.name}: already trained")
            rows = previous.get("matrix") or []
            if i < len(rows):
                matrix.append(rows[i])
                continue
            if any(finished[i + 1:]):
                raise SequenceError(f"task {task.name!r} is trained but {out_dir / ACCURACY_JSON} has no row for "
                                    "it, and later tasks changed the model since; the sequence cannot be resumed")
            # the latest finished task (trained alone, say): the model is as it left it
            model = model or load(artifact).to(dist.device)
            matrix.append(_row(model, names, i, data, settings, Journal(artifact), options.workers, dist))
            continue
        epochs = options.epochs or task.epochs or seq.epochs
        task_options = dataclasses.replace(options, classes=task.classes, epochs=epochs)
        reporter.note(f"[bold]task {i + 1}/{len(names)}: {task.name}[/]")
        result = train_task(artifact, task.name, task.data, task_options, model=model, dist=dist, reporter=reporter,
                            untrained=untrained)
        model = result.model
        summaries.append(result.summary)
        starts.append({k: result.summary[k] for k in ("start_accuracy", "untrained_accuracy") if k in result.summary})
        entry = Journal(artifact).task(task.name) or {}
        data[task.name] = discover(task.data, result.summary["classes"], seed=entry.get("seed", options.seed))
        settings[task.name] = (result.summary["image_size"], (entry.get("recipe") or {}).get("augment", "standard"))
        row = _row(model, names, i, data, settings, Journal(artifact), options.workers, dist)
        matrix.append(row)
        reporter.note("  accuracy after " + task.name + ": "
                      + "  ".join(f"{n} {a:.3f}" for n, a in zip(names, row) if a is not None))
        if dist.main:
            _write(out_dir, {"tasks": names, "matrix": matrix, **_metrics(matrix, starts)})
    record: dict[str, Any] = {"artifact": str(artifact), "tasks": names, "matrix": matrix,
                              **_metrics(matrix, starts), "trained": [s["task"] for s in summaries]}
    if select:

        model = model or load(artifact).to(dist.device)
        size, augment = settings[names[-1]]
        chosen = evaluate_model(model, data, journal=Journal(artifact), select=True, image_size=size,
                                augment=augment, workers=options.workers, dist=dist)
        record["select"] = {"average_accuracy": chosen["average_accuracy"],
                            "task_selection_accuracy": chosen["task_selection_accuracy"],
                            "tasks": chosen["tasks"]}
    record["heatmap"] = None
    if dist.main:
        png = heatmap(matrix, names, out_dir / ACCURACY_PNG, f"{artifact.name}: accuracy a[i][j]")
        record["heatmap"] = str(png) if png else None
        if png is None:
            reporter.warn("matplotlib is not installed: no heat map (pip install 'peftc[plot]')")
        _write(out_dir, {k: v for k, v in record.items() if k != "artifact"})
    record["json"] = str(out_dir / ACCURACY_JSON)
    record["runs"] = summaries
    return record
