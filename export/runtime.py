"""Backends behind ``peftc run``: the same model under eager PyTorch, torch.compile or ONNX Runtime.

:func:`open_backend` takes an artifact directory (or a compiled model, or an exported ``.onnx`` file) and returns
a :class:`Backend`: a callable on a torch image batch plus a description of what runs. Each backend runs the
deployable model of :mod:`peftc.export.source` (folded unless ``fold=False``); ``ort`` exports it to a temporary
ONNX file first (verified like ``peftc export``), and an ``.onnx`` file given directly runs as it is.

A model with a second input (a ``stream`` rule: ``memory``) gets all-zero values for it — in MemVP's terms, no
image — at its most tokens (one when unbounded), so a latency table costs what a full second input costs;
``info["streams"]`` says so.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from peftc.export.errors import ExportError

__all__ = ["BACKENDS", "Backend", "open_backend"]

BACKENDS = ("eager", "compile", "ort")


@dataclass
class Backend:
    """A runnable model: ``prepare(x)`` converts a torch batch once, ``run(prepared)`` is what gets timed."""

    name: str
    detail: str
    input_size: tuple[int, int, int]
    backbone: str
    all_tasks: bool
    prepare: Callable[[torch.Tensor], Any]
    run: Callable[[Any], Any]
    info: dict[str, Any] = field(default_factory=dict)

    def __call__(self, x: torch.Tensor, task: torch.Tensor | None = None) -> np.ndarray:
        if self.all_tasks and task is None:
            raise ExportError("this model serves all tasks: give a task id per sample")
        out = self.run(self.prepare(x) if task is None else self.prepare((x, task)))
        return out.detach().cpu().numpy() if isinstance(out, torch.Tensor) else np.asarray(out)


def _onnx_backend(path: Path, provider: str | None) -> Backend:
    import onnx

    from peftc.export.ort import OrtRunner, describe_providers

    runner = OrtRunner(str(path), provider)
    try:
        meta = {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}
    except Exception as exc:
        raise ExportError(f"cannot read {path}: {exc}") from None
    shape = runner.session.get_inputs()[0].shape
    dims = [d if isinstance(d, int) else None for d in shape[1:]]
    if meta.get("peftc.input_size"):
        size = tuple(int(v) for v in meta["peftc.input_size"].split("x"))
    elif len(dims) == 3 and all(dims):
        size = tuple(dims)
    else:
        raise ExportError(f"{path}: cannot tell the input size (dynamic spatial dims and no peftc metadata)")
    all_tasks = "task" in runner.input_names
    streams = {i.name: [d if isinstance(d, int) else None for d in i.shape[1:]]
               for i in runner.session.get_inputs()[1:] if i.name != "task"}

    def prepare(x: Any) -> dict[str, np.ndarray]:
        image, *task = x if isinstance(x, tuple) else (x,)
        feed = {runner.input_names[0]: np.ascontiguousarray(image.detach().cpu().numpy())}
        feed.update({name: np.zeros((len(image), *(d or 1 for d in dims)), np.float32)
                     for name, dims in streams.items()})
        if task:
            feed["task"] = np.ascontiguousarray(task[0].detach().cpu().numpy())
        return feed

    return Backend("ort", f"ONNX Runtime ({describe_providers(runner.providers)})", size,  # type: ignore[arg-type]
                   meta.get("peftc.backbone", ""), all_tasks, prepare, lambda feed: runner.run_feed(feed)[0],
                   {"file": str(path), "providers": runner.providers, "metadata": meta, "streams": _zeros_note(streams),
                    "task": meta.get("peftc.task") or None, "selects_task": meta.get("peftc.selects_task") == "true",
                    "tasks": [t for t in meta.get("peftc.tasks", "").split(",") if t]})


def _zeros_note(streams: dict[str, list[Any]]) -> dict[str, str]:
    return {name: f"zeros (batch, {', '.join(str(d or 1) for d in dims)}): no second input given"
            for name, dims in streams.items()}


def open_backend(
    source: Any,
    backend: str = "eager",
    *,
    task: str | None = None,
    fold: bool = True,
    all_tasks: bool = False,
    select_task: bool = False,
    image_size: tuple[int, int] | None = None,
    provider: str | None = "auto",
    mode: str = "default",
    progress: Callable[[str], None] | None = None,
) -> Backend:
    """Open ``source`` (artifact dir, compiled model, or ``.onnx`` file) under ``backend``."""
    say = progress or (lambda _msg: None)
    if backend not in BACKENDS:
        raise ExportError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    if isinstance(source, (str, Path)) and Path(source).suffix == ".onnx":
        if backend != "ort":
            raise ExportError(f"{source} is an ONNX file: it runs with --backend ort")
        if not Path(source).is_file():
            raise ExportError(f"ONNX file not found: {source}")
        say("loading the ONNX file")
        return _onnx_backend(Path(source), provider)
    from peftc.export.source import prepare, resolve_model

    say("loading the model")
    model = resolve_model(source)
    say("folding" if fold and not all_tasks else "preparing the graph")
    deployable = prepare(model, task=task, fold_weights=fold and not all_tasks, all_tasks=all_tasks,
                         select_task=select_task, image_size=image_size)
    info: dict[str, Any] = {"task": deployable.task, "tasks": deployable.tasks, "folded": deployable.fold is not None,
                            "selects_task": deployable.selects_task}
    if deployable.fold is not None:
        info["params"] = deployable.fold.params_after
    else:
        info["params"] = sum(p.numel() for p in deployable.module.parameters())
    module = deployable.module.eval()
    shapes = {s.name: [s.max_tokens or 1, s.features] for s in deployable.streams}
    info["streams"] = _zeros_note(shapes)

    def as_args(x: Any) -> tuple[torch.Tensor, ...]:
        image, *rest = x if isinstance(x, tuple) else (x,)
        return (image, *(torch.zeros(len(image), *dims) for dims in shapes.values()), *rest)

    if backend == "eager":
        def run_eager(args: tuple[torch.Tensor, ...]) -> torch.Tensor:
            with torch.no_grad():
                return module(*args)

        return Backend("eager", "PyTorch eager", deployable.input_size, deployable.backbone, deployable.all_tasks,
                       as_args, run_eager, info)
    if backend == "compile":
        from peftc.export.compile import compile_module

        say(f"compiling (torch.compile, mode={mode})")
        runner = compile_module(module, deployable.example(2), mode=mode)
        info.update(fullgraph=runner.fullgraph, compile_seconds=round(runner.compile_seconds, 2))
        detail = f"torch.compile (inductor, {mode}, {'full graph' if runner.fullgraph else 'with graph breaks'})"
        return Backend("compile", detail, deployable.input_size, deployable.backbone, deployable.all_tasks,
                       as_args, lambda args: runner(*args), info)
    from peftc.export.onnx import write_onnx

    with tempfile.TemporaryDirectory(prefix="peftc-ort-") as tmp:
        path = Path(tmp) / "model.onnx"
        write_onnx(deployable, path, provider=provider, progress=say)
        out = _onnx_backend(path, provider)  # the session holds the model in memory; the file can go
    out.info.update(info)
    out.info.pop("file", None)
    return out
