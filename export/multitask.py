"""One graph for a whole task bank: a ``task`` input picks each sample's task parameters.

A compiled model keeps one copy of its task state per task (CLR kernels, BatchNorm, heads, LoRA factors,
…) and swaps them in with ``set_task``. To deploy every task in one file, :func:`all_tasks_graph` rewrites a
copy of the graph so that each module owning task state becomes a :class:`TaskRouter`: it holds that module
once per task, runs every copy on the batch and keeps, for each sample, the output of the copy its ``task``
id names.
Everything the tasks share (the frozen backbone) runs once, on the mixed batch — so the extra cost is the
task-owned modules times the number of tasks, which for parameter-efficient methods is small.

Heads with different class counts are padded to the largest one with ``-inf`` (softmax gives those classes
zero probability); a task id outside ``0..T-1`` yields ``NaN`` rows rather than another task's answer.
Per-sample routing is exact because every routed module treats samples independently at inference (BatchNorm
uses its running statistics). Blocks that route tasks themselves (overriding the contract's ``set_task``)
are not supported here.

A graph that picks each sample's task *itself* (no task input) is a deploy mode a block offers through the
contract (``deploy_modes()["select_task"]``, :mod:`peftc.blocks.contract`); :func:`task_placeholder` is the task
input such graphs route with internally.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn

from peftc.blocks.contract import offers
from peftc.export.errors import ExportError

__all__ = ["AllTasks", "TaskRouter", "all_tasks_graph", "task_placeholder"]


class TaskRouter(nn.Module):
    """Runs one copy of a module per task and keeps, per sample, the output of that sample's task."""

    def __init__(self, branches: list[nn.Module]):
        super().__init__()
        self.branches = nn.ModuleList(branches)

    def forward(self, *args: Any, task: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        outs = [branch(*args, **kwargs) for branch in self.branches]
        width = max(o.shape[-1] for o in outs)
        outs = [o if o.shape[-1] == width else F.pad(o, (0, width - o.shape[-1]), value=float("-inf"))
                for o in outs]
        shape = (-1,) + (1,) * (outs[0].dim() - 1)
        result = torch.where((task == 0).view(shape), outs[0], torch.full_like(outs[0], float("nan")))
        for index, out in enumerate(outs[1:], start=1):
            result = torch.where((task == index).view(shape), out, result)
        return result


@dataclass
class AllTasks:
    """The routed graph (inputs: image, task id per sample), the task order and each task's class count."""

    module: fx.GraphModule
    tasks: list[str]
    classes: list[int | None]
    routed: list[str]


def _owner(path: str, called: set[str]) -> str | None:
    """The module call that reads a tensor or submodule at ``path``: its longest called prefix."""
    parts = path.split(".")
    for end in range(len(parts), 0, -1):
        prefix = ".".join(parts[:end])
        if prefix in called:
            return prefix
    return None


def all_tasks_graph(model: Any) -> AllTasks:
    """A copy of ``model``'s graph serving all its tasks at once, chosen per sample by a ``task`` input."""
    bank = model.bank
    aware = [p for p, m in model.net.named_modules() if offers(m, "set_task")]
    if aware:
        raise ExportError(f"--all-tasks cannot route blocks that select tasks themselves ({aware[0]}); "
                          "export one task at a time with --task")
    tasks = list(bank.names)
    work = copy.deepcopy(model)
    gm = work.net
    called = {str(n.target) for n in gm.graph.nodes if n.op == "call_module"}
    owners: set[str] = set()
    for name in (*bank.tensor_slots, *bank.module_slots):
        path = name.rpartition(".")[0] if name in bank.tensor_slots else name
        owner = _owner(path, called)
        if owner is None:
            raise ExportError(f"--all-tasks cannot route task state {name!r}: no module call reads it")
        owners.add(owner)
    if not owners:
        raise ExportError(f"spec {model.spec.name!r} keeps no per-task state: one export serves every task")
    # A routed module's own children that the graph calls separately (a CLR block under its conv) are kept
    # out of the copies and hung back under the router, so their own calls still resolve.
    children = {p: _called_children(p, called) for p in owners}
    branches: dict[str, list[nn.Module]] = {p: [] for p in owners}
    for task in tasks:
        work.set_task(task)
        for path in owners:
            module = gm.get_submodule(path)
            kept = {name: module._modules.pop(name) for name in children[path]}
            branches[path].append(copy.deepcopy(module))
            module._modules.update(kept)
    _share_frozen(branches, bank)
    graph = gm.graph
    task_input = task_placeholder(graph)
    for path in sorted(owners, key=lambda p: -p.count(".")):  # children before parents
        module = gm.get_submodule(path)
        router = TaskRouter(branches[path])
        for name in children[path]:
            router.add_module(name, module.get_submodule(name))
        gm.set_submodule(path, router)
        for node in graph.nodes:
            if node.op == "call_module" and node.target == path:
                node.kwargs = {**node.kwargs, "task": task_input}
    graph.lint()
    gm.recompile()
    gm.eval()
    for p in gm.parameters():
        p.requires_grad_(False)
    return AllTasks(gm, tasks, [bank.classes(t) for t in tasks], sorted(owners))


def _called_children(path: str, called: set[str]) -> list[str]:
    """Names of ``path``'s submodules that the graph calls on their own (direct children only)."""
    out = []
    for other in called:
        if other.startswith(path + "."):
            rest = other[len(path) + 1:]
            if "." in rest and f"{path}.{rest.split('.')[0]}" not in called:
                raise ExportError(f"--all-tasks cannot route {path!r}: {other!r}, deep inside it, is called "
                                  "on its own")
            if "." not in rest:
                out.append(rest)
    return out


def _share_frozen(branches: dict[str, list[nn.Module]], bank: Any) -> None:
    """Copies of a routed module share the tensors no task owns (e.g. a frozen weight next to a task bias)."""
    owned = set(bank.tensor_slots)
    heads = tuple(bank.module_slots)
    for path, copies in branches.items():
        if path in heads or path.startswith(tuple(h + "." for h in heads)):
            continue
        first = copies[0]
        for other in copies[1:]:
            for sub_name, sub in other.named_modules():
                ref = first.get_submodule(sub_name) if sub_name else first
                for attr in list(sub._parameters):
                    full = ".".join(x for x in (path, sub_name, attr) if x)
                    if full not in owned and sub._parameters[attr] is not None:
                        sub._parameters[attr] = ref._parameters[attr]
                for attr in list(sub._buffers):
                    full = ".".join(x for x in (path, sub_name, attr) if x)
                    if full not in owned and sub._buffers[attr] is not None:
                        sub._buffers[attr] = ref._buffers[attr]


def task_placeholder(graph: fx.Graph) -> fx.Node:
    """A ``task`` input right after the image: before the defaulted inputs timm's traced graphs carry
    (``attn_mask=None``, ``is_causal=False``), so ``module(image, task)`` binds it."""
    image = next(n for n in graph.nodes if n.op == "placeholder")
    with graph.inserting_after(image):
        return graph.placeholder("task")
