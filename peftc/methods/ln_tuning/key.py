"""The task key as a block of the contract: :class:`~peftc.methods.ln_tuning.blocks.TaskKeyCore` plus what the
method offers the rest of peftc through it — task prediction for task-agnostic evaluation (the keys' argmax)
and the ``select_task`` deploy mode (one graph that picks each sample's task itself).

It is a subclass living apart from the key's mechanics so that the selector and the deployment, which need
those mechanics, never import the hooks that point back at them.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from torch import nn

from peftc.blocks.contract import Deployment, TaskPredictor
from peftc.blocks.registry import Site, block_factory
from peftc.methods.ln_tuning.args import TaskKeyArgs
from peftc.methods.ln_tuning.blocks import TaskKeyCore
from peftc.methods.ln_tuning.deploy import select_task
from peftc.methods.ln_tuning.select import task_selector

__all__ = ["TaskKey", "task_key"]


class TaskKey(TaskKeyCore):
    """A task key whose model can predict each image's task (and deploy as one task-selecting graph)."""

    @classmethod
    def task_predictor(cls, model: Any) -> TaskPredictor:
        return task_selector(model)

    @classmethod
    def deploy_modes(cls) -> Mapping[str, Callable[[Any], Deployment]]:
        return {"select_task": select_task}


@block_factory("task_key")
def task_key(site: Site, args: TaskKeyArgs) -> nn.Module:
    """A per-task key (orthogonal init) that reads the CLS query after the final norm; identity on the data."""
    dim = site.channels("output")
    block = TaskKey(dim, args.seed)
    module = site.module
    weight = next(module.parameters(), None) if module is not None else None
    if weight is not None:
        block.to(device=weight.device, dtype=weight.dtype)
    return block
