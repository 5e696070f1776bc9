"""What the trainer remembers about an artifact's tasks: ``<artifact>/train/tasks.json``.

The artifact knows each task's tensors and class count; evaluation also needs the class *names* in label
order (to read a data folder the way training read it), and a resumed run needs to know what it was doing.
One JSON file, replaced atomically, holds per task: classes, data folder, recipe, status (``running`` /
``finished``), the epoch history and the final validation accuracy, plus how tasks were trained (``head``:
the training head's name) and in which order.

A task counts as finished only when it is ``finished`` here *and* present in the artifact's manifest, so an
interruption between the two writes is resumed, never mistaken for a finished task.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from peftc.storage.artifact import read_manifest
from peftc.storage.atomic import write_file
from peftc.train.data import DataError

__all__ = ["TRAIN_DIR", "Journal"]

TRAIN_DIR = "train"
FILE = "tasks.json"


class Journal:
    """Read-modify-write access to ``<artifact>/train/tasks.json``."""

    def __init__(self, artifact: Path):
        self.artifact = Path(artifact)
        self.root = self.artifact / TRAIN_DIR
        self.path = self.root / FILE
        self.data: dict[str, Any] = {"tasks": {}, "order": []}
        if self.path.is_file():
            try:
                self.data = json.loads(self.path.read_text(encoding="utf-8"))
            except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
                raise DataError(f"{self.path} is unreadable: {exc}") from None
            shape = self.data if isinstance(self.data, dict) else {}
            if not isinstance(shape.get("tasks"), dict) or not isinstance(shape.get("order"), list):
                raise DataError(f"{self.path} is not a peftc training journal (expected 'tasks' and 'order')")

    def task(self, name: str) -> dict[str, Any] | None:
        return self.data["tasks"].get(name)

    def finished(self, name: str) -> bool:
        entry = self.task(name)
        if entry is None or entry.get("status") != "finished":
            return False
        return name in {t["name"] for t in read_manifest(self.artifact)["tasks"]}

    def trained_tasks(self) -> list[str]:
        """Finished tasks in training order."""
        return [t for t in self.data["order"] if self.finished(t)]

    def update(self, name: str, **fields: Any) -> None:
        entry = self.data["tasks"].setdefault(name, {})
        entry.update(fields)
        if name not in self.data["order"]:
            self.data["order"].append(name)
        self.write()

    def write(self) -> None:
        write_file(self.path, json.dumps(self.data, indent=1, default=str) + "\n")
