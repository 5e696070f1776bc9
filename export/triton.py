"""A Triton Inference Server model repository: ``REPO/<name>/config.pbtxt`` + ``REPO/<name>/1/model.onnx``.

Triton serves ONNX files with its ONNX Runtime backend and batches concurrent requests itself
(``dynamic_batching``), which is how one exported model scales past one process or machine. The config
declares shapes *without* the batch dimension (``max_batch_size`` > 0 means the first dimension is the batch,
which is why the export keeps it dynamic). An all-tasks graph gets a second input, ``task`` (one int64 per
sample, reshaped from ``[1]`` to a scalar). The model directory is staged and swapped in whole, so an existing
repository never holds half a model; other models in the repository are left alone.
"""

from __future__ import annotations

import re
import shutil
from collections.abc import Sequence
from pathlib import Path

from peftc.export.errors import ExportError
from peftc.storage.atomic import replace_directory, staging_dir

__all__ = ["check_name", "model_name", "triton_config", "write_repository"]

_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}")


def check_name(name: str) -> str:
    """``name`` if it is a Triton model name that stays one folder inside the repository and needs no quoting."""
    if not _NAME.fullmatch(name) or ".." in name:
        raise ExportError(f"--name {name!r}: a Triton model name is letters, digits, '_', '-' and '.' (not "
                          "leading, no '..'), at most 128 characters, so it stays one folder in the repository")
    return name


def model_name(spec: str, backbone: str, task: str | None) -> str:
    """A Triton-safe model name from the spec, backbone and task (``clr_resnet50_birds``)."""
    raw = "_".join(x for x in (spec, backbone.replace("timm:", ""), task or "all_tasks") if x)
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", raw).strip("_.-") or "model"


def _dims(values: Sequence[int]) -> str:
    return "[ " + ", ".join(str(int(v)) for v in values) + " ]"


def triton_config(name: str, *, input_size: Sequence[int], classes: int, all_tasks: bool, max_batch: int = 32,
                  preferred: Sequence[int] = (4, 8, 16), queue_delay_us: int = 100,
                  metadata: dict[str, str] | None = None) -> str:
    """The ``config.pbtxt`` text for an exported peftc model."""
    check_name(name)
    if max_batch < 1:
        raise ExportError(f"max batch size must be >= 1, got {max_batch}")
    preferred = [b for b in preferred if b <= max_batch] or [max_batch]
    inputs = [f'  {{\n    name: "image"\n    data_type: TYPE_FP32\n    dims: {_dims(input_size)}\n  }}']
    if all_tasks:
        inputs.append('  {\n    name: "task"\n    data_type: TYPE_INT64\n    dims: [ 1 ]\n'
                      '    reshape: { shape: [ ] }\n  }')
    lines = [
        f'name: "{name}"',
        'backend: "onnxruntime"',
        f"max_batch_size: {max_batch}",
        "input [\n" + ",\n".join(inputs) + "\n]",
        f'output [\n  {{\n    name: "logits"\n    data_type: TYPE_FP32\n    dims: {_dims([classes])}\n  }}\n]',
        f"dynamic_batching {{\n  preferred_batch_size: {_dims(preferred)}\n"
        f"  max_queue_delay_microseconds: {queue_delay_us}\n}}",
        "instance_group [\n  {\n    kind: KIND_AUTO\n    count: 1\n  }\n]",
    ]
    for key, value in (metadata or {}).items():
        safe = str(value).replace("\\", "\\\\").replace('"', '\\"')
        lines.append(f'parameters {{\n  key: "{key}"\n  value: {{ string_value: "{safe}" }}\n}}')
    return "\n".join(lines) + "\n"


def write_repository(onnx_file: str | Path, repo: str | Path, name: str, config: str) -> Path:
    """Put ``onnx_file`` and ``config`` into ``repo/name`` atomically; returns the model directory."""
    repo = Path(repo)
    if repo.exists() and not repo.is_dir():
        raise ExportError(f"{repo} exists and is not a directory")
    final = repo / check_name(name)
    try:
        staging = staging_dir(final)
    except OSError as exc:
        raise ExportError(f"cannot write the Triton repository {repo}: {exc.strerror or exc}") from None
    try:
        (staging / "1").mkdir()
        shutil.copyfile(onnx_file, staging / "1" / "model.onnx")
        data = Path(str(onnx_file) + ".data")
        if data.exists():
            shutil.copyfile(data, staging / "1" / (Path(onnx_file).name + ".data"))
        (staging / "config.pbtxt").write_text(config, encoding="utf-8")
        replace_directory(staging, final)
    except OSError as exc:
        shutil.rmtree(staging, ignore_errors=True)
        raise ExportError(f"cannot write the Triton repository {repo}: {exc.strerror or exc}") from None
    return final
