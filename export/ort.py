"""ONNX Runtime: choose a provider that really works, quietly, and run sessions.

``onnxruntime-gpu`` lists ``CUDAExecutionProvider`` as *available* even on a machine without a GPU or driver;
asking for it there prints a red provider-load error and silently falls back. peftc instead decides up front:

1. The CUDA provider is considered only when ONNX Runtime was built with it and PyTorch sees a CUDA device
   (which needs a driver).
2. The CUDA and cuDNN libraries that ship inside the ``nvidia-*`` wheels PyTorch depends on are preloaded
   (``onnxruntime.preload_dlls``, or by path when that helper is missing) so ONNX Runtime finds them without
   ``LD_LIBRARY_PATH``.
3. A one-node probe session is created with the CUDA provider, its logging silenced and stderr muted; the
   provider counts as usable only if the session really uses it and runs.

Otherwise the CPU provider is used, and nothing is printed. ``provider=`` (``--provider``) overrides: ``cpu``,
``cuda``, or any full provider name; asking for ``cuda`` where it cannot run is a clear error.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import glob
import os
import sys
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from peftc.export.errors import BackendUnavailable, ExportError

__all__ = ["OrtRunner", "cuda_status", "resolve_providers", "session"]

CPU = "CPUExecutionProvider"
CUDA = "CUDAExecutionProvider"
_ALIASES = {"cpu": CPU, "cuda": CUDA, "gpu": CUDA, "tensorrt": "TensorrtExecutionProvider"}


@contextlib.contextmanager
def quiet_stderr() -> Iterator[None]:
    """Mute file descriptor 2 (native libraries write there directly, past ``sys.stderr``)."""
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError):
        yield
        return
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


def _ort() -> Any:
    try:
        import onnxruntime
    except ImportError as exc:  # a dependency, but say what to install if it is missing
        raise BackendUnavailable(f"onnxruntime is not installed ({exc}); pip install onnxruntime") from None
    return onnxruntime


def _preload_cuda_libraries(ort: Any) -> None:
    """Load CUDA/cuDNN from the nvidia-* wheels (PyTorch's) so the CUDA provider can find them."""
    with quiet_stderr():
        if hasattr(ort, "preload_dlls"):
            with contextlib.suppress(Exception):
                ort.preload_dlls(cuda=True, cudnn=True, msvc=False)
                return
        for pattern in _NVIDIA_LIBS:
            for base in sys.path:
                for lib in sorted(glob.glob(os.path.join(base, "nvidia", pattern))):
                    with contextlib.suppress(OSError):
                        ctypes.CDLL(lib, mode=ctypes.RTLD_GLOBAL)


_NVIDIA_LIBS = ("cuda_runtime/lib/libcudart.so*", "cublas/lib/libcublasLt.so*", "cublas/lib/libcublas.so*",
                "cufft/lib/libcufft.so*", "curand/lib/libcurand.so*", "cudnn/lib/libcudnn.so*")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _probe_model() -> bytes:
    from onnx import TensorProto, helper

    node = helper.make_node("Add", ["x", "x"], ["y"])
    graph = helper.make_graph([node], "probe", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model.SerializeToString()


@functools.lru_cache(maxsize=1)
def cuda_status() -> tuple[bool, str]:
    """(usable, reason): whether ONNX Runtime's CUDA provider really works here. Cached; prints nothing."""
    ort = _ort()
    if CUDA not in ort.get_available_providers():
        return False, "this onnxruntime build has no CUDA provider (install onnxruntime-gpu)"
    try:
        import torch

        if not torch.cuda.is_available():
            return False, "no CUDA device or driver is visible"
    except ImportError:
        pass
    _preload_cuda_libraries(ort)
    options = ort.SessionOptions()
    options.log_severity_level = 4
    try:
        with quiet_stderr():
            probe = ort.InferenceSession(_probe_model(), sess_options=options, providers=[CUDA, CPU])
            if CUDA not in probe.get_providers():
                return False, "the CUDA provider failed to load (CUDA/cuDNN libraries missing or mismatched)"
            probe.run(None, {"x": np.ones(2, dtype=np.float32)})
    except Exception as exc:
        return False, f"the CUDA provider does not run: {_first_line(exc)}"
    return True, "CUDA provider loaded and ran a probe"


def resolve_providers(provider: str | None = "auto") -> list[str]:
    """Providers for a session: ``auto`` = CUDA when usable, else CPU; or the one asked for (then CPU)."""
    ort = _ort()
    choice = (provider or "auto").strip()
    if choice.lower() == "auto":
        return [CUDA, CPU] if cuda_status()[0] else [CPU]
    name = _ALIASES.get(choice.lower(), choice)
    available = ort.get_available_providers()
    if name not in available:
        raise BackendUnavailable(
            f"ONNX Runtime provider {choice!r} is not available here; available: {', '.join(available)}"
        )
    if name == CUDA:
        usable, why = cuda_status()
        if not usable:
            raise BackendUnavailable(f"--provider cuda cannot run: {why}")
    return [name] if name == CPU else [name, CPU]


def session(model: str | Path | bytes, provider: str | None = "auto", *, threads: int | None = None) -> Any:
    """An ``InferenceSession`` on the chosen provider(s); load errors become :class:`ExportError`."""
    ort = _ort()
    providers = resolve_providers(provider)
    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if threads:
        options.intra_op_num_threads = threads
    source = model if isinstance(model, bytes) else str(model)
    try:
        with quiet_stderr() if providers[0] != CPU else contextlib.nullcontext():
            return ort.InferenceSession(source, sess_options=options, providers=providers)
    except Exception as exc:
        where = "the model" if isinstance(model, bytes) else str(model)
        raise ExportError(f"ONNX Runtime cannot load {where}: {_first_line(exc)}") from None


@dataclass
class OrtRunner:
    """Runs an ONNX file with ONNX Runtime; inputs and outputs are numpy arrays (torch tensors accepted)."""

    path: str
    provider: str | None = "auto"
    threads: int | None = None

    def __post_init__(self) -> None:
        self.session = session(self.path, self.provider, threads=self.threads)
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.output_names = [o.name for o in self.session.get_outputs()]

    @property
    def providers(self) -> list[str]:
        return list(self.session.get_providers())

    def feed(self, *inputs: Any) -> dict[str, np.ndarray]:
        """Name the inputs in graph order (torch tensors become numpy arrays)."""
        if len(inputs) != len(self.input_names):
            names = ", ".join(self.input_names)
            raise ExportError(f"{self.path} takes inputs ({names}), got {len(inputs)} input(s)")
        return {name: _numpy(x) for name, x in zip(self.input_names, inputs, strict=True)}

    def run_feed(self, feed: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        return self.session.run(self.output_names, dict(feed))

    def __call__(self, *inputs: Any) -> np.ndarray:
        return self.run_feed(self.feed(*inputs))[0]


def _numpy(x: Any) -> np.ndarray:
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    return np.ascontiguousarray(x)


def describe_providers(names: Sequence[str]) -> str:
    return " > ".join(n.replace("ExecutionProvider", "") for n in names)
