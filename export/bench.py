"""Latency measurement shared by ``peftc run`` and ``benchmarks/deploy.py``: median, p90, throughput."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Hashable, Mapping
from dataclasses import asdict, dataclass
from typing import Any, TypeVar

__all__ = ["Timing", "interleaved_seconds", "measure", "measure_interleaved"]

K = TypeVar("K", bound=Hashable)


@dataclass(frozen=True)
class Timing:
    """Wall-clock latency of one call over ``runs`` timed calls (after ``warmup`` untimed ones)."""

    batch: int
    runs: int
    median_ms: float
    p90_ms: float
    mean_ms: float
    min_ms: float

    @property
    def throughput(self) -> float:
        """Images per second at the median latency."""
        return 1000.0 * self.batch / self.median_ms if self.median_ms > 0 else float("inf")

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["throughput"] = round(self.throughput, 2)
        return out


def _percentile(sorted_values: list[float], q: float) -> float:
    """Linear-interpolated percentile of an already sorted list."""
    if len(sorted_values) == 1:
        return sorted_values[0]
    pos = (len(sorted_values) - 1) * q
    low = int(pos)
    high = min(low + 1, len(sorted_values) - 1)
    return sorted_values[low] + (sorted_values[high] - sorted_values[low]) * (pos - low)


def measure(call: Callable[[], Any], *, batch: int, runs: int = 20, warmup: int = 3,
            sync: Callable[[], None] | None = None) -> Timing:
    """Time ``call()`` ``runs`` times after ``warmup`` calls; ``sync`` (e.g. CUDA synchronize) runs after each."""
    if runs < 1:
        raise ValueError("runs must be >= 1")
    for _ in range(max(0, warmup)):
        call()
    if sync:
        sync()
    times: list[float] = []
    for _ in range(runs):
        start = time.perf_counter()
        call()
        if sync:
            sync()
        times.append((time.perf_counter() - start) * 1000.0)
    ordered = sorted(times)
    return Timing(batch=batch, runs=runs, median_ms=statistics.median(ordered), p90_ms=_percentile(ordered, 0.9),
                  mean_ms=statistics.fmean(ordered), min_ms=ordered[0])


def interleaved_seconds(calls: Mapping[K, Callable[[], Any]], *, runs: int, warmup: int = 1) -> dict[K, list[float]]:
    """Seconds per call of each callable, timed round-robin (one call of each per round) after ``warmup``
    rounds, so drifting machine load — other processes, thermal state — hits every candidate alike and their
    ratios stay meaningful."""
    if runs < 1:
        raise ValueError("runs must be >= 1")
    for _ in range(max(0, warmup)):
        for call in calls.values():
            call()
    samples: dict[K, list[float]] = {name: [] for name in calls}
    for _ in range(runs):
        for name, call in calls.items():
            start = time.perf_counter()
            call()
            samples[name].append(time.perf_counter() - start)
    return samples


def measure_interleaved(calls: dict[str, Callable[[], Any]], *, batch: int, runs: int = 10,
                        warmup: int = 2) -> dict[str, Timing]:
    """:func:`interleaved_seconds` summarised per callable (milliseconds)."""
    out = {}
    for name, seconds in interleaved_seconds(calls, runs=runs, warmup=warmup).items():
        ordered = sorted(t * 1000.0 for t in seconds)
        out[name] = Timing(batch=batch, runs=runs, median_ms=statistics.median(ordered),
                           p90_ms=_percentile(ordered, 0.9), mean_ms=statistics.fmean(ordered), min_ms=ordered[0])
    return out
