"""The task bank: per-task copies of whatever a spec marks as task state.

Each task owns its own Parameter and buffer *objects* for every task slot (and its own module for every module
slot, e.g. a head with its own class count). Switching tasks puts that task's objects into the model: nothing
is copied, so an optimizer built for task A keeps pointing at A's tensors, and training task B cannot change a
single bit of A (zero forgetting by construction). New tasks start from the compile-time values (``new``) or
from the most recently added task (``inherit``).

Blocks that must see every task at once (per-sample task routing) override the contract's
``add_task(name, source)`` and ``set_task(name)`` (:mod:`peftc.blocks.contract`); the bank calls them alongside
its own bookkeeping.
A block whose per-task tensors must start from something else than a copy (orthogonal task keys: each new
task's key is the next orthogonal direction), or that can make its initial values again (LoRA from its seed),
overrides ``init_task(name, tensors)``: it receives the new task's own tensors under that module, by relative
name, and fills them in place; its ``new`` tensors arrive unfilled. The bank snapshots at compile time only the
``new`` state that no block makes again (heads, BitFit biases), so the model at rest holds no second copy of
what can be regenerated.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field

import torch
from torch import nn

from peftc.blocks.contract import offers
from peftc.errors import TaskError, did_you_mean
from peftc.language.schema import MAX_CLASSES
from peftc.passes import ModuleSlot, TensorSlot

__all__ = ["TaskBank"]

DEFAULT_TASK = "default"


@dataclass
class _Task:
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    modules: dict[str, nn.Module] = field(default_factory=dict)
    classes: int | None = None


def _split(name: str) -> tuple[str, str]:
    path, _, attr = name.rpartition(".")
    return path, attr


def _clone(tensor: torch.Tensor, is_param: bool) -> torch.Tensor:
    data = tensor.detach().clone()
    return nn.Parameter(data, requires_grad=tensor.requires_grad) if is_param else data


def _unfilled(tensor: torch.Tensor, is_param: bool) -> torch.Tensor:
    """Storage like ``tensor``'s for a block's ``init_task`` to fill."""
    data = torch.empty_like(tensor.detach())
    return nn.Parameter(data, requires_grad=tensor.requires_grad) if is_param else data


def _under(name: str, path: str) -> bool:
    return not path or name.startswith(f"{path}.")


class TaskBank:
    """Per-task state for one compiled model (``root`` is the rewritten GraphModule)."""

    def __init__(
        self,
        root: nn.Module,
        tensor_slots: Mapping[str, TensorSlot],
        module_slots: Mapping[str, ModuleSlot],
        default: str = DEFAULT_TASK,
    ):
        self.root = root
        self.tensor_slots = dict(tensor_slots)
        self.module_slots = dict(module_slots)
        live = _Task(
            tensors={name: self._get_tensor(name) for name in self.tensor_slots},
            modules={path: root.get_submodule(path) for path in self.module_slots},
        )
        live.classes = self._classes_of(live)
        makers = [p for p, m in root.named_modules() if offers(m, "init_task")]
        snapshot = {n: s for n, s in self.tensor_slots.items()
                    if s.policy != "inherit" and not any(_under(n, p) for p in makers)}
        self._initial = _Task(  # what a ``new`` task starts from and nothing else can make again
            tensors={n: _clone(live.tensors[n], s.is_param) for n, s in snapshot.items()},
            modules={p: copy.deepcopy(m) for p, m in live.modules.items() if self.module_slots[p].policy != "inherit"},
            classes=live.classes,
        )
        self._tasks: dict[str, _Task] = {default: live}
        self.active = default

    # -- queries --------------------------------------------------------------------------------------------
    @property
    def names(self) -> list[str]:
        return list(self._tasks)

    def __contains__(self, name: object) -> bool:
        return name in self._tasks

    def classes(self, name: str) -> int | None:
        return self._task(name).classes

    def _task(self, name: str) -> _Task:
        if name not in self._tasks:
            known = ", ".join(self._tasks)
            raise TaskError(f"unknown task {name!r}" + did_you_mean(name, self._tasks) + f"; tasks: {known}")
        return self._tasks[name]

    def _classes_of(self, task: _Task) -> int | None:
        for module in task.modules.values():
            out = getattr(module, "out_features", None)
            if isinstance(out, int):
                return out
        return None

    def _aware(self) -> Iterator[nn.Module]:
        return (m for m in self.root.modules() if offers(m, "set_task"))

    # -- changes --------------------------------------------------------------------------------------------
    def add(self, name: str, num_classes: int | None = None) -> None:
        """Create task ``name`` (``num_classes`` resizes per-task heads); does not switch to it."""
        if not name or not isinstance(name, str) or "/" in name:
            raise TaskError(f"task names are non-empty strings without '/', got {name!r}")
        if name in self._tasks:
            raise TaskError(f"task {name!r} already exists")
        if num_classes is not None and not self.module_slots:
            raise TaskError("this spec has no per-task head, so num_classes cannot be set per task")
        if num_classes is not None and not 1 <= num_classes <= MAX_CLASSES:
            raise TaskError(f"num_classes must be between 1 and {MAX_CLASSES:,}, got {num_classes}")
        previous_name = next(reversed(self._tasks))
        previous = self._tasks[previous_name]
        task = _Task()
        for slot_name, slot in self.tensor_slots.items():
            if slot.policy == "inherit":
                task.tensors[slot_name] = _clone(previous.tensors[slot_name], slot.is_param)
            elif slot_name in self._initial.tensors:
                task.tensors[slot_name] = _clone(self._initial.tensors[slot_name], slot.is_param)
            else:  # a block's init_task makes it again
                task.tensors[slot_name] = _unfilled(previous.tensors[slot_name], slot.is_param)
        for path, mslot in self.module_slots.items():
            source = previous if mslot.policy == "inherit" else self._initial
            template = source.modules[path]
            same = num_classes is None or num_classes == getattr(template, "out_features", None)
            task.modules[path] = copy.deepcopy(template) if same else mslot.make(num_classes, template)
        task.classes = self._classes_of(task)
        self._tasks[name] = task
        self._init_task(name, task)
        for module in self._aware():
            module.add_task(name, previous_name)

    def _init_task(self, name: str, task: _Task) -> None:
        """Let blocks that override ``init_task`` fill a new task's tensors (see the module docstring)."""
        for path, module in self.root.named_modules():
            if not offers(module, "init_task"):
                continue
            prefix = f"{path}." if path else ""
            own = {key[len(prefix):]: tensor for key, tensor in task.tensors.items() if _under(key, path)}
            module.init_task(name, own)

    def activate(self, name: str) -> None:
        """Put task ``name``'s tensors and modules into the model."""
        task = self._task(name)
        for slot_name, tensor in task.tensors.items():
            path, attr = _split(slot_name)
            owner = self.root.get_submodule(path) if path else self.root
            if self.tensor_slots[slot_name].is_param:
                owner._parameters[attr] = tensor  # type: ignore[assignment]
            else:
                owner._buffers[attr] = tensor
        for path, module in task.modules.items():
            parent_path, attr = _split(path)
            parent = self.root.get_submodule(parent_path) if parent_path else self.root
            setattr(parent, attr, module)
        for module in self._aware():
            module.set_task(name)
        self.active = name

    def apply(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
        """Apply ``fn`` (a device move or dtype cast, as ``nn.Module._apply`` gets it) to every task's state.

        Parameters change in place (optimizers keep pointing at them); buffers are replaced in the bank; the
        compile-time snapshot moves too, so a later ``new`` task lands where the model is. The active task is then
        put back into the model, so the live graph and the bank hold the same objects.
        """
        for task in (*self._tasks.values(), self._initial):
            for name, tensor in task.tensors.items():
                if isinstance(tensor, nn.Parameter):
                    tensor.data = fn(tensor.data)
                else:
                    task.tensors[name] = fn(tensor)
            for module in task.modules.values():
                module._apply(fn)
        self.activate(self.active)

    def _get_tensor(self, name: str) -> torch.Tensor:
        path, attr = _split(name)
        owner = self.root.get_submodule(path) if path else self.root
        return getattr(owner, attr)

    # -- persistence ----------------------------------------------------------------------------------------
    def task_tensors(self, name: str) -> dict[str, torch.Tensor]:
        """Every tensor task ``name`` owns, by qualified name (module slots expanded to their state dicts)."""
        task = self._task(name)
        out = {k: v.detach() for k, v in task.tensors.items()}
        for path, module in task.modules.items():
            out.update({f"{path}.{k}": v.detach() for k, v in module.state_dict().items()})
        return out

    def load_task_tensors(self, name: str, tensors: Mapping[str, torch.Tensor]) -> None:
        """Copy saved values into task ``name`` (shapes must match: create the task with its class count first)."""
        expected = self.task_tensors(name)
        missing = sorted(set(expected) - set(tensors))
        extra = sorted(set(tensors) - set(expected))
        if missing or extra:
            raise TaskError(
                f"task {name!r}: saved state does not fit this model"
                + (f"; missing {missing[:3]}" if missing else "") + (f"; unexpected {extra[:3]}" if extra else "")
            )
        with torch.no_grad():
            for key, value in tensors.items():
                target = expected[key]
                if target.shape != value.shape:
                    shapes = f"{tuple(value.shape)}, model has {tuple(target.shape)}"
                    raise TaskError(f"task {name!r}: {key} has shape {shapes}")
                target.copy_(value)  # in place: the task keeps its own tensor objects
