"""The training recipe: a spec's ``train:`` section with the user's overrides, and what it builds.

Precedence, lowest first: peftc's defaults (:class:`~peftc.language.TrainSection`), the spec's ``train:``, then
``--recipe key=value`` / the CLI's own flags. A stage (``train.stages[i]``) overrides the recipe for itself;
``--epochs N`` also caps every stage at N epochs, so one flag shortens a whole multi-stage procedure.

The learning-rate schedule is a pure function of the global step (:class:`LRSchedule`), so resuming only
needs the step count; it is applied per batch, so warm-up ramps smoothly and ``StepLR(20, 0.1)`` decays at
epoch boundaries exactly like torch's per-epoch StepLR.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from pydantic import ValidationError

from peftc.errors import PeftcError, did_you_mean
from peftc.language import SchedulerArgs, StageDecl, TrainSection

__all__ = ["LRSchedule", "RecipeError", "build_optimizer", "parse_recipe_overrides", "resolve", "stage_recipe"]


class RecipeError(PeftcError):
    """A recipe override does not fit the ``train:`` schema."""


def parse_recipe_overrides(items: Iterable[str] | None) -> dict[str, Any]:
    """``["lr=0.01", "scheduler.name=cosine"]`` → a nested mapping (values read as YAML)."""
    from peftc.language.reader import read_yaml

    out: dict[str, Any] = {}
    for item in items or []:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise RecipeError(f"--recipe expects key=value, got {item!r}")
        try:
            value = read_yaml(raw, None, RecipeError).data if raw.strip() else ""
        except RecipeError:
            value = raw  # not YAML: the text itself
        node = out
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise RecipeError(f"--recipe {key}: {part} is set to a value and a section at once")
        node[parts[-1]] = value
    return out


def _merge(base: dict[str, Any], extra: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def resolve(section: TrainSection | None, overrides: Mapping[str, Any] | None = None) -> TrainSection:
    """The recipe to train with: ``section`` (or the defaults) with ``overrides`` merged in and re-validated."""
    base = (section or TrainSection()).model_dump(exclude_unset=False)
    if not overrides:
        return section or TrainSection()
    for key in ("optimizer", "scheduler"):
        if isinstance(overrides.get(key), str):  # shorthand replaces the whole sub-section
            base[key] = {}
    merged = _merge(base, overrides)
    try:
        return TrainSection.model_validate(merged)
    except ValidationError as exc:
        lines = []
        for err in exc.errors()[:3]:
            where = ".".join(str(p) for p in err["loc"] if not str(p).startswith(("function-", "str", "int")))
            msg = err["msg"].removeprefix("Value error, ")
            if err["type"] == "extra_forbidden":
                msg = "unknown key" + did_you_mean(str(err["loc"][-1]), TrainSection.model_fields)
            lines.append(f"recipe override {where or 'train'}: {msg}")
        raise RecipeError("\n".join(lines)) from None


def stage_recipe(recipe: TrainSection, stage: StageDecl, epochs_cap: int | None = None) -> TrainSection:
    """The recipe one stage runs with: the stage's own settings over the task recipe."""
    update: dict[str, Any] = {}
    for key in ("epochs", "lr", "optimizer", "scheduler", "weight_decay"):
        value = getattr(stage, key)
        if value is not None:
            update[key] = value
    out = recipe.model_copy(update=update)
    if epochs_cap is not None and out.epochs > epochs_cap:
        out = out.model_copy(update={"epochs": epochs_cap})
    return out


def build_optimizer(params: Iterable[torch.nn.Parameter] | Iterable[dict[str, Any]], recipe: TrainSection,
                    lr: float) -> torch.optim.Optimizer:
    """The recipe's optimizer over ``params`` at learning rate ``lr`` (already batch-scaled)."""
    opt = recipe.optimizer
    params = list(params)
    if not params:
        raise RecipeError("nothing to train: the spec leaves no trainable parameter for this stage")
    if opt.name in ("adam", "adamw"):
        kwargs: dict[str, Any] = {"lr": lr, "weight_decay": recipe.weight_decay}
        if opt.betas is not None:
            kwargs["betas"] = tuple(opt.betas)
        if opt.eps is not None:
            kwargs["eps"] = opt.eps
        cls = torch.optim.Adam if opt.name == "adam" else torch.optim.AdamW
        return cls(params, **kwargs)
    return torch.optim.SGD(params, lr=lr, weight_decay=recipe.weight_decay, momentum=opt.momentum or 0.0,
                           nesterov=bool(opt.nesterov), dampening=opt.dampening or 0.0)


class LRSchedule:
    """Sets every param group's lr to ``base × factor(step)``; stepped once per batch."""

    def __init__(self, optimizer: torch.optim.Optimizer, args: SchedulerArgs, steps_per_epoch: int, epochs: int):
        self.optimizer = optimizer
        self.args = args
        self.steps_per_epoch = max(1, steps_per_epoch)
        self.total = self.steps_per_epoch * epochs
        self.warmup = min(self.total, round(args.warmup_epochs * self.steps_per_epoch))
        self.base = [group.setdefault("initial_lr", group["lr"]) for group in optimizer.param_groups]
        self.step_count = 0
        self._apply()

    def factor(self, step: int) -> float:
        a = self.args
        if step < self.warmup:
            return a.warmup_from + (1.0 - a.warmup_from) * step / self.warmup
        t = step - self.warmup
        if a.name == "constant":
            return 1.0
        if a.name == "step":
            assert a.step_size is not None
            return a.gamma ** ((t // self.steps_per_epoch) // a.step_size)
        span = max(1, self.total - self.warmup)
        return a.min_lr + (1.0 - a.min_lr) * 0.5 * (1.0 + math.cos(math.pi * min(t, span) / span))

    def _apply(self) -> None:
        f = self.factor(self.step_count)
        for group, base in zip(self.optimizer.param_groups, self.base):
            group["lr"] = base * f

    def step(self) -> None:
        self.step_count += 1
        self._apply()

    @property
    def lr(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"])

    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step_count}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.step_count = int(state["step"])
        self._apply()
