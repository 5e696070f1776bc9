"""Continual-learning metrics over the accuracy matrix, as the field's libraries define them, and its heat map.

``a[i][j]`` is the accuracy on task j after training tasks 0..i (``None`` for j > i: not trained yet); T tasks.

* ``average_accuracy``               final average accuracy, mean_j a[T-1][j]
* ``average_incremental_accuracy``   mean_i (mean_{j<=i} a[i][j]): PyCIL/PILOT's "Average Accuracy", the curve's mean
* ``forgetting``                     Mammoth's and PyCIL's: mean_{j<T-1} ( max_l a[l][j] − a[T-1][j] ), the max over
                                     every evaluation of task j, the final one included (so it is never negative)
* ``forgetting_avalanche``           Avalanche's: mean_{j<T-1} ( a[j][j] − a[T-1][j] ), first minus final (no max)
* ``backward_transfer``              Mammoth's BWT (Lopez-Paz & Ranzato 2017): mean_{j<T-1} ( a[T-1][j] − a[j][j] )
* ``forward_transfer``               Mammoth's FWT: mean_{j>=1} ( before[j] − baselines[j] ), where ``before[j]``
                                     = a[j-1][j] is task j's accuracy just before training it and ``baselines[j]``
                                     = b_j the accuracy of the model before any training (Mammoth: the random
                                     model). ``None`` unless both are given.

The forgetting family and BWT need at least two tasks; with one they are ``None``. A task whose accuracy rises
after its own training has Mammoth forgetting 0 and a negative Avalanche forgetting (tested).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = ["DEFINITIONS", "continual_metrics", "heatmap"]

Matrix = list[list[float | None]]

DEFINITIONS = {
    "average_accuracy": "final average accuracy: mean_j a[T-1][j]",
    "average_incremental_accuracy": "mean over i of mean_{j<=i} a[i][j] (PyCIL/PILOT 'Average Accuracy')",
    "forgetting": "Mammoth/PyCIL: mean_{j<T-1} (max_l a[l][j] - a[T-1][j]), max over all evaluations of task j",
    "forgetting_avalanche": "Avalanche: mean_{j<T-1} (a[j][j] - a[T-1][j]), first minus final",
    "backward_transfer": "Mammoth BWT: mean_{j<T-1} (a[T-1][j] - a[j][j])",
    "forward_transfer": "Mammoth FWT: mean_{j>=1} (a[j-1][j] - b_j), b_j: the untrained model's accuracy on task j",
}


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def _forward_transfer(t: int, before: Sequence[float | None] | None,
                      baselines: Sequence[float | None] | None) -> float | None:
    if before is None or baselines is None:
        return None
    pairs = [(before[j], baselines[j]) for j in range(1, min(t, len(before), len(baselines)))]
    if not pairs or any(a is None or b is None for a, b in pairs):
        return None
    return _mean([a - b for a, b in pairs])  # type: ignore[operator]


def continual_metrics(matrix: Matrix, *, before: Sequence[float | None] | None = None,
                      baselines: Sequence[float | None] | None = None) -> dict[str, Any]:
    """The standard summary numbers of an accuracy matrix (see the module docstring for each definition)."""
    t = len(matrix)
    if t == 0:
        return {"average_accuracy": None, "average_incremental_accuracy": None, "forgetting": None,
                "forgetting_avalanche": None, "backward_transfer": None, "forward_transfer": None,
                "per_task_forgetting": []}
    last = matrix[-1]
    final = [v for v in last[:t] if v is not None]
    rows = [_mean([v for v in matrix[i][: i + 1] if v is not None]) for i in range(t)]
    forgetting: list[float] = []
    first_minus_final: list[float] = []
    bwt: list[float] = []
    for j in range(t - 1):
        seen = [matrix[i][j] for i in range(j, t) if matrix[i][j] is not None]
        if seen and last[j] is not None:
            forgetting.append(max(seen) - last[j])
        if matrix[j][j] is not None and last[j] is not None:
            bwt.append(last[j] - matrix[j][j])
            first_minus_final.append(matrix[j][j] - last[j])
    several = t > 1
    return {
        "average_accuracy": _mean(final),
        "average_incremental_accuracy": _mean([r for r in rows if r is not None]),
        "forgetting": _mean(forgetting) if several else None,
        "forgetting_avalanche": _mean(first_minus_final) if several else None,
        "backward_transfer": _mean(bwt) if several else None,
        "forward_transfer": _forward_transfer(t, before, baselines) if several else None,
        "per_task_forgetting": forgetting,
    }


def heatmap(matrix: Matrix, tasks: list[str], path: Path, title: str) -> Path | None:
    """Write the accuracy matrix as a PNG heat map; None (and no file) when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg", force=True)
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    import numpy as np

    n = len(tasks)
    data = np.full((len(matrix), n), np.nan)
    for i, row in enumerate(matrix):
        for j, value in enumerate(row):
            if value is not None:
                data[i, j] = value
    side = max(3.0, 0.7 * n + 1.8)
    fig, ax = plt.subplots(figsize=(side + 0.8, side))
    image = ax.imshow(np.ma.masked_invalid(data), vmin=0.0, vmax=1.0, cmap="viridis")
    ax.set_xticks(range(n), labels=tasks, rotation=45, ha="right")
    ax.set_yticks(range(len(matrix)), labels=[f"after {t}" for t in tasks[: len(matrix)]])
    ax.set_xlabel("evaluated on")
    ax.set_ylabel("trained through")
    ax.set_title(title, fontsize=10)
    for i in range(len(matrix)):
        for j in range(n):
            if not np.isnan(data[i, j]):
                ax.text(j, i, f"{data[i, j]:.2f}", ha="center", va="center",
                        color="black" if data[i, j] > 0.6 else "white", fontsize=8)
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="accuracy")
    fig.tight_layout()
    return save_figure(fig, path, dpi=120)


def save_figure(fig: Any, path: Path, dpi: int) -> Path:
    """Write a matplotlib figure as a PNG, atomically, and close it."""
    import io

    import matplotlib.pyplot as plt

    from peftc.storage.atomic import write_file

    png = io.BytesIO()
    fig.savefig(png, format="png", dpi=dpi)
    plt.close(fig)
    return write_file(path, png.getvalue())
