"""Training metrics on disk, beside the artifact: every optimizer step and every epoch as JSONL and CSV rows, and
TensorBoard event files when asked for (``--log tensorboard``; needs the ``tensorboard`` package).

Files, per task: ``DIR/train/<task>/log/{steps,epochs}.{jsonl,csv}`` and ``DIR/train/<task>/log/tensorboard/``.
A fresh run starts new files; ``--resume`` appends (the interrupted epoch's steps then appear twice, told apart
by their ``global_step``). Rows are buffered and flushed after every epoch, so logging costs no I/O per step.
"""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path
from typing import Any, TextIO

from peftc.errors import PeftcError

__all__ = ["EPOCH_FIELDS", "LOGGERS", "STEP_FIELDS", "LogError", "RunLog", "check_loggers"]

LOGGERS = ("tensorboard",)
STEP_FIELDS = ("stage", "epoch", "step", "global_step", "loss", "lr", "images_per_second")
EPOCH_FIELDS = ("stage", "epoch", "loss", "val_accuracy", "lr", "images_per_second", "images", "steps", "seconds",
                "corrupt_skipped")


class LogError(PeftcError):
    """An unknown logger, or one whose package is not installed."""


def check_loggers(names: list[str] | tuple[str, ...]) -> tuple[str, ...]:
    """The loggers asked for, checked before any training (JSONL and CSV are always written)."""
    for name in names:
        if name not in LOGGERS:
            raise LogError(f"--log {name}: unknown logger (JSONL and CSV are always written; extra: "
                           f"{', '.join(LOGGERS)})")
        try:
            import tensorboard  # noqa: F401
        except ImportError:
            raise LogError("--log tensorboard needs the tensorboard package: pip install 'peftc[tensorboard]'"
                           ) from None
    return tuple(dict.fromkeys(names))


class _Table:
    """One JSONL file and one CSV file with the same rows."""

    def __init__(self, folder: Path, name: str, fields: tuple[str, ...]):
        self.jsonl: TextIO = (folder / f"{name}.jsonl").open("a", encoding="utf-8")
        csv_path = folder / f"{name}.csv"
        new = not csv_path.exists() or csv_path.stat().st_size == 0
        self.csv_file: TextIO = csv_path.open("a", encoding="utf-8", newline="")
        self.csv = csv.DictWriter(self.csv_file, fieldnames=fields, extrasaction="ignore")
        if new:
            self.csv.writeheader()

    def add(self, row: dict[str, Any]) -> None:
        self.jsonl.write(json.dumps(row) + "\n")
        self.csv.writerow(row)

    def flush(self) -> None:
        self.jsonl.flush()
        self.csv_file.flush()

    def close(self) -> None:
        self.jsonl.close()
        self.csv_file.close()


class RunLog:
    """The metric files of one task's run (only the main process writes them)."""

    def __init__(self, folder: Path, fresh: bool = True, loggers: tuple[str, ...] = ()):
        if fresh and folder.exists():
            shutil.rmtree(folder)
        folder.mkdir(parents=True, exist_ok=True)
        self.folder = folder
        self.steps = _Table(folder, "steps", STEP_FIELDS)
        self.epochs = _Table(folder, "epochs", EPOCH_FIELDS)
        self.board = None
        self._steps_seen = 0  # TensorBoard's x axis runs on across stages
        self._epochs_seen = 0
        if "tensorboard" in loggers:
            from torch.utils.tensorboard import SummaryWriter

            self.board = SummaryWriter(str(folder / "tensorboard"))

    def step(self, row: dict[str, Any]) -> None:
        self.steps.add(row)
        self._steps_seen += 1
        if self.board is not None:
            for key in ("loss", "lr", "images_per_second"):
                if row.get(key) is not None:
                    self.board.add_scalar(f"step/{key}", row[key], self._steps_seen)

    def epoch(self, row: dict[str, Any]) -> None:
        self.epochs.add(row)
        self.steps.flush()
        self.epochs.flush()
        self._epochs_seen += 1
        if self.board is not None:
            for key in ("loss", "val_accuracy", "lr", "images_per_second"):
                if row.get(key) is not None:
                    self.board.add_scalar(f"epoch/{key}", row[key], self._epochs_seen)
            self.board.flush()

    def close(self) -> None:
        self.steps.close()
        self.epochs.close()
        if self.board is not None:
            self.board.close()
