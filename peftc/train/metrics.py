"""Continual-learning metrics over the accuracy matrix, and its heat map.

``a[i][j]`` is the accuracy on task j after training tasks 0..i (``None`` for j > i: not trained yet). With T
tasks (Lopez-Paz & Ranzato 2017; Chaudhry et al. 2018):

* average accuracy        A_T = mean_j a[T-1][j]
* average incremental acc. mean_i (mean_{j<=i} a[i][j])   — the curve's mean, as in iCaRL-style reports
* forgetting              F_T = mean_{j<T-1} ( max_{i<T-1} a[i][j] − a[T-1][j] )
* backward transfer       BWT = mean_{j<T-1} ( a[T-1][j] − a[j][j] )

Forgetting and BWT need at least two tasks; with one they are ``None``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

__all__ = ["continual_metrics", "heatmap"]

Matrix = list[list[float | None]]


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def continual_metrics(matrix: Matrix) -> dict[str, Any]:
    """The standard summary numbers of an accuracy matrix (see the module docstring)."""
    t = len(matrix)
    if t == 0:
        return {"average_accuracy": None, "average_incremental_accuracy": None, "forgetting": None,
                "backward_transfer": None, "per_task_forgetting": []}
    last = matrix[-1]
    final = [v for v in last[:t] if v is not None]
    rows = [_mean([v for v in matrix[i][: i + 1] if v is not None]) for i in range(t)]
    forgetting: list[float] = []
    bwt: list[float] = []
    for j in range(t - 1):
        seen = [matrix[i][j] for i in range(j, t - 1) if matrix[i][j] is not None]
        if seen and last[j] is not None:
            forgetting.append(max(seen) - last[j])
        if matrix[j][j] is not None and last[j] is not None:
            bwt.append(last[j] - matrix[j][j])
    return {
        "average_accuracy": _mean(final),
        "average_incremental_accuracy": _mean([r for r in rows if r is not None]),
        "forgetting": _mean(forgetting) if t > 1 else None,
        "backward_transfer": _mean(bwt) if t > 1 else None,
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
