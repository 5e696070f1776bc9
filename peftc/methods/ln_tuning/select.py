"""Per-sample task selection for LayerNorm tuning (arXiv 2308.09610), usable from any training loop.

A model compiled with ``ln_tuning`` has one LN row per task in every LayerNorm (``ln_bank``) and one key per
task after the final norm (``task_key``). ``model.set_task(name)`` *forces* a task for the whole batch, as
any peftc model does. :class:`TaskSelector` adds what the method needs beyond that:

* **query** — the CLS token of the final-norm output of the *frozen pretrained* backbone: one extra forward
  with every LN bank set to its pretrained γ/β, stopped right after the final norm;
* **selection** — ``argmax`` over the candidate tasks of ``cos(query, key_t)``, per sample;
* **routing** — a forward in which every LN bank uses each sample's own task row.

The three training stages of the paper map onto it like this (``sel = task_selector(model)``)::

    model.add_task("t3"); model.set_task("t3")                 # rows copied from t2, a fresh orthogonal key
    # (a) keys:   opt = Adam(sel.key_parameters());  loss = sel.key_loss(x)
    # (b) rows:   opt = Adam([*sel.ln_parameters(), *head_params]); loss = CE(mask_logits(model(x), classes), y)
    # (c) head:   opt = Adam(sel.head_parameters()); loss = CE(sel.classify(sel.features(x)), y)
    # inference:  logits = sel(x)   (per-sample predicted task);  sel.predict(x) -> task indices

Stage (b) trains with the *true* task (``set_task``); stage (c) trains the shared head on features made with
the *predicted* task, so the head learns to live with selection errors. No gradient reaches LN rows or keys
through :meth:`features`/:meth:`forward` of other tasks (their rows are read detached).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from contextlib import ExitStack, contextmanager, suppress
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from peftc.errors import TaskError, did_you_mean
from peftc.methods.ln_tuning.blocks import QueryReady, TaskKeyCore, TaskLayerNorm

__all__ = ["TaskSelector", "mask_logits", "task_selector"]

TaskChoice = str | Sequence[str] | torch.Tensor | None


def task_selector(model: Any) -> TaskSelector:
    """The selector of a compiled LN-tuning model (created once, then cached on the model)."""
    cached = model.__dict__.get("_peftc_task_selector")
    if cached is None or cached.model is not model:
        cached = TaskSelector(model)
        model.__dict__["_peftc_task_selector"] = cached
    return cached


def mask_logits(logits: torch.Tensor, classes: Iterable[int]) -> torch.Tensor:
    """Logits with every class outside ``classes`` set to ``-inf`` (stage (b): CE within the task's classes)."""
    keep = torch.zeros(logits.shape[-1], dtype=torch.bool, device=logits.device)
    keep[torch.as_tensor(list(classes), dtype=torch.long, device=logits.device)] = True
    return logits.masked_fill(~keep, float("-inf"))


class TaskSelector:
    """Keys, queries and per-sample routing for a model compiled with ``ln_tuning``."""

    def __init__(self, model: Any):
        self.model = model
        net: nn.Module = model.net
        self._norms = [(path, m) for path, m in net.named_modules() if isinstance(m, TaskLayerNorm)]
        if not self._norms:
            raise TaskError(f"spec {model.spec.name!r} has no ln_bank blocks; per-sample task selection needs "
                            "a model compiled with ln_tuning")
        keys = [(path, m) for path, m in net.named_modules() if isinstance(m, TaskKeyCore)]
        self._key_path, self._key = keys[0] if keys else (None, None)
        self._head = self._find_head(net)
        self._candidates: list[str] | None = None

    @staticmethod
    def _find_head(net: nn.Module) -> list[str]:
        from peftc.analysis.index import NodeIndex, block_positions
        from peftc.analysis.roles import head

        return [str(c.node.target) for c in head(NodeIndex(net, block_positions(net)))]

    # -- which tasks ------------------------------------------------------------------------------------------
    @property
    def candidates(self) -> list[str]:
        """The tasks selection chooses among: set explicitly, else every task except the bank's ``default``
        placeholder (unless it is the only task)."""
        if self._candidates is not None:
            return list(self._candidates)
        tasks = list(self.model.tasks)
        rest = [t for t in tasks if t != "default"]
        return rest or tasks

    @candidates.setter
    def candidates(self, tasks: Sequence[str] | None) -> None:
        if tasks is not None:
            for t in tasks:
                self._check_task(t)
        self._candidates = list(tasks) if tasks is not None else None

    def _check_task(self, name: str) -> None:
        if name not in self.model.tasks:
            raise TaskError(f"unknown task {name!r}" + did_you_mean(name, self.model.tasks)
                            + f"; tasks: {', '.join(self.model.tasks)}")

    # -- parameters of each stage -----------------------------------------------------------------------------
    def key_parameters(self) -> list[nn.Parameter]:
        """Stage (a): the active task's key."""
        return [self._require_key().key]

    def ln_parameters(self) -> list[nn.Parameter]:
        """Stage (b): the active task's LN rows (``w, b`` of every ``ln_bank``)."""
        return [p for _, m in self._norms for p in (m.weight, m.bias)]

    def head_parameters(self) -> list[nn.Parameter]:
        """Stage (c) (and (b)): the classification head's parameters."""
        return [p for path in self._head for p in self.model.net.get_submodule(path).parameters()]

    def _require_key(self) -> TaskKeyCore:
        if self._key is None:
            raise TaskError("this model has no task keys (compiled with keys=false); force tasks with set_task")
        return self._key

    # -- query and keys ---------------------------------------------------------------------------------------
    @torch.no_grad()
    def query(self, x: torch.Tensor) -> torch.Tensor:
        """The CLS token of the frozen pretrained backbone's final-norm output, ``(B, C)``; one partial forward."""
        key = self._require_key()
        with self._frozen_mode(), ExitStack() as stack:
            for _, norm in self._norms:
                stack.enter_context(norm.routed(*norm.pretrained))
            box = stack.enter_context(key.capturing())
            with suppress(QueryReady):
                self.model.net(x)
        if not box:
            raise TaskError("the task key was not reached in the forward pass; is it after the final norm?")
        return box[0]

    def keys(self, tasks: Sequence[str] | None = None) -> torch.Tensor:
        """The keys of ``tasks`` (default: the candidates), ``(T, C)``; the active task's row carries gradients."""
        key = self._require_key()
        names = list(tasks) if tasks is not None else self.candidates
        rows = []
        for name in names:
            self._check_task(name)
            if name == self.model.active_task:
                rows.append(key.key)
            else:
                rows.append(self.model.bank.task_tensors(name)[f"{self._key_path}.key"])
        return torch.stack(rows)

    def key_loss(self, x: torch.Tensor) -> torch.Tensor:
        """Stage (a): ``-mean cos(query, key_active)`` over the batch."""
        query = self.query(x)
        return -F.cosine_similarity(query, self._require_key().key[None], dim=-1).mean()

    @torch.no_grad()
    def similarities(self, x: torch.Tensor) -> torch.Tensor:
        """``cos(query_i, key_t)`` for every sample and candidate task, ``(B, T)``."""
        query = F.normalize(self.query(x), dim=-1)
        keys = F.normalize(self.keys().detach().to(query), dim=-1)
        return query @ keys.T

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        """The selected task of every sample, as indices into :attr:`candidates` (``LongTensor (B,)``)."""
        return self.similarities(x).argmax(dim=-1)

    def predict_names(self, x: torch.Tensor) -> list[str]:
        names = self.candidates
        return [names[i] for i in self.predict(x).tolist()]

    # -- routed forwards --------------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, tasks: TaskChoice = None) -> torch.Tensor:
        """The model's output with each sample's own task rows in every LN.

        ``tasks``: ``None`` → predicted per sample (one extra frozen forward); a task name → that task for all;
        a list of names or a ``LongTensor`` of indices into :attr:`candidates` → given per sample.
        """
        with self.routing(x, tasks):
            return self.model.net(x)

    __call__ = forward

    def features(self, x: torch.Tensor, tasks: TaskChoice = None) -> torch.Tensor:
        """What the head reads (pre-logit features), computed with per-sample task rows (stage (c))."""
        if not self._head:
            raise TaskError("this model has no classification head to read features for")
        head = self.model.net.get_submodule(self._head[0])
        box: list[torch.Tensor] = []

        def grab(_: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
            box.append(args[0])

        handle = head.register_forward_pre_hook(grab)
        try:
            self.forward(x, tasks)
        finally:
            handle.remove()
        return box[0]

    def classify(self, features: torch.Tensor) -> torch.Tensor:
        """The head applied to :meth:`features` (averaged over DeiT's two heads, as the model does)."""
        outs = [self.model.net.get_submodule(path)(features) for path in self._head]
        return outs[0] if len(outs) == 1 else torch.stack(outs).mean(0)

    def route(self, images: torch.Tensor, candidates: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """The contract's task prediction: each image's task among ``candidates`` by its key, and the logits
        of a forward in which every image uses its predicted task's LN rows."""
        self.candidates = candidates
        try:
            with self.routing(images) as index:
                logits = self.model.net(images)
        finally:
            self.candidates = None
        return index, logits

    @contextmanager
    def routing(self, x: torch.Tensor, tasks: TaskChoice = None) -> Iterator[torch.Tensor]:
        """Within this context every forward of ``model.net`` on a batch like ``x`` uses per-sample rows;
        yields the task indices (into the task list used) of each sample."""
        names, index = self._resolve(x, tasks)
        tables = self.row_tables(names)
        with ExitStack() as stack:
            for (_, norm), (w, b) in zip(self._norms, tables):
                stack.enter_context(norm.routed(w[index], b[index]))
            yield index

    def _resolve(self, x: torch.Tensor, tasks: TaskChoice) -> tuple[list[str], torch.Tensor]:
        batch = x.shape[0]
        device = self._norms[0][1].weight.device
        if tasks is None:
            return self.candidates, self.predict(x).to(device)
        if isinstance(tasks, str):
            self._check_task(tasks)
            return [tasks], torch.zeros(batch, dtype=torch.long, device=device)
        if isinstance(tasks, torch.Tensor):
            index = tasks.to(device=device, dtype=torch.long).reshape(-1)
            names = self.candidates
            if index.numel() != batch or (index.numel() and int(index.max()) >= len(names)):
                raise TaskError(f"tasks must give one index < {len(names)} per sample ({batch})")
            return names, index
        names = list(dict.fromkeys(tasks))
        for name in names:
            self._check_task(name)
        if len(tasks) != batch:
            raise TaskError(f"tasks must name one task per sample: got {len(tasks)} for a batch of {batch}")
        lookup = {n: i for i, n in enumerate(names)}
        return names, torch.tensor([lookup[t] for t in tasks], dtype=torch.long, device=device)

    @property
    def norm_paths(self) -> list[str]:
        """The module paths of the LN banks, in the order of :meth:`row_tables`."""
        return [path for path, _ in self._norms]

    def row_tables(self, names: Sequence[str]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """For each LN bank, ``(T, C)`` weight and bias tables over ``names`` (the active task's rows live)."""
        active = self.model.active_task
        saved = {n: self.model.bank.task_tensors(n) for n in names if n != active}
        tables = []
        for path, norm in self._norms:
            ws = [norm.weight if n == active else saved[n][f"{path}.weight"] for n in names]
            bs = [norm.bias if n == active else saved[n][f"{path}.bias"] for n in names]
            tables.append((torch.stack(ws), torch.stack(bs)))
        return tables

    @contextmanager
    def _frozen_mode(self) -> Iterator[None]:
        """Eval mode for the frozen pass (no dropout), restoring the model's mode afterwards."""
        was_training = self.model.training
        self.model.train(False)
        try:
            yield
        finally:
            self.model.train(was_training)
