"""``peftc demo-data DIR``: small image-classification tasks that need no download.

scikit-learn ships the UCI optical digits (1,797 8×8 greyscale images, 0–16) inside its wheel. They are
upscaled to ``size``×``size`` RGB PNGs (bilinear) and split into ``tasks`` tasks of consecutive digit pairs —
task1 = {0, 1}, task2 = {2, 3}, … — the "split digits" benchmark of continual learning. Each task folder has
``train/`` and ``val/`` with one folder per class (``zero``, ``one``, …), and ``DIR/tasks.yaml`` lists the
sequence for ``peftc train ART --sequence DIR/tasks.yaml``. The split is seeded and deterministic.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import numpy as np

from peftc.errors import PeftcError
from peftc.storage.atomic import write_file

__all__ = ["DIGIT_NAMES", "DemoDataError", "make_demo_data"]

DIGIT_NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")


class DemoDataError(PeftcError):
    """The demo data cannot be made (scikit-learn missing, bad arguments, an unwritable folder)."""


def _digits() -> tuple[np.ndarray, np.ndarray]:
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise DemoDataError("the demo data comes from scikit-learn's bundled digits: pip install 'peftc[demo]' "
                            "(or scikit-learn)") from None
    bunch = load_digits()
    return bunch.images, bunch.target


def make_demo_data(directory: str | Path, *, tasks: int = 5, size: int = 32, per_class: int | None = None,
                   val_per_class: int | None = None, seed: int = 0) -> dict[str, Any]:
    """Write the demo tasks under ``directory``; returns a summary (task → classes and image counts).

    ``per_class`` / ``val_per_class`` cap the train / val images of each class (default: all, with a 20%
    validation share), which keeps tests and quick tries small.
    """
    from PIL import Image

    if not 1 <= tasks <= 5:
        raise DemoDataError(f"the digits make 1 to 5 two-class tasks, got --tasks {tasks}")
    if size < 8:
        raise DemoDataError(f"--size must be at least 8 (the digits are 8x8), got {size}")
    for name, value in (("--per-class", per_class), ("--val-per-class", val_per_class)):
        if value is not None and value < 1:
            raise DemoDataError(f"{name} must be at least 1, got {value}")
    root = Path(directory)
    if root.exists() and not root.is_dir():
        raise DemoDataError(f"{root} exists and is not a folder")
    if (root / "tasks.yaml").exists():
        raise DemoDataError(f"{root} already holds a tasks.yaml; remove {root} or choose another folder")
    if root.is_dir() and any(root.iterdir()):
        raise DemoDataError(f"{root} is a non-empty folder that is not demo data; choose another path")
    images, targets = _digits()
    rng = random.Random(seed)
    summary: dict[str, Any] = {"directory": str(root), "size": size, "tasks": []}
    lines = ["# peftc demo data: scikit-learn digits, two classes per task", "root: .", "tasks:"]
    try:
        for t in range(tasks):
            name = f"task{t + 1}"
            digits = (2 * t, 2 * t + 1)
            counts: dict[str, dict[str, int]] = {}
            for digit in digits:
                idx = [int(i) for i in np.flatnonzero(targets == digit)]
                rng.shuffle(idx)
                n_val = val_per_class if val_per_class is not None else max(1, len(idx) // 5)
                val, train = idx[:n_val], idx[n_val:]
                if per_class is not None:
                    train = train[:per_class]
                label = DIGIT_NAMES[digit]
                for split, chosen in (("train", train), ("val", val)):
                    folder = root / name / split / label
                    folder.mkdir(parents=True, exist_ok=True)
                    for i in chosen:
                        pixels = np.clip(images[i] * (255.0 / 16.0), 0, 255).astype(np.uint8)
                        image = Image.fromarray(pixels).resize((size, size), Image.BILINEAR)
                        image.convert("RGB").save(folder / f"{i:04d}.png")
                counts[label] = {"train": len(train), "val": len(val)}
            summary["tasks"].append({"name": name, "classes": [DIGIT_NAMES[d] for d in digits], "images": counts})
            lines.append(f"  - {{name: {name}, data: {name}, classes: [{DIGIT_NAMES[digits[0]]}, "
                         f"{DIGIT_NAMES[digits[1]]}]}}")
        write_file(root / "tasks.yaml", "\n".join(lines) + "\n", overwrite=False)  # last: the data is complete
    except FileExistsError:
        raise DemoDataError(f"{root / 'tasks.yaml'} appeared while writing the demo data; left it as it was") from None
    except OSError as exc:
        raise DemoDataError(f"cannot write demo data to {root}: {exc.strerror or exc}") from None
    return summary


def demo_cnn(classes: int = 10, seed: int = 0) -> Any:
    """A small CNN (three conv-BN-ReLU stages, ~94k parameters) that learns the demo digits from scratch in
    seconds on a CPU: the learner of the online tests and benchmark (``peftc.compile(spec, demo_cnn())``)."""
    import torch
    from torch import nn

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        stages: list[nn.Module] = []
        for c_in, c_out in ((3, 32), (32, 64), (64, 128)):
            stages += [nn.Conv2d(c_in, c_out, 3, padding=1), nn.BatchNorm2d(c_out), nn.ReLU()]
            stages.append(nn.MaxPool2d(2) if c_out < 128 else nn.AdaptiveAvgPool2d(1))
        return nn.Sequential(*stages, nn.Flatten(), nn.Linear(128, classes))
