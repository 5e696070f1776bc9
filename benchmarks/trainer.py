"""Trainer overhead: ``peftc train`` images/s vs a minimal hand-written PyTorch loop, and the data loader alone.

    python -m benchmarks.trainer [--quick] [--rounds 5] [--backbone resnet18] [--spec bitfit] [--image 64]
                                 [--batch 32] [--images 256] [--workers 0] [--threads N]

Both sides train the same compiled model (BitFit on torchvision resnet18 by default: every bias trains, so the
backward runs through the whole network) on the same generated ImageFolder (PNG files, decoded and transformed
per step by the same dataset and transforms), at the same batch, with Adam and the same number of DataLoader
workers. The hand loop is what a user writes: ``for images, labels in loader: loss = cross_entropy(model(x), y);
zero_grad; backward; step``. peftc's side is ``train_task`` with everything it does per step: the stage's loss,
the finite-loss check, the stepper (accumulation bookkeeping, lr schedule), progress, per-step log rows.
Each round trains one new task for two epochs on each side, in turn, and times the second epoch (the first
pays for allocator warm-up) step by step: the time from the end of one step to the end of the next covers loading
a batch, the forward, the backward and the update, plus whatever the loop does around them. The overhead is the
median over rounds of (peftc's median step time) / (the hand loop's), in process CPU time — on a machine shared
with other work, wall-clock epochs move by ±30 % with the load while CPU time of a one-thread process does not —
and, beside it, in wall-clock time. Validation is outside the timed steps on both sides (so is peftc's
checkpoint). The loader alone iterates the same DataLoader with no model, with 0 and with the default number of
workers (min(8, CPUs)), so a slow pipeline shows as loader ≈ training images/s.
Target (CPU): overhead ≤ 1.05. The GPU figures of issue 16 (bf16 vs fp32 step time and memory, compiled vs
eager, ORT CUDA) need a lent GPU; without one they are recorded as not measured.
"""

from __future__ import annotations

import argparse
import itertools
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from benchmarks.common import check, write_result

TARGET = 1.05


def _make_data(root: Path, images: int, size: int) -> Path:
    """A two-class ImageFolder of random-noise PNGs (decode cost like small real images)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for c in ("a", "b"):
        for split, n in (("train", images // 2), ("val", 8)):
            folder = root / split / c
            folder.mkdir(parents=True)
            for i in range(n):
                Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    return root


def _hand_epoch(model: Any, loader: Any, optimizer: Any, marks: list[tuple[float, float]]) -> None:
    import torch.nn.functional as F

    model.train()
    for images, labels, _ in loader:
        loss = F.cross_entropy(model(images), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        marks.append((time.process_time(), time.perf_counter()))


def _step_times(marks: list[tuple[float, float]]) -> tuple[float, float]:
    """Median (CPU, wall) seconds between consecutive step ends."""
    cpu = [b[0] - a[0] for a, b in itertools.pairwise(marks)]
    wall = [b[1] - a[1] for a, b in itertools.pairwise(marks)]
    return statistics.median(cpu), statistics.median(wall)


def _loader_alone(dataset: Any, batch: int, workers: int) -> float:
    import torch

    from peftc.train.data import collate

    loader = torch.utils.data.DataLoader(dataset, batch_size=batch, shuffle=True, collate_fn=collate,
                                         num_workers=workers)
    for _ in loader:  # warm-up epoch (worker start-up, page cache)
        pass
    seen, start = 0, time.perf_counter()
    for _, labels, _ in loader:
        seen += len(labels)
    return seen / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="3 rounds, 128 images")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--backbone", default="resnet18")
    parser.add_argument("--spec", default="bitfit")
    parser.add_argument("--image", type=int, default=64)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--workers", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.quick:
        args.rounds, args.images = 3, 128

    import torch

    import peftc
    from peftc.train import TrainOptions, train_task
    from peftc.train.context import Hooks, default_workers
    from peftc.train.data import ImageDataset, collate, discover
    from peftc.train.transforms import backbone_stats, train_transform

    if args.threads:
        torch.set_num_threads(args.threads)
    console = Console()
    tmp = Path(tempfile.mkdtemp(prefix="peftc-bench-trainer-"))
    data = _make_data(tmp / "data", args.images, args.image)
    model = peftc.compile(args.spec, args.backbone, num_classes=2)
    art = tmp / "art"
    model.save(art)
    task = discover(data)
    mean, std = backbone_stats(model.backbone.id)
    dataset = ImageDataset(task.train, train_transform(args.image, "none", mean, std))
    options = dict(device="cpu", workers=args.workers, quiet=True, image_size=args.image,
                   overrides={"batch_size": args.batch, "epochs": 2, "augment": "none", "lr": 1e-3})

    rows: list[dict[str, float]] = []
    for r in range(args.rounds):
        marks: dict[int, list[tuple[float, float]]] = {0: [], 1: []}

        def on_step(run: Any, stage: Any, epoch: int, step: int, loss: float, marks: Any = marks) -> None:
            marks[epoch].append((time.process_time(), time.perf_counter()))

        train_task(art, f"r{r}", data, TrainOptions(**options, hooks=Hooks(on_step=on_step)), model=model)
        model.add_task(f"h{r}", num_classes=2)
        model.set_task(f"h{r}")
        optimizer = torch.optim.Adam(list(model.trainable_parameters()), lr=1e-3)
        loader = torch.utils.data.DataLoader(dataset, batch_size=args.batch, shuffle=True, collate_fn=collate,
                                             num_workers=args.workers)
        hand_marks: list[tuple[float, float]] = []
        _hand_epoch(model, loader, optimizer, [])
        _hand_epoch(model, loader, optimizer, hand_marks)
        (p_cpu, p_wall), (h_cpu, h_wall) = _step_times(marks[1]), _step_times(hand_marks)
        rows.append({"peftc_cpu_s": p_cpu, "peftc_wall_s": p_wall, "hand_cpu_s": h_cpu, "hand_wall_s": h_wall,
                     "cpu_ratio": p_cpu / h_cpu, "wall_ratio": p_wall / h_wall})
        console.print(f"round {r + 1}/{args.rounds}: step CPU ms peftc {p_cpu * 1e3:.1f} / hand {h_cpu * 1e3:.1f} = "
                      f"{p_cpu / h_cpu:.3f}; wall ms {p_wall * 1e3:.1f} / {h_wall * 1e3:.1f} = {p_wall / h_wall:.3f}")
    loaders = {str(w): _loader_alone(dataset, args.batch, w) for w in sorted({0, default_workers()})}
    overhead = statistics.median(r["cpu_ratio"] for r in rows)
    wall = statistics.median(r["wall_ratio"] for r in rows)
    load = round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None

    def ips(key: str) -> list[float]:
        return [args.batch / r[key] for r in rows]

    table = Table(title=f"{args.spec} on {args.backbone} @ {args.image}px, batch {args.batch}, "
                        f"{args.workers} workers, {torch.get_num_threads()} threads", title_justify="left")
    for col in ("measure", "images/s, CPU time", "images/s, wall"):
        table.add_column(col, justify="left" if col == "measure" else "right")
    table.add_row("peftc train", f"{statistics.median(ips('peftc_cpu_s')):,.1f}",
                  f"{statistics.median(ips('peftc_wall_s')):,.1f}")
    table.add_row("hand-written loop", f"{statistics.median(ips('hand_cpu_s')):,.1f}",
                  f"{statistics.median(ips('hand_wall_s')):,.1f}")
    for w, value in loaders.items():
        table.add_row(f"loader alone, {w} workers", "", f"{value:,.1f}")
    console.print(table)
    console.print(f"overhead, peftc / hand step time (median of {args.rounds} rounds): CPU {overhead:.3f}, wall "
                  f"{wall:.3f} (target ≤ {TARGET}); load average {load}")
    path = write_result("trainer", {
        "config": {"spec": args.spec, "backbone": args.backbone, "image": args.image, "batch": args.batch,
                   "images": args.images, "workers": args.workers, "rounds": args.rounds,
                   "threads": torch.get_num_threads()},
        "rounds": rows, "peftc_images_per_s": statistics.median(ips("peftc_cpu_s")),
        "hand_images_per_s": statistics.median(ips("hand_cpu_s")),
        "peftc_images_per_s_wall": statistics.median(ips("peftc_wall_s")),
        "hand_images_per_s_wall": statistics.median(ips("hand_wall_s")),
        "overhead": overhead, "overhead_wall": wall, "load_average": load, "loader_images_per_s": loaders,
        "gpu": None if not torch.cuda.is_available() else "not measured by this script yet",
        "gpu_note": "bf16/fp32 step time and peak memory, compiled vs eager and ORT CUDA need a lent GPU; "
                    "none was available when this ran",
        "checks": [check("trainer_overhead", f"peftc train / hand-written loop, {args.spec} {args.backbone} "
                         f"@ {args.image}px batch {args.batch}, step CPU time", overhead, TARGET, "x",
                         suite="trainer")],
    })
    console.print(f"wrote {path}")


if __name__ == "__main__":
    main()
