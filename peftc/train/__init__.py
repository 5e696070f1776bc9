"""Training for compiled models: recipes from the spec, resumable runs, continual-learning sequences.

``peftc train`` / ``peftc eval`` / ``peftc demo-data`` are thin wrappers over this package::

    from peftc.train import TrainOptions, train_task, train_sequence, evaluate
    train_task("out/clr", "task1", "demo/task1", TrainOptions(epochs=3, image_size=32))

Modules, one job each: ``data`` (folders → splits, bad data → clear errors), ``transforms``, ``recipe``
(``train:`` + overrides → optimizer and lr schedule), ``context`` (what a task's stages share), ``stages`` (the stage
registry: fit; methods register their own), ``heads`` (training heads: per task, or a method's own),
``epochs`` (the epoch loop, early stopping, checkpoints), ``step`` (one optimizer step: accumulation, loss
scaling, clipping), ``precision`` (autocast, GradScaler, frozen 16-bit weights), ``logs`` (JSONL/CSV/TensorBoard
metrics), ``checkpoint`` (safetensors + JSON, no pickles), ``journal`` (what the trainer remembers per task),
``task`` (one task), ``evaluation`` (accuracy per task, task selection), ``sequence`` and ``metrics`` (accuracy
matrix, the field's metrics, heat map), ``split`` (data sets → continual-learning sequences), ``distributed``
(torchrun / DDP), ``sharding`` (FSDP2), ``demo`` (demo data).
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = ["TrainOptions", "evaluate", "train_sequence", "train_task"]


_API = {"TrainOptions": "peftc.train.task", "train_task": "peftc.train.task", "evaluate": "peftc.train.evaluation",
        "train_sequence": "peftc.train.sequence"}


def __getattr__(name: str) -> Any:  # keep `import peftc.train` light: submodules load on first use
    if name not in _API:
        raise AttributeError(name)
    return getattr(importlib.import_module(_API[name]), name)
