"""ONNX export, checked twice before it is kept: ``onnx.checker`` (full) and ONNX Runtime parity.

:func:`export_onnx` prepares the model (one task, folded by default; or every task behind a ``task`` input),
exports it with the dynamo exporter (``torch.onnx.export(..., dynamo=True)``; the TorchScript exporter is
deprecated and fails on fx-traced timm models) from a batch of 2 with the batch dimension declared dynamic
(exporting from batch 1 lets some ViTs bake a batch of 1 into reshapes), and writes one self-contained file —
weights go to an external ``.data`` file only when the model is too large for one protobuf (2 GB).

The file is written into a hidden staging directory next to the target, checked there — ``onnx.checker`` with
``full_check`` and a run under ONNX Runtime on a random batch of a *different* size (3) compared with the
eager, unfolded model — and only then renamed into place. A failure at any step leaves no partial file behind
and the previous file, if any, untouched.
"""

from __future__ import annotations

import os
import re
import shutil
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from peftc.export.errors import ExportError, ParityError
from peftc.export.onnx_ops import custom_translations
from peftc.export.source import Deployable, prepare, resolve_model
from peftc.storage.atomic import staging_dir

__all__ = ["ExportResult", "Parity", "check_parity", "export_onnx", "write_onnx"]

PROTOBUF_LIMIT = 2 * 1024**3
EXPORT_BATCH = 2
CHECK_BATCH = 3
TOLERANCE = 1e-4


@dataclass
class Parity:
    """ONNX Runtime output vs the eager model on one random batch."""

    batch: int
    max_abs_diff: float
    output_scale: float
    tolerance: float
    providers: list[str]

    @property
    def ok(self) -> bool:
        return self.max_abs_diff <= self.tolerance


@dataclass
class ExportResult:
    """Where the ONNX file went and what was checked."""

    path: str
    bytes: int
    external_data: str | None
    opset: int | None
    spec: str
    backbone: str
    task: str | None  # None: every task, chosen per sample (by the ``task`` input, or by the graph: ``selects_task``)
    tasks: list[str]
    classes: list[int | None]
    input_names: list[str]
    input_shape: list[Any]
    folded: bool
    fold: dict[str, Any] | None
    selects_task: bool
    parity: Parity | None
    seconds: float
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def export_onnx(
    model_or_dir: Any,
    path: str | os.PathLike[str],
    *,
    task: str | None = None,
    fold: bool = True,
    all_tasks: bool = False,
    select_task: bool = False,
    opset: int | None = None,
    image_size: tuple[int, int] | None = None,
    provider: str | None = "auto",
    check: bool = True,
    progress: Callable[[str], None] | None = None,
) -> ExportResult:
    """Export a compiled model (or an artifact directory) to ``path`` and verify it with ONNX Runtime.

    ``task`` picks the task (default: the active one); ``all_tasks=True`` exports one graph with a ``task``
    input (int64, one id per sample, in the order of ``result.tasks``); ``select_task=True`` (LN tuning with
    keys) exports one graph that picks each sample's task by its key, image in. ``fold=False`` keeps peftc's blocks
    as they are. Raises :class:`ParityError` when ONNX Runtime disagrees with eager by more than 1e-4 at unit
    output scale.
    """
    say = progress or (lambda _msg: None)
    start = time.perf_counter()
    target = _target(path)
    shutil.rmtree(_staging_dir(target))  # fail on an unwritable path now, not after minutes of work
    say("loading the model")
    model = resolve_model(model_or_dir)
    say("folding" if fold and not all_tasks else "preparing the graph")
    deployable = prepare(model, task=task, fold_weights=fold and not all_tasks, all_tasks=all_tasks,
                         select_task=select_task, image_size=image_size)
    try:
        result = write_onnx(deployable, target, opset=opset, provider=provider, check=check, progress=say)
    except ExportError as exc:
        if getattr(model, "regions", ()) and not isinstance(exc, ParityError):
            exc.message += _region_note(model)
        raise
    result.seconds = round(time.perf_counter() - start, 3)
    if all_tasks and fold:
        result.notes.append("all-tasks graphs are not folded: folding would copy shared frozen weights per task")
    return result


def _region_note(model: Any) -> str:
    """Why a region-mode model may not export: the exporter captures the whole forward, glue included."""
    from peftc.analysis.trace import trace_info

    why = trace_info(model.graph).why_not_plain
    return (f"; {type(model.net).__name__} is compiled per region ({', '.join(model.regions)}) and its own forward "
            f"runs eagerly between them, which the exporter must capture whole and could not. It was not traced "
            f"because: {why}")


def _target(path: str | os.PathLike[str]) -> Path:
    target = Path(path)
    if target.is_dir():
        raise ExportError(f"{target} is a directory; give a file name such as {target / 'model.onnx'}")
    if target.suffix != ".onnx":
        raise ExportError(f"{target}: ONNX files must end in .onnx")
    return target


def write_onnx(
    deployable: Deployable,
    target: Path,
    *,
    opset: int | None = None,
    provider: str | None = "auto",
    check: bool = True,
    progress: Callable[[str], None] | None = None,
) -> ExportResult:
    """Export ``deployable`` to ``target`` via a staging directory; checked there, then renamed into place."""
    say = progress or (lambda _msg: None)
    staging = _staging_dir(target)
    try:
        staged = staging / target.name
        say("exporting (torch.onnx, dynamo)")
        program = _export(deployable, opset)
        _annotate(program, deployable)
        external = _model_bytes(deployable.module) > PROTOBUF_LIMIT * 0.9
        say("writing")
        try:
            program.save(str(staged), external_data=external)
        except OSError as exc:
            raise ExportError(f"cannot write {target}: {exc.strerror or exc}") from None
        say("checking (onnx.checker, full)")
        _checker(staged)
        parity = None
        if check:
            say("checking parity with ONNX Runtime")
            parity = check_parity(staged, deployable, provider=provider)
        data = staged.with_name(staged.name + ".data")
        data_name = data.name if data.exists() else None
        size = staged.stat().st_size + (data.stat().st_size if data_name else 0)
        for produced in [p for p in staging.iterdir() if p != staged] + [staged]:  # the model file last
            os.replace(produced, target.parent / produced.name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    names = deployable.input_names
    written = _opset_of(target)
    notes = [f"opset {opset} was asked for; the exporter wrote opset {written}"] if opset and opset != written else []
    return ExportResult(
        path=str(target), bytes=size, external_data=data_name, opset=written, notes=notes,
        spec=deployable.spec, backbone=deployable.backbone, task=deployable.task, tasks=deployable.tasks,
        classes=deployable.classes, input_names=names, input_shape=["batch", *deployable.input_size],
        folded=deployable.fold is not None, fold=deployable.fold.to_dict() if deployable.fold else None,
        selects_task=deployable.selects_task, parity=parity, seconds=0.0,
    )


def _staging_dir(target: Path) -> Path:
    try:
        return staging_dir(target)
    except OSError as exc:
        raise ExportError(f"cannot write {target}: {exc.strerror or exc}") from None


def _export(deployable: Deployable, opset: int | None) -> Any:
    example = deployable.example(EXPORT_BATCH)
    batch = torch.export.Dim("batch", min=1, max=1 << 16)
    names = deployable.input_names
    dynamic: tuple[Any, ...] = tuple({0: batch} for _ in example)
    if deployable.streams:  # NamedInputs(image, *streams); a second input's token count is dynamic too
        dynamic = ({0: batch}, tuple({0: batch, 1: torch.export.Dim(f"{s.name}_tokens", min=1,
                                                                     max=s.max_tokens or 1 << 16)}
                                     for s in deployable.streams))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return torch.onnx.export(
                deployable.module.eval(), example, dynamo=True, dynamic_shapes=dynamic, input_names=names,
                output_names=["logits"], opset_version=opset, verbose=False,
                custom_translation_table=custom_translations(),
            )
    except Exception as exc:
        raise ExportError(
            f"torch.onnx.export failed for {deployable.spec} on {deployable.backbone}: {_cause(exc)}"
        ) from None


def _cause(exc: BaseException) -> str:
    """The informative line of an exporter error (its 'Exception summary', not the generic preamble)."""
    lines = [re.sub(r"\x1b\[[0-9;]*m", "", line).strip() for line in str(exc).splitlines()]
    lines = [line for line in lines if line]
    summary = [line for line in lines if line.startswith("<class ")]
    if summary:
        return summary[0]
    return lines[0] if lines else type(exc).__name__


def _annotate(program: Any, deployable: Deployable) -> None:
    """Metadata a server can read back: spec, backbone, task(s), classes, input size."""
    from peftc.version import __version__

    props = {
        "peftc.version": __version__,
        "peftc.spec": deployable.spec,
        "peftc.backbone": deployable.backbone,
        "peftc.task": deployable.task or "",
        "peftc.tasks": ",".join(deployable.tasks),
        "peftc.classes": ",".join(str(c) for c in deployable.classes),
        "peftc.input_size": "x".join(str(v) for v in deployable.input_size),
        "peftc.folded": str(deployable.fold is not None).lower(),
        "peftc.selects_task": str(deployable.selects_task).lower(),
    }
    model = getattr(program, "model", None)
    if model is not None and hasattr(model, "metadata_props"):
        model.metadata_props.update(props)


def _model_bytes(module: torch.nn.Module) -> int:
    tensors = {id(t): t for t in (*module.parameters(), *module.buffers())}
    return sum(t.numel() * t.element_size() for t in tensors.values())


def _checker(path: Path) -> None:
    import onnx

    try:
        onnx.checker.check_model(str(path), full_check=True)
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ExportError(f"the exported graph fails onnx.checker: {first}") from None


def _opset_of(path: Path) -> int | None:
    import onnx

    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception:
        return None
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)


def check_parity(path: str | Path, deployable: Deployable, *, provider: str | None = "auto",
                 batch: int = CHECK_BATCH, tolerance: float = TOLERANCE) -> Parity:
    """Run ``path`` under ONNX Runtime on a random batch and compare with the eager reference."""
    from peftc.export.ort import OrtRunner

    inputs = deployable.example(batch, seed=1)
    runner = OrtRunner(str(path), provider)
    got = runner(*inputs)
    want = deployable.reference(*inputs).detach().cpu().numpy()
    if got.shape != want.shape:
        raise ParityError(f"ONNX Runtime returned shape {got.shape} for a batch of {batch}, eager {want.shape}: "
                          "the batch dimension is not dynamic")
    finite = np.isfinite(want)
    if not np.array_equal(finite, np.isfinite(got)):
        raise ParityError("ONNX Runtime and eager disagree on which outputs are finite")
    scale = float(np.abs(want[finite]).max()) if finite.any() else 0.0
    diff = float(np.abs(got[finite] - want[finite]).max()) if finite.any() else 0.0
    parity = Parity(batch, diff, scale, tolerance * max(1.0, scale), runner.providers)
    if not parity.ok:
        raise ParityError(
            f"ONNX Runtime output differs from eager by {diff:.3g} (max abs, batch {batch}) at output scale "
            f"{scale:.3g}; the limit is {parity.tolerance:.3g}"
        )
    return parity
