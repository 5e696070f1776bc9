"""``peftc train``, ``peftc eval`` and ``peftc demo-data`` (see docs/training.md)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from rich.markup import escape
from rich.table import Table

from peftc.cli.app import app
from peftc.cli.common import MAX_IMAGE_SIZE, console, handle_errors, print_json

JsonOpt = Annotated[bool, typer.Option("--json", help="Print machine-readable JSON (progress still goes to stderr).")]
DeviceOpt = Annotated[str, typer.Option("--device", help="auto (CUDA when usable, else CPU), cpu, cuda or cuda:N "
                                        "(under torchrun: each process's GPU).")]
SizeOpt = Annotated[Optional[int], typer.Option("--image-size", min=8, max=MAX_IMAGE_SIZE,
                                                help="Train/evaluate at this size (default: the backbone's input).")]
WorkersOpt = Annotated[Optional[int], typer.Option("--workers", min=0, help="DataLoader worker processes "
                                                   "(default: min(8, CPUs)).")]


def _classes(values: list[str] | None) -> list[str] | None:
    if not values:
        return None
    out = [c.strip() for v in values for c in v.split(",") if c.strip()]
    return out or None


def _not_main_process() -> bool:
    """Under torchrun only rank 0 reports (every process computes the same summary)."""
    import os

    return os.environ.get("RANK", "0") != "0"


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"


@app.command("train")
@handle_errors
def train_cmd(
    directory: Annotated[Path, typer.Argument(help="Artifact directory (from `peftc compile ... -o DIR`).")],
    task: Annotated[Optional[str], typer.Option("--task", help="Name of the task to train.")] = None,
    data: Annotated[Optional[Path], typer.Option("--data", help="ImageFolder, or a folder with train/ and val/."
                                                 )] = None,
    sequence: Annotated[Optional[Path], typer.Option("--sequence", help="Train the tasks of a tasks.yaml in order."
                                                     )] = None,
    classes: Annotated[Optional[list[str]], typer.Option("--classes", help="Class folders to use, in label order "
                                                         "(comma-separated or repeated).")] = None,
    epochs: Annotated[Optional[int], typer.Option("--epochs", min=1, help="Epochs (also caps every stage).")] = None,
    batch_size: Annotated[Optional[int], typer.Option("--batch-size", min=1, help="Global batch size.")] = None,
    lr: Annotated[Optional[float], typer.Option("--lr", help="Learning rate (before the recipe's batch scaling)."
                                                )] = None,
    early_stop: Annotated[Optional[int], typer.Option("--early-stop", min=1, help="Stop after N epochs without a "
                                                      "better validation accuracy (the best epoch is kept).")] = None,
    recipe: Annotated[Optional[list[str]], typer.Option("--recipe", help="Override a train: key, e.g. "
                                                        "scheduler=cosine or optimizer.name=sgd (repeatable).")] = None,
    device: DeviceOpt = "auto",
    precision: Annotated[Optional[str], typer.Option("--precision", help="fp32, bf16 or fp16 (autocast; fp16 adds "
                                                     "loss scaling and needs CUDA). Default: the recipe's.")] = None,
    frozen_dtype: Annotated[Optional[str], typer.Option("--frozen-dtype", help="Store frozen conv/linear weights in "
                                                        "bf16 or fp16 (half their memory; needs --precision).")] = None,
    accumulate: Annotated[Optional[int], typer.Option("--accumulate", help="Micro-batches per optimizer step: the "
                                                      "effective batch is batch size x N.")] = None,
    compile_: Annotated[bool, typer.Option("--compile", help="torch.compile the training forward and backward.")
                        ] = False,
    channels_last: Annotated[Optional[bool], typer.Option("--channels-last/--no-channels-last", help="NHWC memory "
                                                          "format for CNNs (default: on CUDA).")] = None,
    log: Annotated[Optional[list[str]], typer.Option("--log", help="Also log to: tensorboard (JSONL and CSV are "
                                                     "always written to DIR/train/<task>/log).")] = None,
    sharding: Annotated[str, typer.Option("--sharding", help="Under torchrun: ddp (a replica per process) or fsdp "
                                          "(frozen weights sharded over the processes).")] = "ddp",
    resume: Annotated[bool, typer.Option("--resume", help="Continue an interrupted run from its checkpoint.")] = False,
    seed: Annotated[int, typer.Option("--seed", help="Seed for shuffling, augmentation and new heads.")] = 0,
    image_size: SizeOpt = None,
    workers: WorkersOpt = None,
    val_split: Annotated[float, typer.Option("--val-split", help="Share held out for validation when the data has "
                                             "no val/ folder.")] = 0.2,
    select: Annotated[bool, typer.Option("--select", help="With --sequence: also evaluate with the method's task "
                                         "selection at the end.")] = False,
    stream: Annotated[Optional[Path], typer.Option("--stream", help="Learn a task-free stream online, one pass "
                                                   "(a stream file; see docs/training.md).")] = None,
    online: Annotated[bool, typer.Option("--online", help="With --sequence: learn its tasks as one online stream."
                                         )] = False,
    memory: Annotated[Optional[int], typer.Option("--memory", min=1, help="Online: replay memory size (samples)."
                                                  )] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress output.")] = False,
    json_: JsonOpt = False,
) -> None:
    """Train a task of an artifact (or a sequence of tasks) with the spec's recipe, or learn a stream online."""
    from peftc.train.data import ensure_task_name
    from peftc.train.logs import check_loggers
    from peftc.train.precision import DTYPES, PrecisionError
    from peftc.train.recipe import parse_recipe_overrides
    from peftc.train.task import TrainError, TrainOptions, train_task

    if stream is not None or online:
        _train_online(directory, stream, sequence, online, task, data, epochs, batch_size, memory, lr, recipe,
                      device, resume, seed, image_size, val_split, quiet, json_)
        return
    if memory is not None:
        raise TrainError("--memory is the online replay memory: use it with --stream or --online")
    if (task is None) == (sequence is None):
        raise TrainError("give either --task NAME with --data PATH, or --sequence tasks.yaml")
    checks = (("--precision", precision, tuple(DTYPES)), ("--frozen-dtype", frozen_dtype, ("bf16", "fp16")))
    for flag, value, allowed in checks:
        if value is not None and value not in allowed:
            raise PrecisionError(f"{flag} must be one of {', '.join(allowed)}, got {value!r}")
    if accumulate is not None and accumulate < 1:
        raise TrainError(f"--accumulate must be at least 1 (micro-batches per optimizer step), got {accumulate}")
    overrides: dict[str, Any] = parse_recipe_overrides(recipe)
    for key, value in (("batch_size", batch_size), ("lr", lr), ("early_stop", early_stop), ("precision", precision),
                       ("accumulate", accumulate)):
        if value is not None:
            overrides[key] = value
    options = TrainOptions(classes=_classes(classes), overrides=overrides, epochs=epochs, device=device,
                           resume=resume, seed=seed, image_size=image_size, workers=workers, val_fraction=val_split,
                           quiet=quiet, frozen_dtype=frozen_dtype, compile=compile_, channels_last=channels_last,
                           log=check_loggers(log or []), sharding=sharding)
    if sequence is not None:
        if data is not None or classes:
            raise TrainError("--data and --classes belong to one task; a sequence names them per task in its file")
        from peftc.train.sequence import train_sequence

        record = train_sequence(directory, sequence, options, select=select)
        if _not_main_process():
            return
        if json_:
            print_json(record)
            return
        _render_sequence(record)
        return
    if select:
        raise TrainError("--select evaluates a whole sequence; for one task use `peftc eval DIR --select`")
    if data is None:
        raise TrainError("--task needs --data PATH (an ImageFolder, or a folder with train/ and val/)")
    assert task is not None
    result = train_task(directory, ensure_task_name(task), data, options)
    if _not_main_process():
        return
    if json_:
        print_json(result.summary)
        return
    s = result.summary
    if s["status"] != "finished":
        console.print(f"task {task!r}: {s['status']} (val accuracy {_pct(s.get('val_accuracy'))})")
        return
    console.print(f"[green]trained[/] task [bold]{task}[/] ({', '.join(s['classes'])}) → {s['artifact']}: "
                  f"val accuracy [bold]{_pct(s['val_accuracy'])}[/] (chance {_pct(s['chance'])}), "
                  f"{s['seconds']:.1f} s" + (f", {s['corrupt_skipped']} corrupt images skipped"
                                             if s["corrupt_skipped"] else ""))


def _train_online(directory: Path, stream: Path | None, sequence: Path | None, online: bool, task: str | None,
                  data: Path | None, epochs: int | None, batch_size: int | None, memory: int | None,
                  lr: float | None, recipe: list[str] | None, device: str, resume: bool, seed: int,
                  image_size: int | None, val_split: float, quiet: bool, json_: bool) -> None:
    """``--stream FILE`` or ``--online --sequence FILE``: one pass over a task-free stream (peftc.train.online)."""
    from peftc.train.online import OnlineOptions, train_stream
    from peftc.train.recipe import parse_recipe_overrides
    from peftc.train.task import TrainError

    if online and sequence is None:
        raise TrainError("--online learns a --sequence file as one stream; or give --stream FILE")
    if stream is not None and (online or sequence is not None):
        raise TrainError("give either --stream FILE or --online --sequence FILE, not both")
    if task is not None or data is not None or epochs is not None:
        raise TrainError("an online stream is one pass over the stream file's tasks: --task, --data and --epochs "
                         "do not apply")
    overrides: dict[str, Any] = parse_recipe_overrides(recipe)
    if lr is not None:
        overrides["lr"] = lr
    options = OnlineOptions(overrides=overrides, batch_size=batch_size, memory=memory, seed=seed,
                            image_size=image_size, device=device, resume=resume, quiet=quiet or json_,
                            val_fraction=val_split)
    source = stream if stream is not None else sequence
    assert source is not None
    record = train_stream(directory, source, options)
    if json_:
        print_json(record)
        return
    table = Table(title=escape(f"{record['stream']}: {record['learner']}, batch {record['batch_size']}, memory "
                               f"{record['memory']} ({record['sampling']}), {record['samples']} samples, one pass"),
                  title_justify="left", header_style="bold")
    for col in ("classifier", "final avg acc", "avg incremental acc", "forgetting", "recent-class share"):
        table.add_column(col, justify="left" if col == "classifier" else "right")
    for name, res in record["classifiers"].items():
        table.add_row(name, _pct(res["average_accuracy"]), _pct(res["average_incremental_accuracy"]),
                      _pct(res["forgetting"]), _pct(res["final_recent_share"]))
    console.print(table)
    console.print(f"{record['images_per_second']:,.0f} images/s; wrote {record['json']}"
                  + (f" and {record['figure']}" if record["figure"] else ""))


def _render_sequence(record: dict[str, Any]) -> None:
    names = record["tasks"]
    table = Table(title=escape("accuracy a[i][j]: after training row i, on task j"), title_justify="left",
                  header_style="bold")
    table.add_column("trained through")
    for name in names:
        table.add_column(name, justify="right")
    for name, row in zip(names, record["matrix"]):
        table.add_row(name, *[_pct(v) for v in row])
    console.print(table)
    console.print(f"average accuracy {_pct(record['average_accuracy'])}   forgetting {_pct(record['forgetting'])}   "
                  f"backward transfer {_pct(record['backward_transfer'])}")
    if "select" in record:
        sel = record["select"]
        console.print(f"with task selection: accuracy {_pct(sel['average_accuracy'])}, task selection "
                      f"{_pct(sel['task_selection_accuracy'])}")
    console.print(f"wrote {record['json']}" + (f" and {record['heatmap']}" if record["heatmap"] else ""))


@app.command("eval")
@handle_errors
def eval_cmd(
    directory: Annotated[Path, typer.Argument(help="Artifact directory.")],
    data: Annotated[Optional[Path], typer.Option("--data", help="A task's folder (with --task), a folder of task "
                                                 "folders, or a tasks.yaml; default: where each task trained.")] = None,
    task: Annotated[Optional[str], typer.Option("--task", help="Evaluate this task only.")] = None,
    select: Annotated[bool, typer.Option("--select", help="Predict the task with the method's task selection "
                                         "instead of giving it.")] = False,
    device: DeviceOpt = "auto",
    batch_size: Annotated[int, typer.Option("--batch-size", min=1)] = 64,
    image_size: SizeOpt = None,
    workers: WorkersOpt = None,
    split: Annotated[str, typer.Option("--split", help="val or train.")] = "val",
    json_: JsonOpt = False,
) -> None:
    """Report accuracy per task (task given, or predicted with --select); for a stream, every classifier."""
    from peftc.train.context import default_workers
    from peftc.train.evaluation import EvalError, evaluate
    from peftc.train.journal import TRAIN_DIR
    from peftc.train.online import ONLINE_JSON

    workers = default_workers() if workers is None else workers
    if split not in ("val", "train"):
        raise EvalError(f"--split must be val or train, got {split!r}")
    if (directory / TRAIN_DIR / ONLINE_JSON).is_file() and data is None and task is None and not select:
        _eval_online(directory, device, batch_size, json_)
        return
    result = evaluate(directory, data, task=task, select=select, device=device, batch_size=batch_size,
                      image_size=image_size, workers=workers, split=split)
    if _not_main_process():
        return
    if json_:
        print_json(result)
        return
    table = Table(title=f"{directory} ({split} split, task {'selected' if select else 'given'})",
                  title_justify="left", header_style="bold")
    for col in ("task", "images", "accuracy", "chance", *(("task given", "task selection") if select else ())):
        table.add_column(col, justify="left" if col == "task" else "right")
    for name, row in result["tasks"].items():
        extra = (_pct(row["oracle_accuracy"]), _pct(row["task_selection_accuracy"])) if select else ()
        table.add_row(name, str(row["images"]), _pct(row["accuracy"]), _pct(row["chance"]), *extra)
    console.print(table)
    line = f"average accuracy {_pct(result['average_accuracy'])}"
    if select:
        line += f"   task-selection accuracy {_pct(result['task_selection_accuracy'])}"
    console.print(line)


def _eval_online(directory: Path, device: str, batch_size: int, json_: bool) -> None:
    """An artifact trained on a stream: every classifier of its learner side by side (NCM and softmax, say)."""
    from peftc.train.journal import TRAIN_DIR
    from peftc.train.online import ONLINE_JSON
    from peftc.train.online_eval import evaluate_online

    result = evaluate_online(directory, directory / TRAIN_DIR / ONLINE_JSON, device, batch_size)
    if json_:
        print_json(result)
        return
    names = result["classifiers"]
    table = Table(title=f"{directory} (stream {result['stream']}, learner {result['learner']}, all classes seen)",
                  title_justify="left", header_style="bold")
    for col in ("task", "images", *names):
        table.add_column(col, justify="left" if col == "task" else "right")
    for name, row in result["tasks"].items():
        table.add_row(name, str(row["images"]), *[_pct(row[c]) for c in names])
    table.add_row("average", "", *[_pct(result["average_accuracy"][c]) for c in names])
    table.add_row("recent-class share", "", *[_pct(result["recent_share"][c]) for c in names])
    console.print(table)


@app.command("demo-data")
@handle_errors
def demo_data_cmd(
    directory: Annotated[Path, typer.Argument(help="Folder to write the tasks into.")],
    tasks: Annotated[int, typer.Option("--tasks", min=1, max=5, help="Number of two-class tasks.")] = 5,
    size: Annotated[int, typer.Option("--size", min=8, max=1024, help="Image side in pixels.")] = 32,
    per_class: Annotated[Optional[int], typer.Option("--per-class", min=1, help="Train images per class "
                                                     "(default: all).")] = None,
    val_per_class: Annotated[Optional[int], typer.Option("--val-per-class", min=1, help="Val images per class "
                                                         "(default: 20%).")] = None,
    seed: Annotated[int, typer.Option("--seed")] = 0,
    json_: JsonOpt = False,
) -> None:
    """Write small digit-classification tasks (scikit-learn's bundled digits; no download) and a tasks.yaml."""
    from peftc.train.demo import make_demo_data

    summary = make_demo_data(directory, tasks=tasks, size=size, per_class=per_class, val_per_class=val_per_class,
                             seed=seed)
    if json_:
        print_json(summary)
        return
    for t in summary["tasks"]:
        counts = ", ".join(f"{c} {n['train']}+{n['val']}" for c, n in t["images"].items())
        console.print(f"{t['name']}: {counts} (train+val)")
    console.print(f"wrote {directory}/tasks.yaml — try: peftc train ART --sequence {directory}/tasks.yaml "
                  f"--image-size {size}")
