"""``peftc export`` (ONNX file, Triton repository) and ``peftc run`` (latency and classification per backend)."""

from __future__ import annotations

import contextlib
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from rich.table import Table

from peftc.cli.app import app
from peftc.cli.common import (
    MAX_BATCH,
    MAX_IMAGE_SIZE,
    MAX_THREADS,
    console,
    err_console,
    fmt_int,
    handle_errors,
    load_plugins,
    print_json,
)
from peftc.errors import PeftcError

JsonOpt = Annotated[bool, typer.Option("--json", help="Print machine-readable JSON.")]
TaskOpt = Annotated[Optional[str], typer.Option("--task", help="Task to deploy (default: the artifact's active task).")]
AllTasksOpt = Annotated[bool, typer.Option("--all-tasks", help="One graph for all tasks; a 'task' input per sample.")]
SelectTaskOpt = Annotated[bool, typer.Option(
    "--select-task", help="LN tuning: one graph that picks each sample's task by its task key (image in only).")]
NoFoldOpt = Annotated[bool, typer.Option("--no-fold", help="Keep peftc's blocks instead of merging them into weights.")]
SizeOpt = Annotated[
    Optional[tuple[int, int]], typer.Option("--image-size", min=8, max=MAX_IMAGE_SIZE,
                                           help="Input height and width (default: the backbone's).")
]
ProviderOpt = Annotated[
    str, typer.Option("--provider", help="ONNX Runtime provider: auto (CUDA when it works, else CPU), cpu, cuda.")
]
PluginOpt = Annotated[Optional[list[str]], typer.Option("--plugin", help="Import a module that registers blocks.")]


@contextlib.contextmanager
def _progress(enabled: bool) -> Iterator[Callable[[str], None]]:
    """A spinner on stderr naming the current stage (silent with --json)."""
    if not enabled:
        yield lambda _msg: None
        return
    with err_console.status("starting") as status:
        yield lambda msg: status.update(f"{msg}…")


@app.command("export")
@handle_errors
def export_cmd(
    artifact: Annotated[Path, typer.Argument(help="Artifact directory (from `peftc compile -o DIR`).")],
    onnx: Annotated[Optional[Path], typer.Option("--onnx", help="Write an ONNX file here (OUT.onnx).")] = None,
    triton: Annotated[Optional[Path], typer.Option("--triton", help="Write a Triton model repository here.")] = None,
    task: TaskOpt = None,
    all_tasks: AllTasksOpt = False,
    select_task: SelectTaskOpt = False,
    no_fold: NoFoldOpt = False,
    opset: Annotated[Optional[int], typer.Option("--opset", min=1, max=100,
                                                 help="ONNX opset (default: the exporter's).")] = None,
    image_size: SizeOpt = None,
    provider: ProviderOpt = "auto",
    name: Annotated[Optional[str], typer.Option("--name", help="Triton model name (default: spec_backbone_task).")] = (
        None
    ),
    max_batch: Annotated[int, typer.Option("--max-batch", min=1, max=MAX_BATCH, help="Triton max_batch_size.")] = 32,
    plugin: PluginOpt = None,
    json_: JsonOpt = False,
) -> None:
    """Export an artifact to ONNX (folded, dynamic batch, verified with ONNX Runtime) and/or a Triton repository."""
    from peftc.export.onnx import export_onnx
    from peftc.export.triton import check_name, model_name, triton_config, write_repository

    if onnx is None and triton is None:
        raise PeftcError("nothing to export: give --onnx OUT.onnx and/or --triton REPO_DIR")
    if name is not None:
        check_name(name)  # before the (slow) export
    load_plugins(plugin)
    with contextlib.ExitStack() as stack:
        target = onnx
        if target is None:
            target = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="peftc-export-"))) / "model.onnx"
        say = stack.enter_context(_progress(not json_))
        result = export_onnx(artifact, target, task=task, fold=not no_fold, all_tasks=all_tasks,
                             select_task=select_task, opset=opset, image_size=image_size, provider=provider,
                             progress=say)
        repo_dir = None
        if triton is not None:
            say("writing the Triton repository")
            label = name or model_name(result.spec, result.backbone, "selected" if select_task else result.task)
            classes = max(c for c in result.classes if c) if any(result.classes) else 0
            config = triton_config(label, input_size=result.input_shape[1:], classes=classes, all_tasks=all_tasks,
                                   max_batch=max_batch, metadata={"peftc.spec": result.spec,
                                                                  "peftc.backbone": result.backbone,
                                                                  "peftc.tasks": ",".join(result.tasks)})
            repo_dir = write_repository(target, triton, label, config)
    out = result.to_dict()
    if onnx is None:
        out["path"] = None
    out["triton"] = str(repo_dir) if repo_dir else None
    if json_:
        print_json(out)
        return
    _render_export(out)


def _render_export(out: dict[str, Any]) -> None:
    table = Table(show_header=False, box=None, pad_edge=False)
    table.add_column(style="bold")
    table.add_column()
    if out["path"]:
        size = f"{out['bytes'] / 1e6:.1f} MB" + (f" + {out['external_data']}" if out["external_data"] else "")
        table.add_row("onnx", f"{out['path']} ({size}, opset {out['opset']})")
    if out["triton"]:
        table.add_row("triton", f"{out['triton']} (config.pbtxt + 1/model.onnx, dynamic batching)")
    table.add_row("model", f"{out['spec']} on {out['backbone']}")
    how = "chosen per sample by the task keys" if out["selects_task"] else "via the 'task' input"
    table.add_row("task", out["task"] if out["task"] else f"all tasks {how}: {', '.join(out['tasks'])}")
    shapes = {"image": out["input_shape"], "task": ["batch"]}
    table.add_row("inputs", ", ".join(f"{n} {shapes.get(n, '?')}" for n in out["input_names"]))
    fold = out["fold"]
    if fold:
        merged = ", ".join(f"{v} {k}" for k, v in fold["counts"].items()) or "nothing"
        table.add_row("folded", f"{fmt_int(fold['params_before'])} → {fmt_int(fold['params_after'])} params ({merged})")
        for path, why in list(fold["remaining"].items())[:5]:
            table.add_row("  kept", f"{path}: {why}")
    else:
        table.add_row("folded", "no")
    parity = out["parity"]
    if parity:
        providers = ", ".join(p.replace("ExecutionProvider", "") for p in parity["providers"])
        table.add_row("parity", f"max abs diff {parity['max_abs_diff']:.2e} (limit {parity['tolerance']:.1e}, "
                                f"batch {parity['batch']}, ONNX Runtime {providers})")
    for note in out.get("notes", []):
        table.add_row("note", note)
    table.add_row("time", f"{out['seconds']:.1f} s")
    console.print(table)


@app.command("run")
@handle_errors
def run_cmd(
    source: Annotated[str, typer.Argument(help="Artifact directory, or an exported .onnx file (ort backend).")],
    backend: Annotated[str, typer.Option("--backend", help="eager, compile (torch.compile) or ort.")] = "eager",
    batch: Annotated[Optional[list[int]], typer.Option("--batch", min=1, max=MAX_BATCH,
                                                         help="Batch size; repeat for several.")] = None,
    runs: Annotated[int, typer.Option("--runs", min=1, max=100_000, help="Timed runs per batch size.")] = 20,
    warmup: Annotated[int, typer.Option("--warmup", min=0, max=10_000, help="Untimed runs first.")] = 3,
    input_: Annotated[Optional[Path], typer.Option("--input", help="Classify this image (top classes).")] = None,
    top: Annotated[int, typer.Option("--top", min=1, max=1000, help="How many classes --input prints.")] = 5,
    task: TaskOpt = None,
    all_tasks: AllTasksOpt = False,
    select_task: SelectTaskOpt = False,
    no_fold: NoFoldOpt = False,
    image_size: SizeOpt = None,
    provider: ProviderOpt = "auto",
    mode: Annotated[str, typer.Option("--mode", help="torch.compile mode.")] = "default",
    threads: Annotated[Optional[int], typer.Option("--threads", min=1, max=MAX_THREADS,
                                                          help="CPU threads for eager/compile (torch).")] = None,
    plugin: PluginOpt = None,
    json_: JsonOpt = False,
) -> None:
    """Run a model under a backend: a latency table (median, p90, throughput), or classify one image."""
    import torch

    from peftc.export.bench import measure
    from peftc.export.image import load_image, top_k
    from peftc.export.runtime import open_backend

    sizes = batch or [1]
    if any(b < 1 for b in sizes) or runs < 1 or warmup < 0 or top < 1:
        raise PeftcError("--batch, --runs and --top must be >= 1 and --warmup >= 0")
    if input_ is not None and not input_.is_file():
        raise PeftcError(f"image not found: {input_}")
    load_plugins(plugin)
    if threads:
        torch.set_num_threads(threads)
    with _progress(not json_) as say:
        model = open_backend(source, backend, task=None if all_tasks else task, fold=not no_fold, all_tasks=all_tasks,
                             select_task=select_task, image_size=image_size, provider=provider, mode=mode,
                             progress=say)
        task_ids = _task_ids(model, task)
        if input_ is not None:
            image = load_image(input_, model.input_size[1:], model.backbone)
            logits = model(image, task_ids(1))
            classes = top_k(logits[0], top)
        else:
            rows = []
            gen = torch.Generator().manual_seed(0)
            for size in sizes:
                say(f"timing batch {size}")
                prepared = model.prepare(_inputs(torch.randn(size, *model.input_size, generator=gen), task_ids(size)))
                rows.append(measure(lambda p=prepared: model.run(p), batch=size, runs=runs, warmup=warmup))
    head = {"source": str(source), "backend": model.name, "detail": model.detail,
            "input_size": list(model.input_size), **{k: v for k, v in model.info.items() if k != "metadata"}}
    if input_ is not None:
        result = {**head, "image": str(input_), "top": [{"class": c, "probability": p} for c, p in classes]}
        if json_:
            print_json(result)
            return
        table = Table(title=f"{input_.name} — {model.detail}", title_justify="left", header_style="bold")
        table.add_column("rank", justify="right")
        table.add_column("class", justify="right")
        table.add_column("probability", justify="right")
        for rank, (cls, prob) in enumerate(classes, start=1):
            table.add_row(str(rank), str(cls), f"{prob:.4f}")
        console.print(table)
        return
    if json_:
        print_json({**head, "timings": [t.to_dict() for t in rows]})
        return
    which = "all tasks" if model.all_tasks else f"task {head.get('task') or '?'}"
    if head.get("selects_task"):
        which = "task chosen per sample by its key"
    title = f"{model.detail} — {which}"
    table = Table(title=title, title_justify="left", header_style="bold")
    for col in ("batch", "median ms", "p90 ms", "images/s"):
        table.add_column(col, justify="right")
    for t in rows:
        table.add_row(str(t.batch), f"{t.median_ms:.2f}", f"{t.p90_ms:.2f}", f"{t.throughput:.1f}")
    console.print(table)
    console.print(f"[dim]{runs} timed runs after {warmup} warm-up; input {list(model.input_size)}[/]")


def _inputs(x: Any, task: Any) -> Any:
    return x if task is None else (x, task)


def _task_ids(model: Any, task: str | None) -> Callable[[int], Any]:
    """Task ids for an all-tasks model: the named task for every sample (default: the first task)."""
    import torch

    if not model.all_tasks:
        exported = model.info.get("metadata", {}).get("peftc.task")
        if task is not None and exported and task != exported:
            raise PeftcError(f"this ONNX file serves task {exported!r}, not {task!r}")
        return lambda _n: None
    names = model.info.get("tasks") or model.info.get("metadata", {}).get("peftc.tasks", "").split(",")
    index = 0
    if task is not None:
        if task not in names:
            raise PeftcError(f"unknown task {task!r}; this model serves: {', '.join(names)}")
        index = names.index(task)
    return lambda n: torch.full((n,), index, dtype=torch.int64)
