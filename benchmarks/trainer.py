"""Trainer overhead: ``peftc train`` images/s vs a minimal hand-written PyTorch loop, and the data loader alone.

    python -m benchmarks.trainer [--quick] [--rounds 5] [--backbone resnet18] [--spec bitfit] [--image 64]
                                 [--batch 32] [--images 256] [--workers 0] [--threads N]

Both sides train the same compiled model (BitFit on torchvision resnet18 by default: every bias trains, so the
backward runs through the whole network) on the same generated ImageFolder (PNG files, decoded and transformed
per step by the same dataset and transforms), at the same batch, with Adam and the same number of DataLoader
workers. The hand loop is what a user writes: ``for images, labels in loader: loss = cross_entropy(model(x), y);
zero_grad; backward; step``. peftc's side is ``train_task`` with everything it does per step: the stage's loss,
the finite-loss check, the stepper (accumulation bookkeeping, lr schedule), progress, per-step log rows.
Each round trains one new task for two epochs on each side, in turn, and keeps the second epoch (the first pays
for allocator warm-up); the overhead is the median over rounds of (hand images/s) / (peftc images/s), and, since
load on a shared machine moves whole epochs, also the ratio of each side's best epoch. Validation
is outside the timed epoch on both sides. The loader alone iterates the same DataLoader with no model, with 0
and with the default number of workers (min(8, CPUs)), so a slow pipeline shows as loader ≈ training images/s.
Target (CPU): overhead ≤ 1.05. The GPU figures of issue 16 (bf16 vs fp32 step time and memory, compiled vs
eager, ORT CUDA) need a lent GPU; without one they are recorded as not measured.
"""

from __future__ import annotations

import argparse
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


def _hand_epoch(model: Any, loader: Any, optimizer: Any) -> tuple[int, float]:
    import torch.nn.functional as F

    model.train()
    seen, start = 0, time.perf_counter()
    for images, labels, _ in loader:
        loss = F.cross_entropy(model(images), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        seen += len(labels)
    return seen, time.perf_counter() - start


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
    from peftc.train.context import default_workers
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

    ours: list[float] = []
    hand: list[float] = []
    ratios: list[float] = []
    for r in range(args.rounds):
        result = train_task(art, f"r{r}", data, TrainOptions(**options), model=model)  # type: ignore[arg-type]
        peftc_ips = result.summary["stages"][0]["history"][-1]["images_per_second"]
        model.add_task(f"h{r}", num_classes=2)
        model.set_task(f"h{r}")
        optimizer = torch.optim.Adam(list(model.trainable_parameters()), lr=1e-3)
        loader = torch.utils.data.DataLoader(dataset, batch_size=args.batch, shuffle=True, collate_fn=collate,
                                             num_workers=args.workers)
        _hand_epoch(model, loader, optimizer)
        seen, seconds = _hand_epoch(model, loader, optimizer)
        hand_ips = seen / seconds
        ours.append(peftc_ips)
        hand.append(hand_ips)
        ratios.append(hand_ips / peftc_ips)
        console.print(f"round {r + 1}/{args.rounds}: peftc {peftc_ips:,.1f} img/s, hand loop {hand_ips:,.1f} img/s, "
                      f"overhead {hand_ips / peftc_ips:.3f}")
    loaders = {str(w): _loader_alone(dataset, args.batch, w) for w in sorted({0, default_workers()})}
    overhead = statistics.median(ratios)
    best = max(hand) / max(ours)  # the least-disturbed epoch of each side: robust to load bursts on a shared machine
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None

    table = Table(title=f"{args.spec} on {args.backbone} @ {args.image}px, batch {args.batch}, "
                        f"{args.workers} workers, {torch.get_num_threads()} threads", title_justify="left")
    for col in ("measure", "images/s (median)", "range"):
        table.add_column(col, justify="left" if col == "measure" else "right")
    table.add_row("peftc train", f"{statistics.median(ours):,.1f}", f"{min(ours):,.1f}–{max(ours):,.1f}")
    table.add_row("hand-written loop", f"{statistics.median(hand):,.1f}", f"{min(hand):,.1f}–{max(hand):,.1f}")
    for w, ips in loaders.items():
        table.add_row(f"loader alone, {w} workers", f"{ips:,.1f}", "")
    console.print(table)
    console.print(f"overhead (hand / peftc images/s, median of {args.rounds} rounds): {overhead:.3f}; best epoch "
                  f"of each side: {best:.3f} (target ≤ {TARGET}); load average {load}")
    path = write_result("trainer", {
        "config": {"spec": args.spec, "backbone": args.backbone, "image": args.image, "batch": args.batch,
                   "images": args.images, "workers": args.workers, "rounds": args.rounds,
                   "threads": torch.get_num_threads()},
        "peftc_images_per_s": ours, "hand_images_per_s": hand, "overhead_ratios": ratios,
        "overhead": overhead, "overhead_best": best, "load_average": load, "loader_images_per_s": loaders,
        "gpu": None if not torch.cuda.is_available() else "not measured by this script yet",
        "gpu_note": "bf16/fp32 step time and peak memory, compiled vs eager and ORT CUDA need a lent GPU; "
                    "none was available when this ran",
        "checks": [check("trainer_overhead", f"peftc train / hand-written loop, {args.spec} {args.backbone} "
                         f"@ {args.image}px batch {args.batch} (CPU)", overhead, TARGET, "x", suite="trainer")],
    })
    console.print(f"wrote {path}")


if __name__ == "__main__":
    main()
