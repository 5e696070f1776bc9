"""Training for compiled models: recipes from the spec, resumable runs, continual-learning sequences.

``peftc train`` / ``peftc eval`` / ``peftc demo-data`` are thin wrappers over this package::

    from peftc.train import TrainOptions, train_task, train_sequence, evaluate
    train_task("out/clr", "task1", "demo/task1", TrainOptions(epochs=3, image_size=32))

Modules, one job each: ``data`` (folders → splits, bad data → clear errors), ``transforms``, ``recipe``
(``train:`` + overrides → optimizer and lr schedule), ``run`` (what stages share), ``stages`` (the stage
registry: fit; methods register their own), ``heads`` (training heads: per task, or a method's own),
``loop`` (epochs, early stopping, checkpoints), ``checkpoint``
(safetensors + JSON, no pickles), ``registry`` (what the trainer remembers per task), ``runner`` (one task),
``evaluate`` (accuracy per task, task selection), ``sequence`` and ``metrics`` (accuracy matrix, forgetting,
heat map), ``distributed`` (torchrun / DDP), ``demo`` (demo data).
"""

from __future__ import annotations

from typing import Any

__all__ = ["TrainOptions", "evaluate", "train_sequence", "train_task"]


def __getattr__(name: str) -> Any:  # keep `import peftc.train` light: submodules load on first use
    if name in ("TrainOptions", "train_task"):
        from peftc.train import runner

        return getattr(runner, name)
    if name == "evaluate":
        from peftc.train.evaluate import evaluate

        return evaluate
    if name == "train_sequence":
        from peftc.train.sequence import train_sequence

        return train_sequence
    raise AttributeError(name)
