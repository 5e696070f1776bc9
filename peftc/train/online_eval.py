"""Evaluation of an online learner: accuracy on every task seen so far, the recent-class share, the figure.

After the stream passes a task boundary (only the evaluator knows where they are), every task seen so far is
evaluated on its validation split, over all the classes seen so far (class-incremental: no task is given),
with each of the learner's classifiers (a generative learner's nearest class mean beside its proxy softmax).
The logits-bias view of Shen et al. (arXiv 2205.09347) is the *recent-class share*: the fraction of those test
predictions that fall into the most recent task's classes (1/t of them would, for a learner without the bias
and all-correct, with t tasks of equal size).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from peftc.train.data import ImageDataset, TaskData, collate
from peftc.train.metrics import continual_metrics, save_figure

__all__ = ["OnlineEval", "evaluate_online", "plot_stream", "summarise"]


class OnlineEval:
    """The validation splits of a stream's tasks, with their labels shifted to the stream's head."""

    def __init__(self, data: tuple[TaskData, ...], offsets: list[int], transform: Any, device: torch.device,
                 batch_size: int = 256):
        self.sets = [ImageDataset(d.val, transform) for d in data]
        self.offsets = offsets
        self.sizes = [len(d.classes) for d in data]
        self.device = device
        self.batch_size = batch_size

    @torch.no_grad()
    def row(self, learner: Any, memory: Any, upto: int) -> dict[str, dict[str, Any]]:
        """Accuracy on tasks 0..upto per classifier, and the share of predictions in task ``upto``'s classes."""
        model = learner.model
        was = model.training
        model.train(False)
        try:
            learner.prepare(memory)
            correct = {c: [0] * (upto + 1) for c in learner.classifiers}
            recent = dict.fromkeys(learner.classifiers, 0)
            totals = [0] * (upto + 1)
            lo, hi = self.offsets[upto], self.offsets[upto] + self.sizes[upto]
            for j in range(upto + 1):
                loader = torch.utils.data.DataLoader(self.sets[j], batch_size=self.batch_size, collate_fn=collate)
                for images, labels, _ in loader:
                    if not len(labels):
                        continue
                    labels = labels.to(self.device) + self.offsets[j]
                    for name, pred in learner.predict(images.to(self.device)).items():
                        correct[name][j] += int((pred == labels).sum())
                        recent[name] += int(((pred >= lo) & (pred < hi)).sum())
                    totals[j] += len(labels)
        finally:
            model.train(was)
        seen = max(1, sum(totals))
        return {name: {"accuracy": [c / max(1, t) for c, t in zip(correct[name], totals)],
                       "recent_share": recent[name] / seen} for name in learner.classifiers}


def summarise(rows: list[dict[str, dict[str, Any]]], tasks: list[str]) -> dict[str, Any]:
    """Per classifier: the accuracy matrix, the continual metrics and the recent-class share per boundary."""
    out: dict[str, Any] = {}
    for name in rows[0] if rows else {}:
        matrix = [r[name]["accuracy"] + [None] * (len(tasks) - len(r[name]["accuracy"])) for r in rows]
        shares = [r[name]["recent_share"] for r in rows]
        out[name] = {"matrix": matrix, **continual_metrics(matrix), "recent_share": shares,
                     "final_recent_share": shares[-1] if len(rows) == len(tasks) else None}
    return out


def plot_stream(record: dict[str, Any], path: Path) -> Path | None:
    """Average accuracy on the classes seen so far, and the recent-class share, at each boundary (needs matplotlib)."""
    try:
        import matplotlib

        matplotlib.use("Agg", force=True)
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    x = record["boundaries"][: len(next(iter(record["classifiers"].values()))["matrix"])]
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(6, 6), sharex=True)
    for name, res in record["classifiers"].items():
        means = [sum(v for v in row if v is not None) / sum(v is not None for v in row) for row in res["matrix"]]
        top.plot(x, means, marker="o", label=name)
        bottom.plot(x, res["recent_share"], marker="o", label=name)
    tasks = len(record["tasks"])
    bottom.plot(x, [1 / (k + 1) for k in range(len(x))], ls="--", color="grey", label="balanced (1/t)")
    top.set_ylabel("accuracy, classes seen")
    top.set_ylim(0, 1)
    bottom.set_ylabel("predictions in newest task")
    bottom.set_ylim(0, 1)
    bottom.set_xlabel(f"stream samples ({tasks} task boundaries)")
    top.set_title(f"{record['stream']}: {record['learner']}, batch {record['batch_size']}, "
                  f"memory {record['memory']} ({record['sampling']})", fontsize=10)
    top.legend(fontsize=8)
    bottom.legend(fontsize=8)
    fig.tight_layout()
    return save_figure(fig, path, dpi=110)


def evaluate_online(artifact: str | Path, record_path: Path, device: str = "cpu",
                    batch_size: int = 256) -> dict[str, Any]:
    """``peftc eval`` of an artifact trained on a stream: every classifier of its learner, side by side."""
    from safetensors.torch import load_file

    from peftc.compiler import load
    from peftc.train.data import discover
    from peftc.train.distributed import setup
    from peftc.train.learners import get_learner
    from peftc.train.memory import ReplayMemory
    from peftc.train.transforms import backbone_stats, eval_transform

    record = json.loads(record_path.read_text(encoding="utf-8"))
    dev = setup(device).device
    model = load(artifact).to(dev)
    model.set_task(record["stream"])
    data = tuple(discover(t["data"], t["classes"], val_fraction=record["val_fraction"], seed=record["seed"])
                 for t in record["data"])
    offsets = [sum(len(d.classes) for d in data[:k]) for k in range(len(data))]
    learner = get_learner(record["learner"])(model, offsets[-1] + len(data[-1].classes), record["args"])
    saved = load_file(str(record_path.parent / record["memory_file"]))
    learner.load_state({k[8:]: v for k, v in saved.items() if k.startswith("learner/")})
    memory = ReplayMemory(record["memory"], record["sampling"])
    memory.load_state({k[7:]: v for k, v in saved.items() if k.startswith("memory/")})
    mean, std = backbone_stats(model.backbone.id)
    evaluator = OnlineEval(data, offsets, eval_transform(record["image_size"], "none", mean, std), dev, batch_size)
    row = evaluator.row(learner, memory, len(data) - 1)
    tasks = {name: {"images": len(d.val), **{c: row[c]["accuracy"][k] for c in learner.classifiers}}
             for k, (name, d) in enumerate(zip(record["tasks"], data))}
    return {"artifact": str(artifact), "stream": record["stream"], "learner": record["learner"],
            "classifiers": list(learner.classifiers), "tasks": tasks,
            "average_accuracy": {c: sum(row[c]["accuracy"]) / len(data) for c in learner.classifiers},
            "recent_share": {c: row[c]["recent_share"] for c in learner.classifiers}}
