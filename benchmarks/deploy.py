"""Deployment latency on CPU: plain backbone vs the rewritten model (unfolded, folded) × eager / torch.compile / ORT.

    python -m benchmarks.deploy [--quick] [--runs 10] [--threads 2] [--models clr-resnet50,lora-deit_small]

For each model, the three graphs — the stock backbone, the compiled peftc model as trained (unfolded) and its
folded deployment graph — are timed under each backend at batch 1 and 8. All candidates of one model and batch
size are timed round-robin in the same process (one call of each per round), so machine load that drifts
during the run hits them alike and the ratios are meaningful even on a shared machine. torch and ONNX Runtime
use the same thread count. Results: a table on stdout and ``benchmarks/results/deploy.json``.

Targets: the folded graph under ORT ≤ 1.03× the plain backbone under ORT; ORT ≥ 1.5× faster than eager at batch
8 on resnet50. CLR keeps its depthwise convs after folding (they are not linear in a frozen layer's *input*),
so its folded graph is expected to cost a little more than the backbone; LoRA folds away completely.
"""

from __future__ import annotations

import argparse
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.table import Table

from benchmarks.common import verdict, write_result

MODELS = {
    "clr-resnet50": ("clr", "resnet50", {}),
    "lora-deit_small": ("lora", "timm:deit_small_patch16_224", {"targets": ["qkv", "proj", "fc1", "fc2"]}),
}
BACKENDS = ("eager", "compile", "ort")
VARIANTS = ("plain", "unfolded", "folded")
TARGET_FOLDED_VS_PLAIN_ORT = 1.03
TARGET_ORT_SPEEDUP_B8 = 1.5


def _available(spec: str) -> bool:
    from peftc.language import builtin_specs

    return spec in builtin_specs()


def _modules(spec: str, backbone: str, params: dict[str, Any]) -> tuple[dict[str, torch.nn.Module], Any]:
    """The three graphs of one model: plain backbone, compiled (unfolded), folded."""
    import peftc
    from peftc.analysis.backbones import build_backbone
    from peftc.export.fold import fold

    model = peftc.compile(spec, backbone, **params)
    _perturb(model)
    plain = build_backbone(backbone).module.eval()
    folded = fold(model)
    for m in (plain, model.net, folded.module):
        for p in m.parameters():
            p.requires_grad_(False)
    return {"plain": plain, "unfolded": model.net.eval(), "folded": folded.module}, (model, folded.report)


def _perturb(model: Any) -> None:
    """Make trainable tensors non-trivial (as after training) so folding cannot take identity shortcuts."""
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.trainable_parameters():
            p.add_(0.01 * torch.randn(p.shape, generator=gen))


def _ort_callable(module: torch.nn.Module, size: tuple[int, int, int], reference: Callable[..., Any], tmp: Path,
                  name: str, threads: int) -> Callable[[torch.Tensor], Callable[[], Any]]:
    from peftc.export.onnx import write_onnx
    from peftc.export.ort import OrtRunner
    from peftc.export.source import Deployable

    deployable = Deployable(module, size, "default", ["default"], [None], reference, None, name, name)
    path = tmp / f"{name}.onnx"
    write_onnx(deployable, path, provider="cpu")
    runner = OrtRunner(str(path), "cpu", threads=threads)

    def bind(x: torch.Tensor) -> Callable[[], Any]:
        feed = runner.feed(x)
        return lambda: runner.run_feed(feed)

    return bind


def _eager_callable(module: torch.nn.Module) -> Callable[[torch.Tensor], Callable[[], Any]]:
    def bind(x: torch.Tensor) -> Callable[[], Any]:
        def call() -> Any:
            with torch.no_grad():
                return module(x)

        return call

    return bind


Bind = Callable[[torch.Tensor], Callable[[], Any]]  # input batch -> a zero-argument call to time


def _compile_callable(module: torch.nn.Module, size: tuple[int, int, int]) -> Bind:
    from peftc.export.compile import compile_module

    runner = compile_module(module, torch.randn(2, *size))
    return lambda x: (lambda: runner(x))


def bench_model(key: str, batches: list[int], runs: int, threads: int, console: Console) -> dict[str, Any]:
    from peftc.export.bench import measure_interleaved

    spec, backbone, params = MODELS[key]
    console.print(f"[bold]{key}[/]: building and folding")
    modules, (model, report) = _modules(spec, backbone, params)
    size = tuple(model.backbone.input_size)
    callables: dict[tuple[str, str], Callable[[torch.Tensor], Callable[[], Any]]] = {}
    with tempfile.TemporaryDirectory(prefix="peftc-bench-") as tmp:
        for variant, module in modules.items():
            ref = _eager_callable(module)
            callables[(variant, "eager")] = ref
            console.print(f"  {variant}: torch.compile")
            callables[(variant, "compile")] = _compile_callable(module, size)
            console.print(f"  {variant}: ONNX export + ORT session")

            def reference(x: torch.Tensor, module: torch.nn.Module = module) -> torch.Tensor:
                with torch.no_grad():
                    return module(x)

            callables[(variant, "ort")] = _ort_callable(module, size, reference, Path(tmp), f"{key}-{variant}",
                                                        threads)
    rows = []
    for batch in batches:
        console.print(f"  timing batch {batch} ({runs} interleaved rounds)")
        x = torch.randn(batch, *size, generator=torch.Generator().manual_seed(batch))
        bound = {f"{v}/{b}": make(x) for (v, b), make in callables.items()}
        timings = measure_interleaved(bound, batch=batch, runs=runs, warmup=1)
        for (variant, backend) in callables:
            t = timings[f"{variant}/{backend}"]
            rows.append({"model": key, "variant": variant, "backend": backend, **t.to_dict()})
    params_count = {v: sum(p.numel() for p in m.parameters()) for v, m in modules.items()}
    return {"model": key, "spec": spec, "backbone": backbone, "params": params_count,
            "fold": report.to_dict(), "rows": rows}


def _median(rows: list[dict[str, Any]], model: str, variant: str, backend: str, batch: int) -> float:
    return next(r["median_ms"] for r in rows if (r["model"], r["variant"], r["backend"], r["batch"])
                == (model, variant, backend, batch))


def targets(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for res in results:
        rows, key = res["rows"], res["model"]
        for batch in sorted({r["batch"] for r in rows}):
            ratio = _median(rows, key, "folded", "ort", batch) / _median(rows, key, "plain", "ort", batch)
            out.append({"name": f"{key}: folded/plain under ORT, batch {batch}", "value": round(ratio, 3),
                        "target": f"<= {TARGET_FOLDED_VS_PLAIN_ORT}",
                        "verdict": verdict(ratio, TARGET_FOLDED_VS_PLAIN_ORT)})
        if "resnet50" in res["backbone"] and any(r["batch"] == 8 for r in rows):
            for variant in ("plain", "folded"):
                speedup = _median(rows, key, variant, "eager", 8) / _median(rows, key, variant, "ort", 8)
                out.append({"name": f"{key}: ORT speed-up over eager, {variant}, batch 8", "value": round(speedup, 3),
                            "target": f">= {TARGET_ORT_SPEEDUP_B8}",
                            "verdict": verdict(speedup, TARGET_ORT_SPEEDUP_B8, lower_is_better=False)})
    return out


def render(results: list[dict[str, Any]], goals: list[dict[str, Any]], console: Console) -> None:
    for res in results:
        table = Table(title=f"{res['model']} — median ms (ratio to plain, same backend)", title_justify="left",
                      header_style="bold")
        table.add_column("batch", justify="right")
        table.add_column("graph")
        for backend in BACKENDS:
            table.add_column(backend, justify="right")
        rows = res["rows"]
        for batch in sorted({r["batch"] for r in rows}):
            for variant in VARIANTS:
                cells = []
                for backend in BACKENDS:
                    ms = _median(rows, res["model"], variant, backend, batch)
                    base = _median(rows, res["model"], "plain", backend, batch)
                    cells.append(f"{ms:.1f}" + ("" if variant == "plain" else f" ({ms / base:.2f}x)"))
                table.add_row(str(batch), variant, *cells)
        console.print(table)
        p = res["params"]
        console.print(f"  params: plain {p['plain']:,}, unfolded {p['unfolded']:,}, folded {p['folded']:,}")
    for goal in goals:
        colour = "green" if goal["verdict"] == "PASS" else "red"
        console.print(f"[{colour}]{goal['verdict']}[/] {goal['name']}: {goal['value']} (target {goal['target']})")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer rounds (5) and only CLR-resnet50")
    parser.add_argument("--runs", type=int, default=10, help="interleaved timed rounds per batch size")
    parser.add_argument("--threads", type=int, default=2, help="CPU threads for torch and ONNX Runtime")
    parser.add_argument("--models", default=",".join(MODELS), help="comma-separated: " + ", ".join(MODELS))
    parser.add_argument("--batches", default="1,8", help="comma-separated batch sizes")
    args = parser.parse_args(argv)
    console = Console(highlight=False)
    torch.set_num_threads(args.threads)
    runs = 5 if args.quick else args.runs
    keys = ["clr-resnet50"] if args.quick else [k.strip() for k in args.models.split(",") if k.strip()]
    batches = [int(b) for b in args.batches.split(",")]
    results = []
    for key in keys:
        if key not in MODELS:
            parser.error(f"unknown model {key!r}; choose from {', '.join(MODELS)}")
        if not _available(MODELS[key][0]):
            console.print(f"[yellow]skipping {key}: spec {MODELS[key][0]!r} is not built in yet[/]")
            continue
        results.append(bench_model(key, batches, runs, args.threads, console))
    goals = targets(results)
    render(results, goals, console)
    path = write_result("deploy", {"runs": runs, "threads": args.threads, "batches": batches, "results": results,
                                   "targets": goals, "device": "cpu"})
    console.print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
