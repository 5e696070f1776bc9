"""LN tuning's task-agnostic deployment (``--select-task``): one graph that picks every sample's task itself.

A frozen pass (every LN at its pretrained γ/β, stopped after the final norm) gives each sample's query, the task
is ``argmax cos(query, key_t)`` over the task keys, and a second pass takes each sample's LN rows from ``(T, C)``
tables by that index — :class:`~peftc.methods.ln_tuning.select.TaskSelector`'s forward, as one exportable graph.
The task key offers it as the ``select_task`` deploy mode of the block contract.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn

from peftc.blocks.contract import Deployment
from peftc.errors import TaskError
from peftc.export.errors import ExportError
from peftc.export.multitask import task_placeholder
from peftc.methods.ln_tuning.blocks import TaskKeyCore
from peftc.methods.ln_tuning.select import task_selector

__all__ = ["KeySelected", "RoutedLayerNorm", "key_selected_graph", "select_task"]


class RoutedLayerNorm(nn.Module):
    """A LayerNorm taking each sample's affine row from ``(T, *shape)`` tables by its task index."""

    def __init__(self, normalized_shape: tuple[int, ...], eps: float, weight: torch.Tensor, bias: torch.Tensor):
        super().__init__()
        self.normalized_shape = tuple(normalized_shape)
        self.eps = eps
        self.register_buffer("weight", weight.detach().clone())
        self.register_buffer("bias", bias.detach().clone())

    def forward(self, x: torch.Tensor, task: torch.Tensor) -> torch.Tensor:
        y = F.layer_norm(x, self.normalized_shape, None, None, self.eps)
        view = (-1,) + (1,) * (y.dim() - 1 - len(self.normalized_shape)) + self.normalized_shape
        return y * self.weight[task].reshape(view) + self.bias[task].reshape(view)


class KeySelected(nn.Module):
    """LN tuning's task-agnostic inference: pick each sample's task by its key, then run with that task's rows."""

    def __init__(self, query: fx.GraphModule, keys: torch.Tensor, routed: fx.GraphModule):
        super().__init__()
        self.query = query
        self.register_buffer("keys", F.normalize(keys.detach().clone(), dim=-1))
        self.routed = routed

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        query = F.normalize(self.query(image), dim=-1)
        return self.routed(image, task=(query @ self.keys.T).argmax(dim=-1))


@dataclass
class SelectedTasks:
    """The key-selecting graph (input: image only) and the tasks it chooses among, in key order."""

    module: KeySelected
    tasks: list[str]


def key_selected_graph(model: Any) -> SelectedTasks:
    """One graph for a model compiled with ``ln_tuning`` (with keys) that selects every sample's task itself.

    The query pass and the routed pass are two graphs over the *same* frozen modules (only the LN banks
    differ), so the backbone's weights are stored once.
    """
    try:
        selector = task_selector(model)
        keys = selector.keys().detach()
    except TaskError as exc:
        raise ExportError(f"--select-task needs task keys (a model compiled with ln_tuning): {exc}") from None
    tasks = selector.candidates
    routed = copy.deepcopy(model.net).eval()
    for p in routed.parameters():
        p.requires_grad_(False)
    query = fx.GraphModule(routed, copy.deepcopy(routed.graph))  # shares routed's modules, not its containers
    key = next((n for n in query.graph.nodes
                if n.op == "call_module" and isinstance(query.get_submodule(str(n.target)), TaskKeyCore)), None)
    if key is None:
        raise ExportError("--select-task: the task key is not called in the graph")
    with query.graph.inserting_after(key):
        cls = query.graph.call_function(TaskKeyCore.query_of, (key.args[0],))
    next(n for n in query.graph.nodes if n.op == "output").args = (cls,)
    query.graph.eliminate_dead_code()
    task_input = task_placeholder(routed.graph)
    for path, (weight, bias) in zip(selector.norm_paths, selector.row_tables(tasks), strict=True):
        bank = routed.get_submodule(path)
        pretrained = nn.LayerNorm(bank.normalized_shape, eps=bank.eps).to(bank.weight).requires_grad_(False)
        with torch.no_grad():
            pretrained.weight.copy_(bank.pretrained[0])
            pretrained.bias.copy_(bank.pretrained[1])
        query.set_submodule(path, _adopt(pretrained, bank))
        routed.set_submodule(path, _adopt(RoutedLayerNorm(bank.normalized_shape, bank.eps, weight, bias), bank))
        for node in routed.graph.nodes:
            if node.op == "call_module" and node.target == path:
                node.kwargs = {**node.kwargs, "task": task_input}
    routed.set_submodule(str(key.target), nn.Identity())  # on the data path the key is an identity
    for part in (query, routed):
        part.delete_all_unused_submodules()
        part.graph.lint()
        part.recompile()
    return SelectedTasks(KeySelected(query, keys, routed).eval(), tasks)


def _adopt(new: nn.Module, old: nn.Module) -> nn.Module:
    """``new`` with ``old``'s children (blocks inserted after a layer live under it: ``norm.task_key``)."""
    for name, child in old.named_children():
        new.add_module(name, child)
    return new


def select_task(model: Any) -> Deployment:
    """The ``select_task`` deploy mode: the key-selecting graph, checked against the eager selector."""
    selected = key_selected_graph(model)
    selector = task_selector(copy.deepcopy(model).eval())

    def reference(x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return selector(x)

    return Deployment(selected.module, selected.tasks, reference)
