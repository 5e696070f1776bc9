"""The torch.compile backend: inductor, the whole graph when possible, a dynamic batch dimension.

``torch.compile`` is lazy: a missing C++ compiler (CPU) or Triton (GPU) only shows on the first call, as a
long internal traceback. :func:`compile_module` checks the toolchain first, then compiles with one warm-up
call and turns any failure into one :class:`BackendUnavailable` message that says what to install or which
backend to use instead. The batch dimension is marked dynamic, so one compiled graph serves every batch size
instead of one recompile per size.

Compiling costs seconds to tens of seconds once per process; the compiled callable is then reused.
"""

from __future__ import annotations

import contextlib
import logging
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from peftc.export.errors import BackendUnavailable

__all__ = ["CompiledRunner", "compile_module", "inductor_problem"]

MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


def inductor_problem(device: str | torch.device = "cpu") -> str | None:
    """Why inductor cannot compile for ``device`` here (``None`` when it can)."""
    if torch.device(device).type == "cuda":
        try:
            from torch.utils._triton import has_triton
        except ImportError:
            return "this PyTorch has no Triton support for CUDA kernels"
        return None if has_triton() else "Triton is missing or does not support this GPU (pip install triton)"
    try:
        from torch._inductor.cpp_builder import get_cpp_compiler

        get_cpp_compiler()
    except Exception as exc:
        return f"no working C++ compiler for inductor's CPU kernels ({_first_line(exc)}); install g++"
    return None


@dataclass
class CompiledRunner:
    """A compiled module: call it like the module. ``fullgraph`` says whether the whole graph compiled."""

    fn: Callable[..., Any]
    mode: str
    fullgraph: bool
    compile_seconds: float

    def __call__(self, x: torch.Tensor, *rest: torch.Tensor) -> Any:
        _mark_batch(x, *rest)
        with torch.no_grad():
            return self.fn(x, *rest)


def _mark_batch(*tensors: torch.Tensor) -> None:
    for t in tensors:
        if isinstance(t, torch.Tensor) and t.dim() > 0:
            torch._dynamo.maybe_mark_dynamic(t, 0)


@contextlib.contextmanager
def _quiet_loggers() -> Iterator[None]:
    """Silence toolchain chatter (e.g. 'No CUDA runtime is found') during the compile."""
    loggers = [logging.getLogger(name) for name in ("torch.utils.cpp_extension", "torch._inductor")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def compile_module(
    module: nn.Module,
    example: torch.Tensor | tuple[torch.Tensor, ...],
    *,
    mode: str = "default",
    fullgraph: bool = True,
) -> CompiledRunner:
    """Compile ``module`` with inductor and run it once on ``example`` (the compile happens then).

    With ``fullgraph=True`` a graph break is retried once without it (the runner says which one ran).
    """
    if mode not in MODES:
        raise BackendUnavailable(f"unknown torch.compile mode {mode!r}; choose one of {', '.join(MODES)}")
    inputs = example if isinstance(example, tuple) else (example,)
    device = inputs[0].device
    problem = inductor_problem(device)
    if problem is not None:
        raise BackendUnavailable(f"torch.compile (inductor) cannot run here: {problem}; use eager or ort")
    module.eval()
    attempts = (True, False) if fullgraph else (False,)
    for whole in attempts:
        fn = torch.compile(module, mode=mode, fullgraph=whole, dynamic=None)
        runner = CompiledRunner(fn, mode, whole, 0.0)
        start = time.perf_counter()
        try:
            with warnings.catch_warnings(), _quiet_loggers():
                warnings.simplefilter("ignore")
                runner(*inputs)
        except torch._dynamo.exc.Unsupported as exc:
            if whole and len(attempts) > 1:
                continue  # graph break: compile the pieces instead
            raise BackendUnavailable(f"torch.compile cannot capture this model: {_first_line(exc)}") from None
        except Exception as exc:
            raise BackendUnavailable(
                f"torch.compile (inductor) failed: {type(exc).__name__}: {_first_line(exc)}; "
                "use the eager or ort backend"
            ) from None
        runner.compile_seconds = time.perf_counter() - start
        return runner
    raise AssertionError("unreachable")  # pragma: no cover
