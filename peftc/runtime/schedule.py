"""Training schedules: which of the spec's trainable tensors learn at each point of training.

A spec's ``schedule:`` is a list of phases, each starting at a fraction of training (``from``) and naming what
trains from then on (``train: all`` or a list of selectors)::

    schedule:                                   # ConFiT's hierarchical fine-tuning
      - {from: 0.0, train: [{role: head}]}
      - {from: 0.2, train: [{role: head}, {type: _BatchNorm}]}
      - {from: 0.5, train: all}

The selectors are resolved once, at compile time, against the rewritten graph (so a typo fails at compile time
with its position in the spec) into parameter *names*. Any training loop then calls
``model.schedule_at(progress)`` with ``progress`` in ``[0, 1]`` (e.g. ``epoch / epochs``); it sets
``requires_grad`` on the live tensors of the active task — names, not objects, so it follows task switches —
and returns what changed. A schedule narrows what the rules train and never unfreezes what they froze, so the
artifact (which stores what the rules train) is the same whichever phase it is saved in.

Build the optimizer over :meth:`Schedule.parameters` (every tensor the schedule may enable): parameters
without gradients are skipped by every torch optimizer, so one optimizer serves all phases.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

from torch import nn

from peftc.analysis.index import Candidate
from peftc.analysis.select import select
from peftc.errors import PeftcError, SpecError
from peftc.language import Phase

if TYPE_CHECKING:
    from peftc.passes import CompileState

__all__ = ["PhaseChange", "Schedule", "ScheduleError", "build_schedule"]


class ScheduleError(PeftcError):
    """A schedule was applied with an impossible progress value."""


@dataclass(frozen=True)
class ResolvedPhase:
    start: float
    label: str
    names: frozenset[str]


@dataclass(frozen=True)
class PhaseChange:
    """What :meth:`Schedule.apply` did: the phase now active and the parameters it switched on and off."""

    phase: int
    label: str
    start: float
    trained: tuple[str, ...]  # became trainable
    frozen: tuple[str, ...]  # stopped training

    @property
    def changed(self) -> bool:
        return bool(self.trained or self.frozen)


@dataclass(frozen=True)
class Schedule:
    """Phases resolved to parameter names over ``managed``: every parameter the rules made trainable."""

    phases: tuple[ResolvedPhase, ...]
    managed: frozenset[str]

    @classmethod
    def constant(cls, managed: frozenset[str]) -> Schedule:
        """No ``schedule:`` in the spec: one phase, everything the rules train."""
        return cls((ResolvedPhase(0.0, "all", managed),), managed)

    def index_at(self, progress: float) -> int:
        if not 0.0 <= progress <= 1.0:
            raise ScheduleError(f"training progress must be within [0, 1], got {progress}")
        return max(i for i, p in enumerate(self.phases) if p.start <= progress)

    def parameters(self, net: nn.Module) -> Iterator[nn.Parameter]:
        """The live parameters any phase may train (build one optimizer over these)."""
        return (p for n, p in net.named_parameters() if n in self.managed)

    def apply(self, net: nn.Module, progress: float) -> PhaseChange:
        """Make exactly the phase's parameters trainable among the managed ones; report the difference."""
        i = self.index_at(progress)
        phase = self.phases[i]
        trained, frozen = [], []
        for name, p in net.named_parameters():
            if name not in self.managed:
                continue
            want = name in phase.names
            if p.requires_grad != want:
                (trained if want else frozen).append(name)
                p.requires_grad_(want)
        return PhaseChange(i, phase.label, phase.start, tuple(trained), tuple(frozen))


def _params_of(cand: Candidate, inserted: dict[str, str], patterns: list[str]) -> Iterator[str]:
    """Qualified names of a node's parameters (its own, not those of blocks inserted inside it)."""

    def wanted(local: str) -> bool:
        leaf = local.rsplit(".", 1)[-1]
        return any(fnmatch.fnmatchcase(local, p) or fnmatch.fnmatchcase(leaf, p) for p in patterns)

    if cand.module is not None:
        base = str(cand.node.target)
        for local, _ in cand.module.named_parameters():
            owner = local.split(".")[:-1]
            if any(f"{base}.{'.'.join(owner[:i])}" in inserted for i in range(1, len(owner) + 1)):
                continue
            if wanted(local):
                yield f"{base}.{local}"
    elif isinstance(cand.tensor, nn.Parameter) and wanted(cand.name.rsplit(".", 1)[-1]):
        yield cand.name


def _resolve(phase: Phase, i: int, state: CompileState, managed: frozenset[str]) -> frozenset[str]:
    if phase.train == "all":
        return managed
    spec = state.spec
    names: set[str] = set()
    for j, sel in enumerate(phase.train):
        path = ("schedule", i, "train", j)
        patterns = [sel.params] if isinstance(sel.params, str) else sel.params
        matched = select(sel, state.index, lambda key, path=path: spec.locate((*path, *key)))
        found = {n for c in matched for n in _params_of(c, state.ledger.inserted, patterns)}
        if not found & managed and not sel.optional:
            raise SpecError(
                f"selects no parameter that the rules train ({sel.describe()}); a schedule only narrows what "
                "the rules train", spec.locate(path))
        names |= found & managed
    return frozenset(names)


def build_schedule(state: CompileState) -> Schedule:
    """Resolve the spec's schedule against a finished compilation."""
    managed = frozenset(n for n, p in state.gm.named_parameters() if p.requires_grad)
    spec = state.spec
    if not spec.schedule:
        return Schedule.constant(managed)
    phases = tuple(
        ResolvedPhase(p.from_, p.label or f"phase{i}", _resolve(p, i, state, managed))
        for i, p in enumerate(spec.schedule)
    )
    return Schedule(phases, managed)
