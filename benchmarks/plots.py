"""PNG plots from the result JSON: peftc/peer ratio bars, memory bars, ToMe throughput vs r, compile times.

Each function takes the loaded results (result-file stem → JSON) and a folder, draws one small figure (matplotlib,
Agg backend, 80 dpi) when its data is there, and returns the path, or None when the data is missing. A plot never
invents data: what a suite did not measure is left out.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from pathlib import Path
from typing import Any

__all__ = ["PLOTS", "draw_all", "ratio_rows", "throughput_curves"]

DPI = 80
GOOD, BAD, NEUTRAL = "#2e7d32", "#c62828", "#607d8b"


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def ratio_rows(results: dict[str, Any]) -> list[tuple[str, float, float, float]]:
    """(label, median, min, max) of every peftc/peer ratio: train-step (step, forward, memory) and storage."""
    rows = []
    for r in results.get("train_step", {}).get("ratios", {}).values():
        if r.get("peer") in ("peft", "wrapper"):
            peer = "HF PEFT" if r["peer"] == "peft" else "wrappers"
            group = f"{r['group']} " if r.get("group") else ""
            rows.append((f"{group}{r['method']} {r['metric']} / {peer}", r["median"], r["min"], r["max"]))
    for row in results.get("storage", {}).get("rows", {}).values():
        if "ratio" in row:
            backbone = row.get("peftc", {}).get("backbone", "").split(":")[-1].split("_patch")[0]
            rows.append((f"{row['method']} bytes, {backbone} / HF PEFT", row["ratio"], row["ratio"], row["ratio"]))
    return rows


def ratios(results: dict[str, Any], out: Path) -> Path | None:
    rows = ratio_rows(results)
    if not rows:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 0.32 * len(rows) + 1.1), dpi=DPI)
    labels = [r[0] for r in rows][::-1]
    med = [r[1] for r in rows][::-1]
    err = [[m - r[2] for m, r in zip(med, rows[::-1])], [r[3] - m for m, r in zip(med, rows[::-1])]]
    ax.barh(labels, med, xerr=err, color=[GOOD if m <= 1.0 else BAD for m in med], capsize=2)
    ax.axvline(1.0, color="black", lw=1)
    ax.set_xlabel("peftc / peer (median over rounds; < 1: peftc cheaper)")
    ax.set_xlim(0, max(1.3, max(r[3] for r in rows) * 1.05))
    ax.tick_params(labelsize=8)
    fig.tight_layout()
    path = out / "ratios.png"
    fig.savefig(path)
    plt.close(fig)
    return path


def memory(results: dict[str, Any], out: Path) -> Path | None:
    variants = results.get("train_step", {}).get("variants", {})
    if not variants:
        return None
    plt = _pyplot()
    keys = list(variants)[::-1]
    model = [variants[k].get("model_mb", 0.0) for k in keys]
    peak = [variants[k]["peak_mb"]["median"] for k in keys]
    fig, ax = plt.subplots(figsize=(6.4, 0.3 * len(keys) + 1.1), dpi=DPI)
    ax.barh(keys, peak, color=NEUTRAL, label="peak while training")
    ax.barh(keys, model, color="#b0bec5", label="model at rest")
    ax.set_xlabel("MiB above the process before the model was built")
    ax.legend(fontsize=7, loc="lower right")
    ax.tick_params(labelsize=8)
    fig.tight_layout()
    path = out / "memory.png"
    fig.savefig(path)
    plt.close(fig)
    return path


def throughput_curves(tome: dict[str, Any]) -> dict[str, list[tuple[int, float]]]:
    """backend → [(r, images/s)] from tome.json (``results[backend][r] = {"images_per_s": …}``)."""
    curves = {}
    for backend, per_r in tome.get("results", {}).items():
        if isinstance(per_r, dict) and per_r and all(k.isdigit() for k in per_r) and all(
                isinstance(v, dict) and "images_per_s" in v for v in per_r.values()):
            curves[backend] = sorted((int(r), v["images_per_s"]) for r, v in per_r.items())
    return curves


def throughput(results: dict[str, Any], out: Path) -> Path | None:
    curves = throughput_curves(results.get("tome", {}))
    if not curves:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5.0, 3.2), dpi=DPI)
    for backend, points in curves.items():
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=backend)
    ax.set_xlabel("r (tokens merged per block)")
    ax.set_ylabel("images / s")
    backbone = results["tome"].get("config", {}).get("backbone", "")
    ax.set_title(f"ToMe on {backbone}", fontsize=9)
    ax.legend(fontsize=8)
    ax.set_ylim(bottom=0)
    fig.tight_layout()
    path = out / "tome_throughput.png"
    fig.savefig(path)
    plt.close(fig)
    return path


def compile_times(results: dict[str, Any], out: Path) -> Path | None:
    """Trace + passes and the public call per case, as multiples of the bare fx trace, with their targets."""
    rows = results.get("compile_time", {}).get("cases", {})
    if not rows:
        return None
    plt = _pyplot()
    names = list(rows)[::-1]
    passes = [rows[n]["passes_ratio"] for n in names]
    public = [rows[n]["public_ratio"] for n in names]
    fig, ax = plt.subplots(figsize=(6.4, max(2.0, 0.32 * len(names) + 1.1)), dpi=DPI)
    y = range(len(names))
    ax.barh([i + 0.2 for i in y], passes, height=0.4, label="trace + passes",
            color=[GOOD if r <= rows[n]["passes_target"] else BAD for n, r in zip(names, passes)])
    ax.barh([i - 0.2 for i in y], public, height=0.4, label="peftc.compile", color=NEUTRAL)
    ax.set_yticks(list(y), labels=names)
    for t, style in ((1.2, ":"), (1.5, "--"), (2.0, "-.")):
        ax.axvline(t, color="black", lw=0.8, ls=style)
    ax.legend(fontsize=6, loc="lower right")
    ax.set_xlabel("× a bare torch.fx trace of the same backbone (median, interleaved)")
    ax.tick_params(labelsize=7)
    fig.tight_layout()
    path = out / "compile_time.png"
    fig.savefig(path)
    plt.close(fig)
    return path


PLOTS: dict[str, Callable[[dict[str, Any], Path], Path | None]] = {
    "ratios": ratios, "memory": memory, "tome_throughput": throughput, "compile_time": compile_times}


def draw_all(results: dict[str, Any], out: Path) -> dict[str, Path]:
    """Every plot whose data exists; a plot whose data is gone is removed, so no stale figure survives.
    Without matplotlib nothing is drawn (``pip install -e '.[bench]'``)."""
    out.mkdir(parents=True, exist_ok=True)
    if importlib.util.find_spec("matplotlib") is None:
        return {}  # the page says plots need matplotlib
    drawn = {}
    for name, fn in PLOTS.items():
        path = fn(results, out)
        if path is not None:
            drawn[name] = path
        else:
            (out / f"{name}.png").unlink(missing_ok=True)
    return drawn
