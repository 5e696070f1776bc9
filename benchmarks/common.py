"""Shared benchmark plumbing: timing with medians, machine facts, and the JSON result files."""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"


def timings(fn: Callable[[], Any], runs: int, warmup: int = 1) -> list[float]:
    """Wall-clock seconds of ``runs`` calls after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        out.append(time.perf_counter() - start)
    return out


def summary(samples: list[float]) -> dict[str, float]:
    ordered = sorted(samples)
    return {
        "median": statistics.median(ordered),
        "min": ordered[0],
        "max": ordered[-1],
        "p90": ordered[min(len(ordered) - 1, round(0.9 * (len(ordered) - 1)))],
        "runs": len(ordered),
    }


def machine() -> dict[str, Any]:
    import torch

    info: dict[str, Any] = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }
    try:
        import timm
        import torchvision

        info.update(timm=timm.__version__, torchvision=torchvision.__version__)
    except ImportError:
        pass
    return info


def write_result(name: str, payload: dict[str, Any]) -> Path:
    """Write ``benchmarks/results/<name>.json`` (atomically) with the machine facts added."""
    from peftc.storage.atomic import write_file

    stamp = datetime.now(timezone.utc).isoformat(timespec="seconds")
    return write_file(RESULTS / f"{name}.json",
                      json.dumps({"machine": machine(), "measured_at": stamp, **payload}, indent=2) + "\n")


def verdict(value: float, target: float, lower_is_better: bool = True) -> str:
    ok = value <= target if lower_is_better else value >= target
    return "PASS" if ok else "MISS"


def check(cid: str, name: str, value: float, target: float, unit: str = "", lower_is_better: bool = True,
          suite: str = "") -> dict[str, Any]:
    """One target as a JSON record (``checks`` list of a result file): what ``python -m benchmarks`` collects
    into docs/benchmarks.md as PASS/MISS. ``unit`` is ``"s"``, ``"x"`` (a ratio), ``"bytes"``."""
    return {"id": cid, "name": name, "value": value, "target": target, "unit": unit,
            "lower_is_better": lower_is_better, "verdict": verdict(value, target, lower_is_better),
            **({"suite": suite} if suite else {})}
