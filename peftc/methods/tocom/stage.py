"""ToCom's self-distillation as a training stage (``stage: distill``), on :mod:`peftc.methods.tocom.distill`'s loss.

Each step draws ``r_src ≠ r_tgt`` uniformly in ``0..r_max`` (the same r in every block), computes the teacher
— the same frozen backbone + ToMe at ``r_src``, which is the student with its plugin's Δmask at zero — and
trains only the plugin on ``soft_target_kl(student at r_tgt, teacher)`` (τ from ``args``). Labels are not used,
so any folder of images serves; the stage does not validate. The draw is a function of the seed and the step
(the step counter is checkpointed), so a resumed run draws the same pairs.
``peftc.methods.tocom.distill.distill`` is the
same procedure as a standalone loop; this stage runs it under the trainer's recipe (AdamW 2e-3, wd 0.05,
cosine, 10 epochs in ``specs/tocom.yaml``), data loading, DDP, progress and checkpoints.

Importing this module registers ``distill``.
"""

from __future__ import annotations

import random
import zlib

import torch
from torch import nn

from peftc.errors import SpecError
from peftc.methods.tocom.distill import soft_target_kl
from peftc.methods.tocom.tocom import compensators, set_compression
from peftc.train.stages import Stage, register_stage

__all__ = ["DistillStage"]


def _logits(output: object) -> torch.Tensor:
    if isinstance(output, (tuple, list)):  # DeiT-distilled heads in training mode: (cls, dist)
        return torch.stack(list(output)).mean(0)
    assert isinstance(output, torch.Tensor)
    return output


@register_stage("distill")
class DistillStage(Stage):
    """Self-distillation of the ToCom plugin (see the module docstring). ``args``: ``r_max`` (16), ``tau`` (1)."""

    validates = False

    def __init__(self, decl, run, recipe):  # type: ignore[no-untyped-def]
        super().__init__(decl, run, recipe)
        unknown = sorted(set(decl.args) - {"r_max", "tau"})
        if unknown:
            raise SpecError(f"stage 'distill' takes args r_max and tau, not {', '.join(unknown)}")
        self.plugins = compensators(run.model)
        if not self.plugins:
            raise SpecError(f"stage 'distill' needs a ToCom plugin; spec {run.model.spec.name!r} has none")
        self.r_max = int(decl.args.get("r_max", min(p.slices for p in self.plugins)))
        self.tau = float(decl.args.get("tau", 1.0))
        if not 1 <= self.r_max <= min(p.slices for p in self.plugins):
            raise SpecError(f"stage 'distill': r_max must be within 1..{min(p.slices for p in self.plugins)}")
        self.step = 0

    def parameters(self) -> list[nn.Parameter]:
        params = [p for plugin in self.plugins for p in plugin.parameters()]
        for p in params:
            p.requires_grad_(True)
        return params

    def _pair(self) -> tuple[int, int]:
        rng = random.Random(zlib.crc32(f"{self.run.seed}/{self.run.task}/distill/{self.step}".encode()))
        while True:
            r_src, r_tgt = rng.randint(0, self.r_max), rng.randint(0, self.r_max)
            if r_src != r_tgt:
                return r_src, r_tgt

    def loss(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        model = self.run.model
        r_src, r_tgt = self._pair()
        self.step += 1
        with torch.no_grad():
            model.train(False)  # the teacher pass: deterministic, no dropout
            set_compression(model, r_tgt=r_src, r_src=r_src)  # Δmask = 0: exactly the backbone + ToMe(r_src)
            target = _logits(model(images))
        model.train(True)
        set_compression(model, r_tgt=r_tgt, r_src=r_src)
        return soft_target_kl(_logits(self.run.forward(images)), target, self.tau)

    def end(self) -> None:
        set_compression(self.run.model, r_tgt=0, r_src=0)

    def extra_state(self) -> dict[str, torch.Tensor]:
        return {"step": torch.tensor(self.step, dtype=torch.int64)}

    def load_extra_state(self, tensors: dict[str, torch.Tensor]) -> None:
        if "step" in tensors:
            self.step = int(tensors["step"])
