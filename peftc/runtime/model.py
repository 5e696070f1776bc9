"""The compiled model: an ordinary ``nn.Module`` around the rewritten graph, with tasks and a report."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import fx, nn

from peftc.analysis.trace import trace_info
from peftc.errors import PeftcError
from peftc.language import MethodSpec
from peftc.passes import Ledger
from peftc.runtime.report import Report
from peftc.runtime.schedule import PhaseChange, Schedule
from peftc.runtime.tasks import TaskBank

__all__ = ["BackboneInfo", "Compiled"]


@dataclass(frozen=True)
class BackboneInfo:
    """Enough to rebuild the backbone and to recognise it again (its weight hash, computed when first asked for:
    hashing every weight costs more than a compile, and only saving and loading need it)."""

    id: str
    source: str
    seed: int | None
    weights_file: str | None
    input_size: tuple[int, int, int]
    digest: Callable[[], str] = field(repr=False, compare=False)
    kwargs: tuple[tuple[str, Any], ...] = ()

    @property
    def hash(self) -> str:
        return self.digest()

    def to_dict(self) -> dict[str, Any]:
        """The manifest's ``backbone`` entry."""
        return {"id": self.id, "source": self.source, "seed": self.seed, "weights_file": self.weights_file,
                "input_size": list(self.input_size), "hash": self.hash, "kwargs": [list(kv) for kv in self.kwargs]}


class Compiled(nn.Module):
    """A backbone rewritten by a spec. Train it in any loop; ``save`` writes only its small delta.

    ``parameters()`` holds the active task's tensors plus shared ones; ``trainable_parameters()`` is exactly what
    the spec trains. In ``train()`` mode, normalisation layers whose running statistics the spec froze stay in
    eval mode, so frozen buffers never drift.

    ``net`` is the rewritten graph, or in region mode (a model whose forward does not trace whole) the model
    itself running its rewritten regions; ``graph`` is then the rewritten regions chained, for views and diffs.
    """

    def __init__(self, net: nn.Module, spec: MethodSpec, backbone: BackboneInfo, ledger: Ledger, report: Report,
                 schedule: Schedule | None = None, graph: fx.GraphModule | None = None):
        super().__init__()
        self.net = net
        self._graph = [graph if graph is not None else net]  # in a list: its modules are net's, registered once
        self.regions = trace_info(self.graph).regions  # the traced regions in region mode, else ()
        self.spec = spec
        self.backbone = backbone
        self.ledger = ledger
        self.report = report
        self.bank = TaskBank(net, ledger.tensor_slots, ledger.module_slots)
        self.schedule = schedule or Schedule.constant(
            frozenset(n for n, p in net.named_parameters() if p.requires_grad))
        self.input_size = trace_info(net).input_size  # set when the graph only runs at this (C, H, W)
        self.train(False)

    @property
    def graph(self) -> fx.GraphModule:
        """The rewritten graph (in region mode its regions chained; ``net`` runs them)."""
        return self._graph[0]

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if self.ledger.streams:
            self._check_streams(args, kwargs)
        if self.input_size is not None and args and tuple(getattr(args[0], "shape", ())[1:]) != self.input_size:
            got = "x".join(map(str, getattr(args[0], "shape", ())[1:])) or type(args[0]).__name__
            raise PeftcError(f"this model was traced shape-aware for inputs of {'x'.join(map(str, self.input_size))} "
                             f"(C x H x W), got {got}: sizes the model's code branches on are fixed at compile time")
        return self.net(*args, **kwargs)

    def _check_streams(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        """Second inputs (``stream`` rules) are checked here, so a missing or mis-shaped one is one clear message
        rather than a shape error deep in the graph. They are given by name: ``model(x, memory=m)``."""
        first = args[0] if args else None
        batch = int(first.shape[0]) if isinstance(first, torch.Tensor) and first.dim() else None
        for name, declared in self.ledger.streams.items():
            declared.check(kwargs.get(name), batch)

    def stream_examples(self, batch: int, tokens: int = 2, *, seed: int = 0) -> dict[str, torch.Tensor]:
        """Seeded random values of the second inputs (``stream`` rules), by name: ``model(x, **examples)``."""
        gen = torch.Generator().manual_seed(seed)
        return {name: s.example(batch, tokens, generator=gen) for name, s in self.ledger.streams.items()}

    def train(self, mode: bool = True) -> Compiled:
        super().train(mode)
        if mode:
            for path, module in self.net.named_modules():
                stats = getattr(module, "running_mean", None)
                if isinstance(stats, torch.Tensor) and f"{path}.running_mean" not in self.ledger.updating_buffers:
                    module.eval()
        return self

    # -- tasks ----------------------------------------------------------------------------------------------
    @property
    def tasks(self) -> list[str]:
        return self.bank.names

    @property
    def active_task(self) -> str:
        return self.bank.active

    def add_task(self, name: str, num_classes: int | None = None) -> Compiled:
        """Create a task with its own copy of the spec's task state (and a head of ``num_classes``)."""
        self.bank.add(name, num_classes)
        return self

    def set_task(self, name: str) -> Compiled:
        """Make ``name`` the active task: its tensors and heads are now the model's."""
        self.bank.activate(name)
        self.train(self.training)  # swapped-in modules take the model's mode
        return self

    def _apply(self, fn: Any, recurse: bool = True) -> Compiled:
        """``.to(device)``, ``.half()`` … move every task's state, not only the active one's (see TaskBank.apply)."""
        self.bank.apply(fn)
        return super()._apply(fn, recurse)  # the rest; the active task's tensors are already converted

    # -- parameters -----------------------------------------------------------------------------------------
    def trainable_parameters(self) -> Iterator[nn.Parameter]:
        return (p for p in self.parameters() if p.requires_grad)

    def named_trainable_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        return ((n, p) for n, p in self.net.named_parameters() if p.requires_grad)

    def schedule_at(self, progress: float) -> PhaseChange:
        """Apply the spec's ``schedule:`` at ``progress`` in [0, 1] (e.g. ``epoch / epochs``) to the active task:
        sets ``requires_grad`` and returns what changed (see :mod:`peftc.runtime.schedule`)."""
        return self.schedule.apply(self.net, progress)

    def shared_state(self) -> dict[str, torch.Tensor]:
        """Trained or updating tensors that are not per task, and the frozen ``shared_state`` of blocks (random
        projections): saved once, under ``shared/``."""
        owned = set(self.bank.tensor_slots)
        heads = tuple(f"{p}." for p in self.bank.module_slots)
        scheduled = self.schedule.managed  # what the rules train, whichever schedule phase is active
        out = {n: p.detach() for n, p in self.net.named_parameters() if p.requires_grad or n in scheduled}
        out.update({n: b.detach() for n, b in self.net.named_buffers()
                    if n in self.ledger.updating_buffers or n in self.ledger.kept})
        out.update({n: p.detach() for n, p in self.net.named_parameters() if n in self.ledger.kept})
        return {n: t for n, t in out.items() if n not in owned and not n.startswith(heads)}

    def save(self, directory: str | Path) -> Path:
        """Write ``peftc.json`` and ``delta.safetensors`` to ``directory`` atomically (storage.artifact)."""
        from peftc.storage.artifact import save

        return save(self, directory)

    def load_delta(self, directory: str | Path) -> Compiled:
        """Load a saved delta into this model (it must come from the same spec on the same backbone)."""
        from peftc.storage.artifact import load_into

        return load_into(self, directory)

    def extra_repr(self) -> str:
        return (f"spec={self.spec.name!r}, backbone={self.backbone.id!r}, tasks={self.tasks}, "
                f"active={self.active_task!r}")
