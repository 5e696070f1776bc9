"""Online class-incremental learning: the generative classifier vs ER-softmax, ER-ACE and TaER's task-free reading.

    python -m benchmarks.online [--quick] [--seeds 3] [--memories 200,1000] [--datasets digits,shapes]
                                [--threads N]

Every learner runs the same stream, memory, model and seed through ``peftc train --stream``'s runtime
(``peftc.train.online``): batch 10, one pass, reservoir memory, SGD lr 0.1, the small demo CNN
(``peftc.train.demo.demo_cnn``) trained from scratch at 16×16. Datasets: ``digits`` — ``peftc demo-data``, 5
two-class tasks (~1,440 stream samples); ``shapes`` — a synthetic 20-class set made here (class = an oriented colour
grating, drawn with a random phase and contrast under a random distractor grating and noise), cut into 10 two-class
tasks by a seeded class order (3,000 stream samples). Reported per learner and classifier, mean ± std over seeds:
final average accuracy, average incremental accuracy, forgetting (max over earlier evaluations minus final, averaged
over all tasks but the last: Chaudhry et al. 2018, Mammoth/PyCIL), the recent-class share (test predictions falling
into the newest task's classes after the last task; 1/T for an unbiased learner) and training images/s (loss, step
and memory update; evaluations excluded). Target: the generative classifier's final average accuracy is above
ER-softmax's at every setting. Results go to ``benchmarks/results/online.json``.
"""

from __future__ import annotations

import argparse
import math
import statistics
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.console import Console
from rich.table import Table

from benchmarks.common import check, write_result

# learner name → (the spec it compiles, the recipe override that picks it)
LEARNERS: dict[str, tuple[Any, dict[str, Any]]] = {}
FULL = {"peftc": 1, "name": "full_online", "summary": "every tensor trains; one head",
        "rules": [{"train": {"buffers": True}}, {"head": {}}],
        "train": {"optimizer": "sgd", "lr": 0.1, "augment": "none"}}
for _name in ("er", "er_ace", "taer"):
    LEARNERS[_name] = (FULL, {"online": {"learner": _name}})
LEARNERS["generative_ocl"] = ("generative_ocl", {})
SIZE = 16


def make_shapes(root: Path, classes: int = 20, train: int = 150, val: int = 30, seed: int = 0) -> Path:
    """A synthetic ImageFolder (``root/train``, ``root/val``) and its stream file (10 two-class tasks)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:SIZE, 0:SIZE] / SIZE

    def grating(freq: float, angle: float, colour: np.ndarray) -> np.ndarray:
        u = xx * math.cos(angle) + yy * math.sin(angle)
        return np.sin(2 * math.pi * freq * u + rng.uniform(0, 2 * math.pi))[..., None] * colour

    for c in range(classes):
        freq, angle = rng.uniform(1.5, 3.5), rng.uniform(0, math.pi)
        colour = 0.6 + 0.25 * rng.standard_normal(3)
        for split, n in (("train", train), ("val", val)):
            folder = root / split / f"class{c:02d}"
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                image = rng.uniform(0.5, 1.0) * grating(freq, angle, colour)
                image += rng.uniform(0.5, 1.0) * grating(rng.uniform(1.5, 3.5), rng.uniform(0, math.pi),
                                                         0.6 + 0.25 * rng.standard_normal(3))  # a distractor
                image = 0.5 + 0.2 * image + rng.normal(0, 0.2, image.shape)
                pixels = (np.clip(image, 0, 1) * 255).astype(np.uint8)
                Image.fromarray(pixels).save(folder / f"{i:03d}.png")
    stream = root / "stream.yaml"
    stream.write_text("name: shapes\ndata: .\nsplit: 10\nclass_order: seeded\n", encoding="utf-8")
    return stream


def make_digits(root: Path) -> Path:
    from peftc.train.demo import make_demo_data

    make_demo_data(root, size=SIZE)
    return root / "tasks.yaml"


def run_one(stream: Path, learner: str, memory: int, seed: int, work: Path) -> dict[str, Any]:
    import peftc
    from peftc.train.demo import demo_cnn
    from peftc.train.online import OnlineOptions, train_stream

    spec, overrides = LEARNERS[learner]
    model = peftc.compile(spec, demo_cnn(seed=seed))
    options = OnlineOptions(overrides=overrides, memory=memory, seed=seed, image_size=SIZE, quiet=True)
    record = train_stream(work / f"{learner}-{memory}-{seed}", stream, options, model=model)
    return {"images_per_second": record["images_per_second"], "samples": record["samples"],
            "classifiers": {c: {k: r[k] for k in ("average_accuracy", "average_incremental_accuracy", "forgetting",
                                                  "final_recent_share")}
                            for c, r in record["classifiers"].items()}}


def _stats(values: list[float]) -> dict[str, float]:
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0}


def aggregate(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Mean and std over seeds, per classifier and metric."""
    out: dict[str, Any] = {"images_per_second": _stats([r["images_per_second"] for r in runs]),
                           "samples": runs[0]["samples"], "classifiers": {}}
    for c in runs[0]["classifiers"]:
        out["classifiers"][c] = {k: _stats([r["classifiers"][c][k] for r in runs])
                                 for k in runs[0]["classifiers"][c]}
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="digits only, memory 200, one seed")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--memories", default="200,1000")
    parser.add_argument("--datasets", default="digits,shapes")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    datasets, memories, seeds = args.datasets.split(","), [int(m) for m in args.memories.split(",")], args.seeds
    if args.quick:
        datasets, memories, seeds = ["digits"], [200], 1
    console = Console()
    results: dict[str, Any] = {}
    checks = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        for dataset in datasets:
            stream = make_digits(work / "digits") if dataset == "digits" else make_shapes(work / "shapes")
            for memory in memories:
                key = f"{dataset}/memory {memory}"
                results[key] = {}
                for learner in LEARNERS:
                    runs = [run_one(stream, learner, memory, seed, work / "runs") for seed in range(seeds)]
                    results[key][learner] = aggregate(runs)
                    results[key][learner]["runs"] = runs
                    console.print(f"{key} {learner}: " + ", ".join(
                        f"{c} {r['average_accuracy']['mean']:.3f}" for c, r in
                        results[key][learner]["classifiers"].items()))
                gen = results[key]["generative_ocl"]["classifiers"]["ncm"]["average_accuracy"]["mean"]
                er = results[key]["er"]["classifiers"]["softmax"]["average_accuracy"]["mean"]
                checks.append(check(f"online-{dataset}-{memory}", f"generative (NCM) / ER-softmax final average "
                                    f"accuracy, {key}", gen / er, 1.0, "x", lower_is_better=False, suite="online"))
    table = Table(title="online class-incremental learning (mean ± std over seeds)", title_justify="left")
    for col in ("setting", "learner", "classifier", "final avg acc", "avg incr acc", "forgetting", "recent share",
                "images/s"):
        table.add_column(col, justify="left" if col in ("setting", "learner", "classifier") else "right")
    for key, learners in results.items():
        for learner, res in learners.items():
            for c, r in res["classifiers"].items():
                table.add_row(key, learner, c, *[f"{r[k]['mean']:.3f} ± {r[k]['std']:.3f}" for k in
                                                 ("average_accuracy", "average_incremental_accuracy", "forgetting",
                                                  "final_recent_share")],
                              f"{res['images_per_second']['mean']:,.0f}")
    console.print(table)
    config = {"datasets": datasets, "memories": memories, "seeds": seeds, "batch_size": 10, "image_size": SIZE,
              "model": "peftc.train.demo.demo_cnn (from scratch)", "optimizer": "sgd lr 0.1",
              "sampling": "reservoir", "threads": args.threads}
    path = write_result("online", {"config": config, "results": results, "checks": checks})
    console.print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
