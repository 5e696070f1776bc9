"""``peftc train DIR --stream stream.yaml``: online class-incremental learning, one pass over a task-free stream.

Each step takes the next ``batch_size`` stream images (batches run across task ends), tells the learner their
labels, adds a batch replayed from the memory, takes one optimizer step, then offers the images to the memory.
Nothing tells the learner where a task ends; the evaluator (:mod:`peftc.train.online_eval`) evaluates after
the batch that completes each task. The model is any compiled artifact: it gets one head over every class of
the stream (a task named after the stream), trained as its spec says (full fine-tuning, a probe, a PEFT spec).

Files, under ``DIR/train/``: ``<stream>/checkpoint/`` while the stream runs (the model, the optimizer, the memory,
the learner's state, every RNG and the stream position, replaced atomically after every evaluation and every
``checkpoint_every`` steps; removed at the end), then ``online.json`` (settings, accuracy matrices, metrics and
recent-class shares per classifier), ``online.png`` and ``online_memory.safetensors`` (the final memory, which
``peftc eval`` needs for a memory-based classifier). ``--resume`` continues from the checkpoint and ends in the
same state as an uninterrupted run (tested: model, memory and metrics).
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from peftc.errors import PeftcError
from peftc.storage.artifact import MANIFEST
from peftc.storage.atomic import write_file
from peftc.train.checkpoint import Checkpoint, CheckpointError
from peftc.train.context import head_classes
from peftc.train.data import collate
from peftc.train.journal import TRAIN_DIR
from peftc.train.learners import OnlineLearner, get_learner
from peftc.train.memory import ReplayMemory
from peftc.train.online_eval import OnlineEval, plot_stream, summarise
from peftc.train.progress import Reporter
from peftc.train.stream import Stream, StreamError, StreamSamples, build_stream, read_stream
from peftc.train.transforms import backbone_stats, eval_transform

__all__ = ["ONLINE_JSON", "OnlineOptions", "train_stream"]

ONLINE_JSON = "online.json"
ONLINE_PNG = "online.png"
MEMORY_FILE = "online_memory.safetensors"


@dataclass
class OnlineOptions:
    """Overrides and run settings; ``batch_size`` / ``memory`` / ``sampling`` win over the stream file and recipe.

    ``on_step(step, positions, loss)`` is called after every step (positions: the stream positions it consumed);
    raising from it interrupts the run like Ctrl-C would.
    """

    overrides: dict[str, Any] = field(default_factory=dict)
    batch_size: int | None = None
    memory: int | None = None
    sampling: str | None = None
    seed: int = 0
    image_size: int | None = None
    device: str = "cpu"
    resume: bool = False
    quiet: bool = False
    val_fraction: float = 0.2
    checkpoint_every: int = 50
    on_step: Callable[[int, range, float], None] | None = None


@dataclass
class _Run:
    """Everything one stream run holds; what it checkpoints is in :meth:`state`."""

    stream: Stream
    settings: dict[str, Any]
    model: Any
    learner: OnlineLearner
    memory: ReplayMemory
    optimizer: torch.optim.Optimizer
    replay_gen: torch.Generator
    step: int = 0
    rows: list[dict[str, Any]] = field(default_factory=list)
    train_seconds: float = 0.0
    corrupt: int = 0

    def tensors(self) -> dict[str, torch.Tensor]:
        out = {f"memory/{k}": v for k, v in self.memory.state().items()}
        out.update({f"learner/{k}": v for k, v in self.learner.state().items()})
        out["replay_gen"] = self.replay_gen.get_state()
        return out

    def state(self) -> dict[str, Any]:
        return {"settings": self.settings, "step": self.step, "rows": self.rows,
                "train_seconds": self.train_seconds, "corrupt": self.corrupt}

    def restore(self, ckpt: Checkpoint) -> None:
        from peftc.storage.artifact import load_into

        state = ckpt.read_state()
        if state.get("settings") != self.settings:
            raise CheckpointError(f"checkpoint {ckpt.path} belongs to another run ({state.get('settings')}); "
                                  "run without --resume to start over")
        load_into(self.model, ckpt.path / "model")
        self.model.set_task(self.stream.name)
        optimizer = ckpt.optimizer_state(state)
        if optimizer is not None:
            self.optimizer.load_state_dict(optimizer)
        extra = ckpt.extra()
        self.memory.load_state({k[7:]: v for k, v in extra.items() if k.startswith("memory/")})
        self.learner.load_state({k[8:]: v for k, v in extra.items() if k.startswith("learner/")})
        self.replay_gen.set_state(extra["replay_gen"])
        ckpt.restore_rng(state)
        self.step, self.rows = state["step"], state["rows"]
        self.train_seconds, self.corrupt = state["train_seconds"], state["corrupt"]


def _learner_args(recipe: Any, model: Any, overrides: dict[str, Any]) -> dict[str, Any]:
    """A spec's ``online.args`` belong to the spec's learner: another learner (an override) gets only its own."""
    own = model.spec.train.online.learner if model.spec.train else recipe.online.learner
    if recipe.online.learner != own:
        return dict((overrides.get("online") or {}).get("args") or {})
    return recipe.online.args


def _settings(recipe: Any, model: Any, spec: Any, stream: Stream, options: OnlineOptions,
              image_size: int) -> dict[str, Any]:
    online = recipe.online
    settings = {"stream": stream.name, "learner": online.learner,
                "args": _learner_args(recipe, model, options.overrides),
                "batch_size": options.batch_size or spec.batch_size or online.batch_size,
                "memory": options.memory or spec.memory or online.memory,
                "sampling": options.sampling or spec.sampling or online.sampling,
                "seed": spec.seed if spec.seed is not None else options.seed, "image_size": image_size,
                "val_fraction": options.val_fraction}
    settings["replay_batch_size"] = online.replay_batch_size or settings["batch_size"]
    settings["lr"] = recipe.effective_lr(settings["batch_size"])
    if settings["memory"] > len(stream):
        raise StreamError(f"memory {settings['memory']} is larger than the stream ({len(stream)} samples): the "
                          "memory would keep everything; lower memory (stream file, train.online.memory or --memory)")
    return settings


def _prepare_head(model: Any, name: str, classes: int, resuming: bool) -> None:
    """Give the model one head over the stream's classes, as task ``name``."""
    if name in model.tasks and not resuming:
        raise PeftcError(f"the artifact already has a task {name!r} (a finished stream?); name the stream "
                         "differently (name: in the stream file) or use a fresh artifact")
    if name not in model.tasks:
        if model.bank.module_slots:
            model.add_task(name, classes)
        else:
            outputs = head_classes(model)
            if outputs != classes:
                raise PeftcError(f"spec {model.spec.name!r} has no per-task head and its head has {outputs} outputs "
                                 f"for a stream of {classes} classes; add a head rule (head: {{}}), or compile "
                                 f"with num_classes={classes}")
    model.set_task(name)


def _write_json(path: Path, payload: dict[str, Any]) -> None:
    write_file(path, json.dumps(payload, indent=1) + "\n")


def _finish(run: _Run, artifact: Path, out: Path, reporter: Reporter) -> dict[str, Any]:
    from safetensors.torch import save

    s = run.settings
    record: dict[str, Any] = {
        **s, "tasks": list(run.stream.tasks), "classes": run.stream.classes, "boundaries": run.stream.boundaries,
        "data": [{"data": str(d.root), "classes": list(d.classes)} for d in run.stream.data],
        "samples": len(run.stream), "steps": run.step, "corrupt_skipped": run.corrupt,
        "images_per_second": len(run.stream) / max(run.train_seconds, 1e-9), "train_seconds": run.train_seconds,
        "classifiers": summarise(run.rows, list(run.stream.tasks)), "memory_file": MEMORY_FILE,
    }
    run.model.save(artifact)
    write_file(out / MEMORY_FILE, save({k: v.contiguous() for k, v in run.tensors().items()}))
    _write_json(out / ONLINE_JSON, record)
    png = plot_stream(record, out / ONLINE_PNG)
    if png is None:
        reporter.warn("matplotlib is not installed: no figure (pip install 'peftc[plot]')")
    return {**record, "json": str(out / ONLINE_JSON), "figure": str(png) if png else None}


def train_stream(artifact: str | Path, stream_file: str | Path, options: OnlineOptions | None = None,
                 *, model: Any = None) -> dict[str, Any]:
    """Learn the stream once, online; returns the record written to ``DIR/train/online.json``.

    ``model`` is the compiled model to train (default: ``peftc.load(artifact)``); the artifact is saved back.
    """
    from peftc.compiler import load
    from peftc.train.distributed import setup
    from peftc.train.recipe import build_optimizer, resolve

    options = options or OnlineOptions()
    artifact = Path(artifact)
    spec = read_stream(stream_file)
    stream = build_stream(spec, options.seed, options.val_fraction)
    dist = setup(options.device)
    if dist.enabled:
        raise PeftcError("an online stream is learned by one process, batch after batch; run it without torchrun")
    if model is None:
        model = load(artifact)
    elif not (artifact / MANIFEST).is_file():
        model.save(artifact)  # a model from Python: its artifact starts here
    recipe = resolve(model.spec.train, options.overrides)
    image_size = options.image_size or model.backbone.input_size[-1]
    settings = _settings(recipe, model, spec, stream, options, image_size)
    num_classes = len(stream.classes)
    learner = get_learner(settings["learner"])(model, num_classes, settings["args"])  # bad args fail here
    out = artifact / TRAIN_DIR
    ckpt = Checkpoint(out / stream.name / "checkpoint")
    resuming = options.resume and ckpt.exists
    if options.resume and not ckpt.exists:
        raise CheckpointError(f"nothing to resume: no checkpoint at {ckpt.path}")
    reporter = Reporter(quiet=options.quiet)
    if ckpt.exists and not options.resume:
        reporter.note(f"discarding the checkpoint of an earlier run of stream {stream.name!r} (--resume continues it)")
        ckpt.remove()
    _prepare_head(model, stream.name, num_classes, resuming)
    model.to(dist.device)
    optimizer = build_optimizer(model.trainable_parameters(), recipe, settings["lr"])
    torch.manual_seed(settings["seed"])
    run = _Run(stream, settings, model, learner, ReplayMemory(settings["memory"], settings["sampling"],
                                                              settings["seed"]),
               optimizer, torch.Generator().manual_seed(settings["seed"] + 1))
    if resuming:
        run.restore(ckpt)
    mean, std = backbone_stats(model.backbone.id)
    transform = eval_transform(image_size, "none", mean, std)
    evaluator = OnlineEval(stream.data, stream.offsets, transform, dist.device)
    _loop(run, StreamSamples(stream, transform), evaluator, ckpt, options, reporter)
    record = _finish(run, artifact, out, reporter)
    ckpt.remove()
    with contextlib.suppress(OSError):
        ckpt.path.parent.rmdir()  # the stream's folder, when nothing else is in it
    return record


def _loop(run: _Run, samples: StreamSamples, evaluator: OnlineEval, ckpt: Checkpoint, options: OnlineOptions,
          reporter: Reporter) -> None:
    """The one pass, from ``run.step`` on."""
    s = run.settings
    batch, n = s["batch_size"], len(run.stream)
    device = evaluator.device
    loader = torch.utils.data.DataLoader(samples, batch_size=batch, sampler=range(run.step * batch, n),
                                         collate_fn=collate)
    ends = run.stream.boundaries
    reporter.start(f"stream {run.stream.name} ({s['learner']})", run.stream.steps(batch), run.step)
    try:
        for images, labels, bad in loader:
            start = time.perf_counter()
            positions = range(run.step * batch, min((run.step + 1) * batch, n))
            run.corrupt += len(bad)
            loss = None
            if len(labels):
                images, labels = images.to(device), labels.to(device)
                run.model.train()
                run.learner.observe(labels)
                replay = None
                if len(run.memory):
                    r_images, r_labels = run.memory.sample(s["replay_batch_size"], run.replay_gen)
                    replay = (r_images.to(device), r_labels.to(device))
                value = run.learner.loss(images, labels, replay)
                run.optimizer.zero_grad(set_to_none=True)
                value.backward()
                run.optimizer.step()
                run.memory.add(images, labels)
                loss = value.item()
            run.step += 1
            run.train_seconds += time.perf_counter() - start
            reporter.step(len(labels), loss)
            finished = [k for k, end in enumerate(ends) if positions.start < end <= positions.stop]
            for k in finished:
                run.rows.append(evaluator.row(run.learner, run.memory, k))
                accs = "  ".join(f"{c} {sum(r['accuracy']) / len(r['accuracy']):.3f} (recent {r['recent_share']:.2f})"
                                 for c, r in run.rows[-1].items())
                reporter.epoch(f"after {run.stream.tasks[k]} ({ends[k]} samples): {accs}")
            if options.on_step is not None:
                options.on_step(run.step, positions, float("nan") if loss is None else loss)
            if finished or run.step % options.checkpoint_every == 0:
                ckpt.write(run.model, run.state(), run.optimizer, extra=run.tensors())
    finally:
        reporter.stop()
