"""ToCom's workflow: distil the compensator once per backbone, then attach it to any downstream model.

**Self-distillation** (:func:`distill`, JieShibo/ToCom ``engine.py`` + ``losses.py``). The student is the
backbone + ToMe at ``r_tgt`` + the ToCom plugin compensating ``r_src → r_tgt``; the teacher is the same frozen
backbone + ToMe at ``r_src``. Every step draws ``r_src ≠ r_tgt`` uniformly in ``0..r_max`` (the same r in all
blocks) and minimises the soft-target loss of DeiT/ToCom::

    F.kl_div(log_softmax(student / τ), log_softmax(teacher / τ), reduction="sum", log_target=True) · τ² / numel

(``Σ p_t (log p_t − log p_s)``: the student's divergence from the teacher's soft targets, τ = 1). Only the
plugin's parameters train (AdamW, cosine decay; the official recipe is lr 2e-3, wd 0.05, 10 epochs). The
teacher needs no second model: with ``r_tgt = r_src`` the plugin's Δmask is exactly zero, so the student
itself *is* the teacher — one copy of the backbone in memory; pass ``teacher=`` to use another model.

Training is **resumable**: ``checkpoint=DIR`` writes, every ``checkpoint_every`` steps and at the end, the
plugin (``plugin.safetensors``), the optimizer state and the torch RNG state (``optimizer.safetensors``) and the
step, the sampler's RNG and the settings (``state.json``) — no pickles — atomically (a new directory swapped in).
Calling :func:`distill` again with the same directory continues where it stopped. With ``data`` given as an
image tensor the batches are a deterministic function of the seed and the step, so an interrupted and resumed
run gives exactly the tensors of an uninterrupted one.

**Model arithmetic** (:func:`peftc.compose.attach`). A plugin distilled once on a backbone is added to any
downstream artifact
of the same backbone. The combined spec is the downstream spec's rules, unchanged, followed by the plugin
spec's rules without

* its ``freeze`` rules — attaching must not change what the downstream model trains and saves, and
* its ``merge_tokens`` rule when the downstream already merges tokens — a model has one merge schedule; the
  plugin then compensates from ``r_src`` (the degree the downstream was fine-tuned at) to whatever r it runs at.

The downstream's tensors are copied into the combined model by name (its rules ran first, so every path is
the same), then the plugin's trained tensors from its own artifact. Both are deltas of the same frozen
backbone and they add: ToCom's only effect is ``s·ΔW`` on the q and v rows of each fused qkv weight, next to
whatever the downstream changed (a LoRA on the same qkv reads the same input: ``W + ΔW_lora + s·ΔW_tocom``).
The result is an ordinary compiled model; saving it gives a self-contained artifact with both deltas.
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from peftc.errors import ArtifactError, PeftcError
from peftc.methods.tocom.tocom import compensators, set_compression
from peftc.methods.tome.tome import set_r, token_merges
from peftc.storage.atomic import replace_directory, staging_dir
from peftc.train.checkpoint import optimizer_from_files, optimizer_to_files

__all__ = ["DistillResult", "distill", "distillation_kl", "soft_target_kl"]

CHECKPOINT_FORMAT = 2  # 2: the optimizer is stored as the trainer's checkpoints store it
_PLUGIN, _OPTIM, _STATE = "plugin.safetensors", "optimizer.safetensors", "state.json"


# -- the loss ----------------------------------------------------------------------------------------------
def soft_target_kl(student: torch.Tensor, teacher: torch.Tensor, tau: float = 1.0) -> torch.Tensor:
    """DeiT/ToCom's soft distillation loss: ``Σ p_t·(log p_t − log p_s) · τ² / numel``."""
    return F.kl_div(F.log_softmax(student / tau, dim=-1), F.log_softmax(teacher / tau, dim=-1),
                    reduction="sum", log_target=True) * (tau * tau) / student.numel()


def _logits(output: Any) -> torch.Tensor:
    """The logits of a model output (DeiT-distilled in training mode returns a (cls, dist) pair: average it)."""
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, (tuple, list)) and output and all(isinstance(o, torch.Tensor) for o in output):
        return torch.stack(list(output)).mean(dim=0)
    raise PeftcError(f"distillation needs a model that returns logits, got {type(output).__name__}")


@torch.no_grad()
def distillation_kl(model: nn.Module, images: torch.Tensor, pairs: Sequence[tuple[int, int]], tau: float = 1.0,
                    teacher: nn.Module | None = None) -> float:
    """Mean soft-target KL of the student against the teacher over fixed ``(r_src, r_tgt)`` pairs (eval mode).

    The model's mode and compression settings are restored afterwards.
    """
    was_training = model.training
    merges, plugins = token_merges(model), compensators(model)
    saved = [m.r for m in merges], [(p.r_src, p.r_tgt) for p in plugins]
    model.eval()
    try:
        total = 0.0
        for r_src, r_tgt in pairs:
            target = _teacher_logits(model, teacher, images, r_src)
            set_compression(model, r_tgt=r_tgt, r_src=r_src)
            total += soft_target_kl(_logits(model(images)), target, tau).item()
        return total / max(1, len(pairs))
    finally:
        model.train(was_training)
        for merge, r in zip(merges, saved[0]):
            merge.r = r
        for plugin, (r_src, r_tgt) in zip(plugins, saved[1]):
            plugin.set_r(r_tgt=r_tgt, r_src=r_src)


def _teacher_logits(model: nn.Module, teacher: nn.Module | None, images: torch.Tensor, r_src: int) -> torch.Tensor:
    """The frozen backbone + ToMe(r_src): the student with its plugin switched off, or a separate teacher."""
    with torch.no_grad():
        if teacher is None:
            set_compression(model, r_tgt=r_src, r_src=r_src)  # Δmask = 0: the plugin adds exactly nothing
            return _logits(model(images))
        was_training = teacher.training
        teacher.eval()
        set_r(teacher, r_src)
        try:
            return _logits(teacher(images))
        finally:
            teacher.train(was_training)


# -- data --------------------------------------------------------------------------------------------------
def _images(batch: Any) -> torch.Tensor:
    if isinstance(batch, torch.Tensor):
        return batch
    if isinstance(batch, (tuple, list)) and batch and isinstance(batch[0], torch.Tensor):
        return batch[0]  # (images, labels): labels are not needed for self-distillation
    if isinstance(batch, Mapping) and isinstance(batch.get("image", batch.get("images")), torch.Tensor):
        return batch.get("image", batch.get("images"))
    raise PeftcError(f"a batch must be an image tensor or (images, labels), got {type(batch).__name__}")


def _batches(data: torch.Tensor | Iterable[Any], batch_size: int, seed: int, start: int) -> Iterator[torch.Tensor]:
    """Batches from step ``start`` on: a tensor is reshuffled per epoch from ``seed`` (exactly resumable)."""
    if isinstance(data, torch.Tensor):
        n = data.shape[0]
        if n < batch_size:
            raise PeftcError(f"distillation data has {n} images, fewer than batch_size {batch_size}")
        per_epoch = n // batch_size
        step = start
        while True:
            epoch, index = divmod(step, per_epoch)
            order = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))
            yield data[order[index * batch_size:(index + 1) * batch_size]]
            step += 1
    while True:
        empty = True
        for batch in data:
            empty = False
            yield _images(batch)
        if empty:
            raise PeftcError("the distillation data yielded no batches")


# -- checkpoints -------------------------------------------------------------------------------------------
@dataclass
class _Settings:
    steps: int
    lr: float
    weight_decay: float
    tau: float
    r_max: int
    warmup: int
    seed: int
    batch_size: int


def _lr_at(step: int, s: _Settings) -> float:
    """Linear warm-up, then cosine decay to 0 at ``s.steps``."""
    if step < s.warmup:
        return s.lr * (step + 1) / s.warmup
    span = max(1, s.steps - s.warmup)
    return 0.5 * s.lr * (1.0 + math.cos(math.pi * min(1.0, (step - s.warmup) / span)))


def _backbone_hash(model: nn.Module) -> str | None:
    backbone = getattr(model, "backbone", None)
    return getattr(backbone, "hash", None)


def _write_checkpoint(directory: Path, model: nn.Module, named: Mapping[str, nn.Parameter],
                      optimizer: torch.optim.Optimizer, step: int, sampler: random.Random, settings: _Settings,
                      losses: list[float]) -> None:
    """The plugin, the optimizer (the trainer's split into safetensors + JSON) and the RNGs, swapped in whole."""
    from safetensors.torch import save_file

    tensors, optim = optimizer_to_files(optimizer.state_dict())
    tensors["rng/torch"] = torch.get_rng_state()
    version, internal, gauss = sampler.getstate()
    meta = {
        "format": CHECKPOINT_FORMAT,
        "step": step,
        "backbone": _backbone_hash(model),
        "settings": asdict(settings),
        "plugin": {name: list(p.shape) for name, p in named.items()},
        "optimizer": optim,
        "sampler": [version, list(internal), gauss],
        "losses": losses,
    }
    directory = directory.resolve()
    staging = staging_dir(directory)
    try:
        save_file({n: p.detach().cpu().contiguous() for n, p in named.items()}, str(staging / _PLUGIN))
        save_file(tensors, str(staging / _OPTIM))
        (staging / _STATE).write_text(json.dumps(meta, indent=1) + "\n", encoding="utf-8")
        for f in staging.iterdir():
            with f.open("rb") as handle:
                os.fsync(handle.fileno())
        replace_directory(staging, directory)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def _read_checkpoint(directory: Path, model: nn.Module, named: Mapping[str, nn.Parameter],
                     optimizer: torch.optim.Optimizer, sampler: random.Random) -> tuple[int, list[float]]:
    """Restore plugin, optimizer, RNGs; returns (step, losses so far)."""
    from safetensors.torch import load_file

    try:
        meta = json.loads((directory / _STATE).read_text(encoding="utf-8"))
        plugin = load_file(str(directory / _PLUGIN))
        tensors = load_file(str(directory / _OPTIM))
    except (OSError, ValueError) as exc:
        raise ArtifactError(f"{directory}: unreadable distillation checkpoint ({exc})") from None
    if meta.get("format") != CHECKPOINT_FORMAT:
        raise ArtifactError(f"{directory}: unsupported checkpoint format {meta.get('format')!r} (this peftc "
                            f"writes {CHECKPOINT_FORMAT}; start the distillation in a new directory)")
    ours = _backbone_hash(model)
    if meta.get("backbone") and ours and meta["backbone"] != ours:
        raise ArtifactError(f"{directory}: this checkpoint was written for another backbone "
                            f"({meta['backbone'][:12]}…, this model's is {ours[:12]}…)")
    shapes = {name: list(p.shape) for name, p in named.items()}
    if meta["plugin"] != shapes:
        missing = sorted(set(shapes) ^ set(meta["plugin"]))
        raise ArtifactError(f"{directory}: this checkpoint belongs to another model's plugin"
                            + (f" (e.g. {missing[0]!r})" if missing else " (shapes differ)"))
    with torch.no_grad():
        for name, p in named.items():
            p.copy_(plugin[name])
    optimizer.load_state_dict(optimizer_from_files(tensors, meta["optimizer"]))
    torch.set_rng_state(tensors["rng/torch"])
    version, internal, gauss = meta["sampler"]
    sampler.setstate((version, tuple(internal), gauss))
    return int(meta["step"]), list(meta.get("losses", []))


# -- the training loop -------------------------------------------------------------------------------------
@dataclass
class DistillResult:
    """What one :func:`distill` call did."""

    step: int  # steps done in total (resumed ones included)
    resumed_from: int
    losses: list[float] = field(default_factory=list)  # every step's loss, resumed ones included
    pairs: list[tuple[int, int]] = field(default_factory=list)  # (r_src, r_tgt) of this call's steps


def _plugin_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    plugins = {id(m) for m in compensators(model)}
    if not plugins:
        raise PeftcError("this model has no ToCom plugin to distil (compile it with the tocom spec)")
    if not token_merges(model):
        raise PeftcError("ToCom distillation needs a model that merges tokens (the tocom spec includes tome)")
    named: dict[str, nn.Parameter] = {}
    for path, module in model.named_modules():
        if id(module) in plugins:
            for local, p in module.named_parameters():
                named[f"{path}.{local}"] = p
    return named


def _draw(sampler: random.Random, r_max: int) -> tuple[int, int]:
    while True:
        r_src, r_tgt = sampler.randint(0, r_max), sampler.randint(0, r_max)
        if r_src != r_tgt:
            return r_src, r_tgt


def distill(
    model: nn.Module,
    data: torch.Tensor | Iterable[Any],
    *,
    steps: int,
    batch_size: int = 32,
    lr: float = 2e-3,
    weight_decay: float = 0.05,
    tau: float = 1.0,
    r_max: int = 16,
    warmup: int = 0,
    seed: int = 0,
    teacher: nn.Module | None = None,
    checkpoint: str | Path | None = None,
    checkpoint_every: int = 100,
    progress: bool = True,
    on_step: Callable[[int, float], None] | None = None,
) -> DistillResult:
    """Train the ToCom plugin of ``model`` by self-distillation for ``steps`` steps in total.

    ``data`` is an image tensor ``(N, 3, H, W)`` (batched by ``batch_size``, reshuffled every epoch from
    ``seed``) or any iterable of batches (tensors or ``(images, labels)``; it is iterated again when it ends).
    With ``checkpoint`` the run is resumable (see the module docstring); calling again after ``steps`` were
    done does nothing. ``on_step(step, loss)`` is called after each step (and its checkpoint), e.g. to log or
    to stop early by raising. The model is left in eval mode with the plugin off (``r_tgt = r_src = 0``).
    """
    if steps < 0 or batch_size < 1 or checkpoint_every < 1:
        raise PeftcError("steps must be >= 0, batch_size and checkpoint_every >= 1")
    if r_max < 1:
        raise PeftcError(f"r_max must be >= 1 (r_src != r_tgt are drawn from 0..r_max), got {r_max}")
    slices = {m.slices for m in compensators(model)} or {r_max}
    if r_max > min(slices):
        raise PeftcError(f"r_max {r_max} exceeds the plugin's {min(slices)} slices")
    named = _plugin_parameters(model)
    for p in named.values():
        p.requires_grad_(True)
    settings = _Settings(steps, lr, weight_decay, tau, r_max, warmup, seed, batch_size)
    optimizer = torch.optim.AdamW(list(named.values()), lr=lr, weight_decay=weight_decay)
    sampler = random.Random(seed)
    start, losses = 0, []
    directory = Path(checkpoint) if checkpoint is not None else None
    if directory is not None and (directory / _STATE).is_file():
        start, losses = _read_checkpoint(directory, model, named, optimizer, sampler)
    result = DistillResult(step=start, resumed_from=start, losses=losses)
    batches = _batches(data, batch_size, seed, start)
    with _progress(progress, steps, start) as bar:
        for step in range(start, steps):
            images = next(batches)
            r_src, r_tgt = _draw(sampler, r_max)
            for group in optimizer.param_groups:
                group["lr"] = _lr_at(step, settings)
            model.eval()  # the teacher pass: deterministic, no dropout
            target = _teacher_logits(model, teacher, images, r_src)
            model.train()
            set_compression(model, r_tgt=r_tgt, r_src=r_src)
            loss = soft_target_kl(_logits(model(images)), target, tau)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            result.losses.append(loss.item())
            result.pairs.append((r_src, r_tgt))
            result.step = step + 1
            bar(step + 1, loss.item(), r_src, r_tgt)
            if directory is not None and ((step + 1) % checkpoint_every == 0 or step + 1 == steps):
                _write_checkpoint(directory, model, named, optimizer, step + 1, sampler, settings,
                                  result.losses)
            if on_step is not None:
                on_step(step + 1, result.losses[-1])
    model.eval()
    set_compression(model, r_tgt=0, r_src=0)
    return result


class _progress:
    """A rich progress bar (or nothing): ``bar(step, loss, r_src, r_tgt)``."""

    def __init__(self, enabled: bool, total: int, start: int):
        self.enabled, self.total, self.start = enabled, total, start
        self._progress: Any = None
        self._task: Any = None

    def __enter__(self) -> Any:
        if self.enabled:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self._progress = Progress(TextColumn("distil ToCom"), BarColumn(), MofNCompleteColumn(),
                                      TextColumn("{task.fields[info]}"), TimeRemainingColumn(), transient=False)
            self._progress.__enter__()
            self._task = self._progress.add_task("distil", total=self.total, completed=self.start, info="")
        return self.update

    def update(self, step: int, loss: float, r_src: int, r_tgt: int) -> None:
        if self._progress is not None:
            self._progress.update(self._task, completed=step, info=f"kl {loss:.4g}  r {r_src}→{r_tgt}")

    def __exit__(self, *exc: Any) -> None:
        if self._progress is not None:
            self._progress.__exit__(*exc)
