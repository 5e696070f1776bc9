"""Replacement Learning vs end-to-end training: parameters, peak training memory and step time.

    python -m benchmarks.replacement [--rounds 2] [--steps 4] [--pairs 8] [--warmup 2] [--threads N]
                                     [--device cpu|cuda] [--only resnet50|deit_small]

Two backbones, batch 8: torchvision ``resnet50`` at 112×112 and timm ``deit_small_patch16_224`` at 224×224.
End-to-end is the plain backbone, every parameter trained; Replacement Learning is ``peftc.compile("replacement",
…)`` with its defaults (every other block of each run of identical blocks tied: resnet50 ties 5 blocks, deit_small
6). Both train with the same loop: zero_grad, forward, cross-entropy, backward, SGD with momentum 0.9 (one
momentum buffer per trained parameter) on random images and labels.

Memory: every measurement runs in its own fresh process (``python -m benchmarks.replacement --child …``), which
builds one variant, takes warm-up steps and trains ``steps`` steps. Its peak memory is tensor memory over those
steps — weights, gradients, optimizer state, saved activations and temporaries: on CUDA
``torch.cuda.max_memory_allocated``, on the CPU every live storage counted exactly through the last step
(:mod:`benchmarks.tensor_memory`). The CPU's resident-set high-water mark over the steps (Linux
``/proc/self/clear_refs``) is reported beside it; it includes the process itself (torch, timm), so its ratio is
diluted. Variants alternate over ``rounds``; the ratio is the median over rounds.

Step time: one more process builds both variants and alternates single steps (A B, B A, …) for ``pairs`` pairs,
so load that drifts on a shared machine hits both alike; the ratio is the median of the per-pair ratios (the
ratio of the fastest steps is reported too). Results: ``benchmarks/results/replacement.json``, written after
each backbone (with ``--only`` the other backbone's earlier results are kept).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from benchmarks.common import check, summary, write_result

BATCH = 8
CONFIGS = (("resnet50", "resnet50", 112), ("deit_small", "timm:deit_small_patch16_224", 224))
VARIANTS = ("end_to_end", "replacement")
CLASSES = 1000


# -- the child: one measurement -------------------------------------------------------------------------------


def _status_kib(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return None


def _reset_peak(device: str) -> str:
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        return "cuda.max_memory_allocated"
    try:
        Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
        return "VmHWM"
    except OSError:
        return "ru_maxrss (since process start)"


def _peak(device: str, method: str) -> int:
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize()
        return int(torch.cuda.max_memory_allocated())
    kib = _status_kib("VmHWM") if method == "VmHWM" else None
    if kib is not None:
        return kib * 1024
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)


class _Trainer:
    """One variant on one backbone, with its optimizer and a fixed random batch."""

    def __init__(self, job: dict[str, Any], variant: str):
        import torch

        import peftc
        from peftc.analysis.backbones import build_backbone

        self.device = job["device"]
        if variant == "replacement":
            model = peftc.compile("replacement", job["backbone"])
            self.tied = sum(1 for r in model.ledger.rewrites if r.action == "tie" and "module" in r.detail)
        else:
            model, self.tied = build_backbone(job["backbone"]).module, 0
            for p in model.parameters():
                p.requires_grad_(True)
        self.model = model.to(self.device).train()
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.opt = torch.optim.SGD(self.params, lr=1e-3, momentum=0.9)
        gen = torch.Generator().manual_seed(0)
        self.x = torch.randn(BATCH, 3, job["image"], job["image"], generator=gen).to(self.device)
        self.y = torch.randint(0, CLASSES, (BATCH,), generator=gen).to(self.device)

    def step(self) -> float:
        """One training step; returns its wall-clock seconds."""
        import torch
        import torch.nn.functional as F

        cuda = self.device.startswith("cuda")
        if cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        self.opt.zero_grad(set_to_none=True)
        F.cross_entropy(self.model(self.x), self.y).backward()
        self.opt.step()
        if cuda:
            torch.cuda.synchronize()
        return time.perf_counter() - start

    def sizes(self) -> dict[str, int]:
        import torch

        state = sum(t.numel() for s in self.opt.state.values() for t in s.values() if torch.is_tensor(t))
        return {"params": sum(p.numel() for p in self.model.parameters()),
                "trainable": sum(p.numel() for p in self.params), "optimizer_state": state,
                "tied_blocks": self.tied}


def measure(job: dict[str, Any]) -> dict[str, Any]:
    """Memory job: one variant, ``warmup`` steps, then the peak over ``steps`` steps (and the sizes)."""
    import torch

    torch.set_num_threads(job["threads"])
    trainer = _Trainer(job, job["variant"])
    for _ in range(job["warmup"]):
        trainer.step()
    method = _reset_peak(job["device"])
    for _ in range(job["steps"] - 1):
        trainer.step()
    if job["device"].startswith("cuda"):
        trainer.step()
        return {**trainer.sizes(), "peak_bytes": _peak(job["device"], method), "memory_method": method}
    from benchmarks.tensor_memory import TensorBytes

    with TensorBytes() as counted:
        trainer.step()
    return {**trainer.sizes(), "peak_bytes": counted.peak, "resident_peak_bytes": _peak(job["device"], method),
            "memory_method": f"tensor storage (benchmarks.tensor_memory); resident: {method}"}


def measure_time(job: dict[str, Any]) -> dict[str, Any]:
    """Timing job: both variants in one process, single steps alternating (A B, B A, …)."""
    import torch

    torch.set_num_threads(job["threads"])
    trainers = {v: _Trainer(job, v) for v in VARIANTS}
    for _ in range(job["warmup"]):
        for trainer in trainers.values():
            trainer.step()
    times: dict[str, list[float]] = {v: [] for v in VARIANTS}
    for i in range(job["pairs"]):
        for v in (VARIANTS if i % 2 == 0 else VARIANTS[::-1]):
            times[v].append(trainers[v].step())
    return times


# -- the parent: rounds, ratios, report -----------------------------------------------------------------------


def _run_child(job: dict[str, Any], timeout: float) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "benchmarks.replacement", "--child", json.dumps(job)]
    root = Path(__file__).resolve().parent.parent
    out = subprocess.run(cmd, cwd=root, capture_output=True, text=True, timeout=timeout, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"{job['name']}/{job['variant']} failed:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def _mib(n: float) -> str:
    return f"{n / 2**20:,.0f} MiB"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--steps", type=int, default=4, help="steps measured for peak memory")
    parser.add_argument("--pairs", type=int, default=8, help="alternating step pairs timed")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--only", choices=[c[0] for c in CONFIGS], help="measure one backbone")
    parser.add_argument("--timeout", type=float, default=1800.0, help="seconds per measurement")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        job = json.loads(args.child)
        print(json.dumps(measure_time(job) if job["variant"] == "both" else measure(job)))
        return 0

    from rich.console import Console
    from rich.table import Table

    console = Console()
    results, checks = _previous(args)  # other backbones' results stay (``--only`` refreshes one)
    for name, backbone, image in CONFIGS:
        if args.only and name != args.only:
            continue
        base = {"name": name, "backbone": backbone, "image": image, "steps": args.steps, "pairs": args.pairs,
                "warmup": args.warmup, "threads": args.threads, "device": args.device}
        runs: dict[str, list[dict[str, Any]]] = {v: [] for v in VARIANTS}
        for r in range(args.rounds):
            for variant in (VARIANTS if r % 2 == 0 else VARIANTS[::-1]):
                console.print(f"[dim]{name} {variant}: memory (round {r + 1}/{args.rounds})[/dim]")
                runs[variant].append(_run_child({**base, "variant": variant}, args.timeout))
        console.print(f"[dim]{name}: step time, {args.pairs} alternating pairs[/dim]")
        times = _run_child({**base, "variant": "both"}, args.timeout)
        e2e, rl = runs["end_to_end"], runs["replacement"]
        ratios = {
            "params": rl[0]["params"] / e2e[0]["params"],
            "trainable": rl[0]["trainable"] / e2e[0]["trainable"],
            "optimizer_state": rl[0]["optimizer_state"] / e2e[0]["optimizer_state"],
            "peak_memory": statistics.median(b["peak_bytes"] / a["peak_bytes"] for a, b in zip(e2e, rl)),
            "step_time": statistics.median(b / a for a, b in zip(times["end_to_end"], times["replacement"])),
            "step_time_fastest": min(times["replacement"]) / min(times["end_to_end"]),
        }
        if "resident_peak_bytes" in e2e[0]:
            ratios["resident_peak_memory"] = statistics.median(
                b["resident_peak_bytes"] / a["resident_peak_bytes"] for a, b in zip(e2e, rl))
        results[name] = {
            "backbone": backbone, "batch": BATCH, "image": image,
            "end_to_end": _merge(e2e, times["end_to_end"]), "replacement": _merge(rl, times["replacement"]),
            "ratios": ratios,
        }
        checks = [c for c in checks if not c["id"].startswith(f"replacement_{name}_")]
        for key, label in (("params", "parameters"), ("peak_memory", "peak training memory"),
                           ("step_time", "training step time")):
            checks.append(check(f"replacement_{name}_{key}", f"Replacement Learning / end-to-end, {name}: {label}",
                                round(ratios[key], 4), 1.0, "x", suite="replacement"))
        table = Table(title=f"{name} ({backbone}), batch {BATCH}, {image}x{image}, {args.device}")
        for col in ("", "parameters", "trainable", "SGD state", "peak memory", "resident peak", "step time"):
            table.add_column(col, justify="right")
        for label, variant in (("end-to-end", "end_to_end"), ("replacement", "replacement")):
            m = results[name][variant]
            table.add_row(label, f"{m['params']:,}", f"{m['trainable']:,}", f"{m['optimizer_state']:,}",
                          _mib(m["peak_bytes"]), _mib(m["resident_peak_bytes"]) if "resident_peak_bytes" in m else "",
                          f"{m['step_s'] * 1000:,.0f} ms")
        table.add_row("ratio", f"{ratios['params']:.3f}x", f"{ratios['trainable']:.3f}x",
                      f"{ratios['optimizer_state']:.3f}x", f"{ratios['peak_memory']:.3f}x",
                      f"{ratios['resident_peak_memory']:.3f}x" if "resident_peak_memory" in ratios else "",
                      f"{ratios['step_time']:.3f}x (fastest {ratios['step_time_fastest']:.3f}x)")
        console.print(table)
        results[name]["settings"] = {"rounds": args.rounds, "steps": args.steps, "pairs": args.pairs,
                                     "warmup": args.warmup, "threads": args.threads, "device": args.device,
                                     "optimizer": "SGD(momentum=0.9)"}
        path = write_result("replacement", {"results": results, "checks": checks})  # after each backbone
        console.print(f"wrote {path}")
    return 0


def _previous(args: argparse.Namespace) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    from benchmarks.common import RESULTS

    path = RESULTS / "replacement.json"
    if not args.only or not path.is_file():
        return {}, []
    try:
        old = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return {}, []
    return dict(old.get("results", {})), list(old.get("checks", []))


def _merge(rows: list[dict[str, Any]], times: list[float]) -> dict[str, Any]:
    """One variant: sizes from the first memory run, the median peak over rounds, its timed steps."""
    first = rows[0]
    return {
        **{k: first[k] for k in ("params", "trainable", "optimizer_state", "tied_blocks", "memory_method")},
        "step_s": statistics.median(times),
        "step": summary(times),
        "step_samples": times,
        "peak_bytes": statistics.median(r["peak_bytes"] for r in rows),
        "peak_bytes_per_round": [r["peak_bytes"] for r in rows],
        **({"resident_peak_bytes": statistics.median(r["resident_peak_bytes"] for r in rows)}
           if "resident_peak_bytes" in first else {}),
    }


if __name__ == "__main__":
    sys.exit(main())
