"""Training step time and peak memory: full fine-tuning vs each method, and peftc vs its peers, batch 8.

    python -m benchmarks.train_step [--quick] [--rounds 10] [--batch 8] [--threads N] [--methods lora,clr]

Two groups, each on one backbone: a ViT (timm deit_small_patch16_224; vit_tiny with --quick) for the transformer
methods, with LoRA and LN tuning also built by HF PEFT on the same timm module (same targets, rank, alpha and
trained head); and a CNN (torchvision resnet50; at 112 px with --quick) for CLR, also built as module-level
wrappers (each conv replaced by a module holding the conv and its depthwise conv, the design of the official
code). Full fine-tuning of each backbone is the baseline; without --quick every built-in spec that compiles on
the backbone and trains something is measured too.

Every variant lives in its own process (forked, so imports are paid once), which builds the model and takes
warm-up steps. Memory is tensor memory, the same quantity on both devices: on the GPU
``torch.cuda.max_memory_allocated`` over the timed region, on the CPU the exact bytes of live tensor storage
counted through one more (untimed) training step by :mod:`benchmarks.tensor_memory` — weights, gradients,
optimiser state, saved activations and temporaries at their highest point — and "model" is the model's tensors
at rest before training. The CPU's resident-set high-water mark over the timed region (and the resident size at
rest) above the process's size before the model was built is reported beside it as "resident": it adds what
glibc keeps after frees and the Python objects, and varies by ~8% between runs of identical code. The variants compared
with each other (full fine-tuning, peftc, the peers of one method) are then timed step by step in turn: each
round gives every process one training step (zero_grad, forward, cross-entropy, backward, AdamW) and one no-grad
eval forward, in alternating order, so load that drifts on a shared machine hits all of them alike; a ratio is
the median over rounds of that round's ratio. Targets: peftc step time and peak memory ≤ 1.0× HF PEFT's for
LoRA (ViT and CNN) and LN tuning; peftc CLR eager forward ≤ 1.0× the wrapper implementation.

On a CNN, peftc keeps the BatchNorms of a frozen backbone in eval mode while training (their statistics are
frozen too), while a PEFT model's ``train()`` puts them in train mode, where they normalise with batch
statistics and update the running ones: different arithmetic. So the CNN LoRA step is compared both with PEFT as
it comes ("peft") and with PEFT whose frozen BatchNorms stay in eval mode ("peft-eval-bn", the same function as
peftc's); the target is checked against the latter.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import importlib.util
import os
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from rich.console import Console
from rich.table import Table

from benchmarks.common import check, summary, write_result
from benchmarks.isolate import IsolatedError, Peak, Worker, rss_bytes, run_isolated

BATCH = 8
TARGETS = {"lora_step": 1.0, "lora_memory": 1.0, "cnn_lora_step": 1.0, "cnn_lora_memory": 1.0,
           "ln_tuning_step": 1.0, "ln_tuning_memory": 1.0, "clr_forward": 1.0}
CHECKS = {  # ratio name -> (check id, label)
    "vit lora step peftc/peft": ("lora_step", "LoRA train step (ViT), peftc / HF PEFT"),
    "vit lora memory peftc/peft": ("lora_memory", "LoRA peak training memory (ViT), peftc / HF PEFT"),
    "cnn lora step peftc/peft-eval-bn": ("cnn_lora_step",
                                         "LoRA train step (CNN), peftc / HF PEFT with frozen BatchNorms in eval"),
    "cnn lora memory peftc/peft": ("cnn_lora_memory", "LoRA peak training memory (CNN), peftc / HF PEFT"),
    "vit ln_tuning step peftc/peft": ("ln_tuning_step", "LN tuning train step, peftc / HF PEFT"),
    "vit ln_tuning memory peftc/peft": ("ln_tuning_memory", "LN tuning peak training memory, peftc / HF PEFT"),
    "cnn clr forward peftc/wrapper": ("clr_forward", "CLR eager forward, peftc / module-level wrappers"),
}
# method -> spec params used here (ln_tuning without per-task keys: the same trainables as PEFT's LN tuning)
PARAMS: dict[str, dict[str, Any]] = {"ln_tuning": {"keys": False}}


@dataclass(frozen=True)
class Group:
    name: str
    backbone: str
    image: int
    methods: tuple[str, ...]  # the specs measured (others are added without --quick)


QUICK_GROUPS = (Group("vit", "timm:vit_tiny_patch16_224", 224, ("lora", "ln_tuning")),
                Group("cnn", "resnet50", 112, ("clr",)))
FULL_GROUPS = (Group("vit", "timm:deit_small_patch16_224", 224, ("lora", "ln_tuning")),
               Group("cnn", "resnet50", 224, ("clr",)))


@dataclass
class Job:
    """One measured configuration (what a child process builds and times)."""

    group: str
    kind: str  # full | peftc | a peer kind of benchmarks.peers.PEERS
    backbone: str
    image: int
    method: str | None = None
    params: dict[str, Any] = field(default_factory=dict)
    peer_plan: dict[str, Any] | None = None

    @property
    def key(self) -> str:
        return f"{self.group}/{self.kind}" + (f":{self.method}" if self.method else "")


# -- child side -------------------------------------------------------------------------------------------------
def _libc() -> Any:
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:
        return None


def _plan_group(group: Group, extra_specs: bool, peft_ok: bool) -> dict[str, Any]:
    """Which specs compile on the group's backbone (and why not), and what each peer must adapt."""
    import peftc
    from benchmarks.peers import PEERS, plan
    from peftc.errors import PeftcError
    from peftc.language import builtin_specs

    available = builtin_specs()
    wanted = list(group.methods)
    if extra_specs:
        wanted += sorted(s for s in available if s not in wanted)
    out: dict[str, Any] = {"methods": {}, "skipped": {}}
    for method in wanted:
        if method not in available:
            out["skipped"][method] = f"spec {method!r} is not built in (yet)"
            continue
        try:
            model = peftc.compile(method, group.backbone, **PARAMS.get(method, {}))
        except PeftcError as exc:
            out["skipped"][method] = f"does not apply to {group.backbone}: {str(exc).splitlines()[0]}"
            continue
        peers = {}
        for kind in PEERS.get(method, ()):
            if kind == "peft-eval-bn" and not peers.get("peft", {}).get("frozen_norms"):
                continue  # no BatchNorm frozen in eval mode: the same model as "peft"
            if kind.startswith("peft") and not peft_ok:
                out["skipped"][f"peft:{method}"] = "HF PEFT is not installed (pip install 'peftc[bench]')"
                continue
            peers[kind] = plan(model, method)
        trainable = sum(p.numel() for p in model.trainable_parameters())
        if not trainable:
            out["skipped"][method] = "trains nothing (an inference-time method; see its own suite)"
            continue
        out["methods"][method] = {"trainable": trainable, "peers": peers}
    return out


def _build(job: Job) -> Any:
    """The model of ``job`` (its trainable parameters have ``requires_grad``)."""
    import peftc
    from peftc.analysis.backbones import build_backbone

    if job.kind == "peftc":
        return peftc.compile(job.method, job.backbone, **job.params)
    module = build_backbone(job.backbone).module
    if job.kind == "full":
        return module.requires_grad_(True)
    from benchmarks.peers import build_peer

    return build_peer(job.kind, job.method, module, job.peer_plan)


class StepSession:
    """One model, built and warmed up in its own process, timed one call at a time (see :class:`Worker`).

    ``step()`` times one training step (zero_grad, forward, cross-entropy, backward, AdamW), ``forward()`` one
    no-grad eval forward, ``peak()`` reads the peak memory since the warm-up ended. ``ready`` tells the model's
    size at rest, its trainable parameters, the device and how memory is measured.
    """

    def __init__(self, job: Job, warmup: int, batch: int, threads: int):
        import torch

        from benchmarks import tensor_memory

        # The allocator keeps its default behaviour: fixing glibc's mmap threshold (so every freed tensor goes
        # back to the OS) would make each forward page-fault its activations afresh, slowing graphs that free
        # intermediates early (fx code does) by 10-15% and distorting the timings. malloc_trim before the
        # measured region returns what compilation left free instead.
        self._libc = _libc()
        torch.set_num_threads(threads)
        torch.manual_seed(0)
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        self._base = (rss_bytes() or 0) if self.device == "cpu" else 0
        self._base_tensors = tensor_memory.live_bytes() if self.device == "cpu" else 0
        self.model = _build(job).to(self.device)
        self._settle()
        if self.device == "cpu":
            model_bytes, model_rss = tensor_memory.live_bytes() - self._base_tensors, (rss_bytes() or 0) - self._base
        else:
            model_bytes, model_rss = torch.cuda.memory_allocated(), None
        params = [p for p in self.model.parameters() if p.requires_grad]
        self.opt = torch.optim.AdamW(params, lr=1e-4)
        self.x = torch.randn(batch, 3, job.image, job.image, device=self.device)
        self.y = torch.randint(0, 1000, (batch,), device=self.device)
        self.model.train()
        for _ in range(warmup):  # allocates gradients and optimiser state
            self._step()
        self.forward()  # first eval forward: one-off allocations
        self._settle()
        self._peak = Peak(self.device)
        self._peak.reset()
        self.ready = {"model_bytes": model_bytes, "model_rss_bytes": model_rss,
                      "trainable": sum(p.numel() for p in params), "device": self.device,
                      "memory_method": "cuda.max_memory_allocated" if self.device == "cuda" else
                      f"tensor storage (benchmarks.tensor_memory); resident: {self._peak.method}"}

    def _settle(self) -> None:
        gc.collect()
        if self._libc is not None:
            self._libc.malloc_trim(0)

    def _sync(self) -> None:
        if self.device == "cuda":
            import torch

            torch.cuda.synchronize()

    def _step(self) -> None:
        import torch.nn.functional as F

        self.opt.zero_grad(set_to_none=True)
        F.cross_entropy(self.model(self.x), self.y).backward()
        self.opt.step()

    def step(self) -> float:
        self._sync()
        start = time.perf_counter()
        self._step()
        self._sync()
        return time.perf_counter() - start

    def forward(self) -> float:
        import torch

        self.model.eval()
        with torch.no_grad():
            self._sync()
            start = time.perf_counter()
            self.model(self.x)
            self._sync()
            elapsed = time.perf_counter() - start
        self.model.train()
        return elapsed

    def peak(self) -> dict[str, int | None]:
        """Peak memory: ``tensors`` (GPU: over the timed region; CPU: through one more training step, counted
        exactly) and on the CPU ``resident``, the resident-set high-water mark of the timed region."""
        if self.device == "cuda":
            return {"tensors": self._peak.bytes(), "resident": None}
        from benchmarks import tensor_memory

        resident = self._peak.bytes() - self._base
        with tensor_memory.TensorBytes() as counted:
            self._step()
        return {"tensors": counted.peak - self._base_tensors, "resident": resident}


# -- parent side ------------------------------------------------------------------------------------------------
def _blocks(group: Group, planned: dict[str, Any]) -> list[list[Job]]:
    """What is measured side by side: per method, full fine-tuning, peftc and the method's peers."""
    full = Job(group.name, "full", group.backbone, group.image)
    blocks = []
    for method, info in planned["methods"].items():
        block = [full, Job(group.name, "peftc", group.backbone, group.image, method, PARAMS.get(method, {}))]
        block += [Job(group.name, kind, group.backbone, group.image, method, {}, peer_plan)
                  for kind, peer_plan in info["peers"].items()]
        blocks.append(block)
    return blocks


def _ratio(rounds: list[dict[str, dict[str, Any]]], a: str, b: str, metric: str) -> dict[str, float] | None:
    """Median over rounds of round-wise ``a/b`` (medians within a round), with its min and max."""
    values = []
    for r in rounds:
        if a in r and b in r:
            num, den = r[a].get(metric), r[b].get(metric)
            if num is None or den is None:  # not measured on this device (resident memory on a GPU)
                continue
            if metric not in ("peak_bytes", "rss_peak_bytes"):
                num, den = statistics.median(num), statistics.median(den)
            if den:
                values.append(num / den)
    if not values:
        return None
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "rounds": len(values)}


def measure_block(block: list[Job], *, rounds: int, warmup: int, batch: int, threads: int, console: Console,
                  failed: dict[str, str]) -> list[dict[str, dict[str, Any]]]:
    """Build each job of ``block`` in its own worker process, then time them in turn: each round gives every
    worker one training step and one eval forward, in alternating order. Returns one record per round."""
    workers: dict[str, Worker] = {}
    try:
        for job in block:
            console.print(f"[dim]building {job.key} on {job.backbone} @ {job.image}[/dim]")
            try:
                workers[job.key] = Worker(StepSession, job, warmup, batch, threads, timeout=1800)
            except IsolatedError as exc:
                failed[job.key] = str(exc)
                console.print(f"[yellow]{job.key} failed: {exc}[/yellow]")
        records: list[dict[str, dict[str, Any]]] = [{} for _ in range(rounds)]
        for r in range(rounds):
            order = list(workers) if r % 2 == 0 else list(reversed(workers))
            for phase in ("step", "forward"):
                for key in order:
                    if key in failed:
                        continue
                    try:
                        t = workers[key].call(phase, timeout=1800)
                    except IsolatedError as exc:
                        failed[key] = str(exc)
                        console.print(f"[yellow]{key} failed: {exc}[/yellow]")
                        continue
                    records[r].setdefault(key, {"step_s": [], "forward_s": []})[f"{phase}_s"].append(t)
        for key, worker in workers.items():
            if key in failed:
                continue
            peak = worker.call("peak")
            for record in records:
                if key in record:
                    record[key].update(worker.ready, peak_bytes=peak["tensors"], rss_peak_bytes=peak["resident"])
        return records
    finally:
        for worker in workers.values():
            worker.close()


def run(groups: tuple[Group, ...], *, extra_specs: bool, rounds: int, warmup: int, batch: int, threads: int,
        console: Console) -> dict[str, Any]:
    import timm  # noqa: F401  (imported once here, shared by every forked child)
    import torch  # noqa: F401
    import torchvision  # noqa: F401

    import peftc.compiler  # noqa: F401
    from peftc.plugins import ensure_loaded

    # ``import peftc`` alone is lazy: without this, each peftc child imported the compiler, the passes and the
    # rooms inside its measured window (13.5 MiB counted as "model at rest"), while HF PEFT's import was paid here
    ensure_loaded()

    peft_ok = importlib.util.find_spec("peft") is not None
    if peft_ok:
        import peft  # noqa: F401

    jobs: list[Job] = []
    per_round: list[dict[str, dict[str, Any]]] = []
    skipped: dict[str, str] = {}
    failed: dict[str, str] = {}
    for group in groups:
        planned = run_isolated(_plan_group, group, extra_specs, peft_ok)
        skipped.update({f"{group.name}/{k}": v for k, v in planned["skipped"].items()})
        for block in _blocks(group, planned):
            jobs += [j for j in block if j not in jobs]
            console.print(f"[bold]{group.name}: {', '.join(j.key for j in block)}[/bold]")
            per_round += measure_block(block, rounds=rounds, warmup=warmup, batch=batch, threads=threads,
                                       console=console, failed=failed)
    return _aggregate(jobs, per_round, skipped, failed)


def _aggregate(jobs: list[Job], per_round: list[dict[str, dict[str, Any]]], skipped: dict[str, str],
               failed: dict[str, str]) -> dict[str, Any]:
    variants: dict[str, Any] = {}
    for job in jobs:
        samples = [r[job.key] for r in per_round if job.key in r]
        if not samples:
            continue
        peaks = [s["peak_bytes"] for s in samples]
        variants[job.key] = {
            **{k: v for k, v in asdict(job).items() if k in ("group", "kind", "backbone", "image", "method", "params")},
            "trainable_params": samples[0]["trainable"],
            "step_s": summary([t for s in samples for t in s["step_s"]]),
            "forward_s": summary([t for s in samples for t in s["forward_s"]]),
            "peak_mb": {"median": statistics.median(peaks) / 2**20, "min": min(peaks) / 2**20,
                        "max": max(peaks) / 2**20},
            "model_mb": statistics.median(s["model_bytes"] for s in samples) / 2**20,
            **({"rss_peak_mb": statistics.median(s["rss_peak_bytes"] for s in samples) / 2**20,
                "model_rss_mb": statistics.median(s["model_rss_bytes"] for s in samples) / 2**20}
               if samples[0].get("rss_peak_bytes") is not None else {}),
            "memory_method": samples[0]["memory_method"],
            "device": samples[0]["device"],
        }
    ratios: dict[str, Any] = {}
    for job in jobs:
        if job.kind not in ("full", "peftc"):  # peftc vs a peer implementation of the same method
            pairs = [(f"{job.group}/peftc:{job.method}", job.key, f"peftc/{job.kind}", job.kind)]
            metrics = (("step_s", "step"), ("forward_s", "forward"), ("peak_bytes", "memory"),
                       ("rss_peak_bytes", "resident memory"))
        elif job.kind == "peftc":  # the method vs full fine-tuning
            pairs = [(job.key, f"{job.group}/full", "vs full", "full")]
            metrics = (("step_s", "step"), ("peak_bytes", "memory"))
        else:
            continue
        for ours, theirs, suffix, peer in pairs:
            if peer != "full" and ours in variants and theirs in variants and (
                    variants[ours]["trainable_params"] != variants[theirs]["trainable_params"]):
                failed[theirs] = (f"trains {variants[theirs]['trainable_params']:,} parameters, peftc "
                                  f"{variants[ours]['trainable_params']:,}: not the same adaptation, not compared")
                continue
            for metric, name in metrics:
                value = _ratio(per_round, ours, theirs, metric)
                if value:
                    ratios[f"{job.group} {job.method} {name} {suffix}"] = {
                        **value, "group": job.group, "method": job.method, "peer": peer, "metric": name}
    checks = []
    for key, (cid, label) in CHECKS.items():
        if key in ratios:
            ratios[key]["check"] = cid
            checks.append(check(cid, label, ratios[key]["median"], TARGETS[cid], unit="x"))
    return {"variants": variants, "ratios": ratios, "checks": checks, "skipped": skipped, "failed": failed}


def print_table(result: dict[str, Any], console: Console) -> None:
    table = Table(title=f"train step, batch {result['config']['batch']} (medians; "
                        f"{result['config']['rounds']} interleaved rounds)", header_style="bold")
    for col in ("variant", "backbone", "trainable", "step", "eval fwd", "model", "peak", "resident model",
                "resident peak"):
        table.add_column(col, justify="left" if col in ("variant", "backbone") else "right")
    for key, v in result["variants"].items():
        table.add_row(key, f"{v['backbone']}@{v['image']}", f"{v['trainable_params']:,}",
                      f"{v['step_s']['median'] * 1e3:.0f} ms", f"{v['forward_s']['median'] * 1e3:.0f} ms",
                      f"{v['model_mb']:.1f} MiB", f"{v['peak_mb']['median']:.1f} MiB",
                      f"{v['model_rss_mb']:.0f} MiB" if "model_rss_mb" in v else "",
                      f"{v['rss_peak_mb']:.0f} MiB" if "rss_peak_mb" in v else "")
    console.print(table)
    ratios = Table(title="ratios (median of per-round ratios; < 1 means peftc is cheaper)", header_style="bold")
    for col in ("ratio", "median", "min", "max", "target", ""):
        ratios.add_column(col, justify="left" if col == "ratio" else "right")
    targets = {c["id"]: c for c in result["checks"]}
    for name, r in result["ratios"].items():
        c = targets.get(r.get("check", ""))
        ratios.add_row(name, f"{r['median']:.3f}", f"{r['min']:.3f}", f"{r['max']:.3f}",
                       f"≤ {c['target']:.2f}" if c else "", c["verdict"] if c else "")
    console.print(ratios)
    for key, why in {**result["skipped"], **result["failed"]}.items():
        console.print(f"[dim]not measured: {key}: {why}[/dim]")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="vit_tiny and resnet50@112, LoRA, LN tuning and CLR, "
                                                             "6 rounds")
    parser.add_argument("--rounds", type=int, default=None,
                        help="interleaved rounds, one step and one forward per variant each (default 10; 6 --quick)")
    parser.add_argument("--batch", type=int, default=BATCH)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch threads per process")
    parser.add_argument("--methods", default=None,
                        help="comma-separated specs to measure instead of the defaults (lora, ln_tuning, clr; every "
                             "built-in spec without --quick), e.g. --methods lora,clr")
    args = parser.parse_args(argv)
    rounds = args.rounds or (6 if args.quick else 10)
    warmup = 1 if args.quick else 2
    groups = QUICK_GROUPS if args.quick else FULL_GROUPS
    methods = [m.strip() for m in args.methods.split(",") if m.strip()] if args.methods else None
    if methods:
        groups = tuple(replace(g, methods=tuple(methods)) for g in groups)
    console = Console()
    start = time.perf_counter()
    result = run(groups, extra_specs=not args.quick and not methods, rounds=rounds, warmup=warmup,
                 batch=args.batch, threads=args.threads, console=console)
    result["config"] = {"quick": args.quick, "batch": args.batch, "rounds": rounds,
                        "warmup": warmup, "threads": args.threads, "groups": [asdict(g) for g in groups],
                        "wall_s": time.perf_counter() - start}
    print_table(result, console)
    path = write_result("train_step", result)
    print(f"wrote {path}")


if __name__ == "__main__":
    sys.exit(main())
