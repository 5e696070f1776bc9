"""How long compilation takes, as a ratio to its floor: a bare torch.fx trace of the same backbone.

    python -m benchmarks.compile_time [--runs 9] [--quick]

Absolute milliseconds do not travel between machines; the cost of tracing the backbone does the same work on
every machine, so each spec is timed against it, round-robin in one run (drifting load hits both alike):

* **bare trace** — ``torch.fx.Tracer`` (standard layers as leaves) plus the ``GraphModule``: the least any
  fx-based rewrite can cost;
* **trace + passes** — peftc's ``rewrite`` on a fresh copy of the backbone (the copy is made outside the timer),
  hashed already, as a backbone built by name is, so the rewrite copies no weight;
* **public call** — ``peftc.compile(spec, module)`` end to end: spec loading, the structural copy, trace,
  passes, own storage for every tensor the spec trains (the user's module must never change: for specs that
  train everything — ConFiT, Replacement Learning, the generative classifier — that is a copy of the weights),
  the report and the task bank (what a user of the Python API waits for).

Both peftc timings come cold (the per-architecture trace cache, :mod:`peftc.analysis.trace_cache`, emptied
before the call: a process's first compile of that architecture; the targets apply to these) and warm (the
same architecture compiled before in the process: the trace is a copy of the kept graph).

Targets: trace + passes ≤ 1.5× the bare trace for every built-in spec, ≤ 1.2× for specs that only freeze,
train or swap a head; the public call ≤ 2× the bare trace; ``peftc --help``, ``peftc specs`` and
``peftc validate SPEC`` ≤ 0.5 s and ``peftc compile clr -b resnet50`` ≤ 3.0 s end to end (subprocesses, imports
included). --quick: CLR and the linear probe on resnet50, LoRA on ViT-B/16, fewer runs.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

from rich.console import Console
from rich.table import Table

from benchmarks.common import check, summary, timings, verdict, write_result

BACKBONES = ("resnet50", "timm:vit_base_patch16_224", "timm:deit_small_patch16_224", "timm:vit_large_patch16_224",
             "convnext_base")
QUICK_CASES = [("clr", "resnet50"), ("linear_probe", "resnet50"), ("lora", "timm:vit_base_patch16_224")]
SIMPLE_PRIMITIVES = frozenset({"freeze", "train", "head"})  # specs made only of these get the tighter target
TARGET_PASSES = 1.5
TARGET_SIMPLE = 1.2
TARGET_PUBLIC = 2.0
TARGET_INSTANT_S = 0.5
TARGET_CLI_S = 3.0


def cases(quick: bool) -> list[tuple[str, str]]:
    from peftc.language import builtin_specs

    if quick:
        return QUICK_CASES
    return [(s, b) for b in BACKBONES for s in sorted(builtin_specs())]


def _round_robin(calls: dict[str, tuple[Callable[[], Any], Callable[[Any], Any]]], runs: int) -> dict[str, list]:
    """Seconds per call, one call of each per round after a warm-up round. Each entry is (prepare, timed):
    ``prepare()`` runs outside the timer and its result is passed to ``timed``."""
    samples: dict[str, list[float]] = {name: [] for name in calls}
    for i in range(runs + 1):
        for name, (prepare, timed) in calls.items():
            arg = prepare()
            start = time.perf_counter()
            timed(arg)
            if i:
                samples[name].append(time.perf_counter() - start)
    return samples


def _hashed(bb: Any) -> Any:
    """A backbone as ``build_backbone`` returns one: hashed, sharing its storage with nobody who trains, so the
    rewrite copies nothing (what a user's module costs on top — copies of the tensors a spec trains — is in the
    public call)."""
    bb.digest()
    return bb


def measure(specs: list[str], backbone_id: str, runs: int) -> dict[str, dict[str, Any] | None]:
    """Per spec: medians of the three timings and the two ratios (None where the spec does not apply)."""
    from torch import fx

    import peftc
    from peftc.analysis import trace_cache
    from peftc.analysis.backbones import build_backbone, from_module, shared_copy
    from peftc.analysis.canonical import canonicalize
    from peftc.compiler import rewrite
    from peftc.errors import PeftcError
    from peftc.language import load_spec

    module = build_backbone(backbone_id).module
    canonicalize(module)
    out: dict[str, dict[str, Any] | None] = {}
    for name in specs:
        spec = load_spec(name)
        try:
            rewrite(spec, from_module(shared_copy(module)))
        except PeftcError as exc:
            out[name] = None
            print(f"  {name} on {backbone_id}: does not apply ({str(exc).splitlines()[0][:100]})", flush=True)
            continue
        def cold(make: Callable[[], Any] = lambda: None) -> Callable[[], Any]:
            return lambda: (trace_cache.clear(), make())[1]

        def fresh() -> Any:
            return _hashed(from_module(shared_copy(module)))

        samples = _round_robin({
            "bare": (lambda: None, lambda _: fx.GraphModule(module, fx.Tracer().trace(module))),
            "passes": (cold(fresh), lambda bb: rewrite(spec, bb)),  # noqa: B023
            "passes_warm": (fresh, lambda bb: rewrite(spec, bb)),  # noqa: B023
            "public": (cold(), lambda _: peftc.compile(name, module)),  # noqa: B023
            "public_warm": (lambda: None, lambda _: peftc.compile(name, module)),  # noqa: B023
        }, runs)
        med = {k: statistics.median(v) for k, v in samples.items()}
        simple = {rule.op for rule in spec.rules} <= SIMPLE_PRIMITIVES
        out[name] = {"bare_s": med["bare"], **{f"{k}_s": med[k] for k in samples if k != "bare"},
                     **{f"{k}_ratio": med[k] / med["bare"] for k in samples if k != "bare"},
                     "passes_target": TARGET_SIMPLE if simple else TARGET_PASSES}
        row = out[name]
        print(f"  {name} on {backbone_id}: bare {med['bare'] * 1e3:.0f} ms, passes {row['passes_ratio']:.2f}x "
              f"(warm {row['passes_warm_ratio']:.2f}x), public {row['public_ratio']:.2f}x "
              f"(warm {row['public_warm_ratio']:.2f}x)", flush=True)
    return out


def cli_wall(args: list[str], runs: int) -> dict[str, float]:
    cmd = [sys.executable, "-m", "peftc", *args]
    return summary(timings(lambda: subprocess.run(cmd, check=True, capture_output=True), runs=runs, warmup=1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=9)
    parser.add_argument("--quick", action="store_true", help="three cases, fewer runs")
    parser.add_argument("--backbones", default=None, help="comma-separated backbones to measure (default: all)")
    args = parser.parse_args()
    runs = 5 if args.quick else args.runs
    only = set(args.backbones.split(",")) if args.backbones else None
    by_backbone: dict[str, list[str]] = {}
    for spec, backbone in cases(args.quick):
        if only is not None and backbone not in only:
            continue
        by_backbone.setdefault(backbone, []).append(spec)
    rows: dict[str, dict[str, Any]] = {}
    not_applicable: list[str] = []
    for backbone, specs in by_backbone.items():
        for spec, row in measure(specs, backbone, runs).items():
            if row is None:
                not_applicable.append(f"{spec} on {backbone}")
            else:
                rows[f"{spec} on {backbone}"] = row
    cli_runs = 3 if args.quick else 5
    cli = {"peftc --help": (cli_wall(["--help"], cli_runs), TARGET_INSTANT_S),
           "peftc specs": (cli_wall(["specs"], cli_runs), TARGET_INSTANT_S),
           "peftc validate memvp": (cli_wall(["validate", "memvp"], cli_runs), TARGET_INSTANT_S),
           "peftc compile clr -b resnet50": (cli_wall(["compile", "clr", "-b", "resnet50", "--json"], cli_runs),
                                             TARGET_CLI_S)}

    table = Table(title="compile time as a ratio to a bare fx trace (medians, interleaved)", header_style="bold")
    for col in ("case", "bare trace", "trace+passes", "target", "", "peftc.compile", "target", ""):
        table.add_column(col, justify="left" if col == "case" else "right")
    checks = []
    for case, r in rows.items():
        table.add_row(case, f"{r['bare_s'] * 1e3:.0f} ms", f"{r['passes_ratio']:.2f}×", f"{r['passes_target']}×",
                      verdict(r["passes_ratio"], r["passes_target"]), f"{r['public_ratio']:.2f}×",
                      f"{TARGET_PUBLIC}×", verdict(r["public_ratio"], TARGET_PUBLIC))
        checks.append(check(f"compile passes {case}", f"trace + passes / bare trace, {case}", r["passes_ratio"],
                            r["passes_target"], unit="x"))
        checks.append(check(f"compile public {case}", f"peftc.compile / bare trace, {case}", r["public_ratio"],
                            TARGET_PUBLIC, unit="x"))
        checks.append(check(f"compile passes warm {case}", f"trace + passes / bare trace, warm trace cache, {case}",
                            r["passes_warm_ratio"], r["passes_target"], unit="x"))
        checks.append(check(f"compile public warm {case}", f"peftc.compile / bare trace, warm trace cache, {case}",
                            r["public_warm_ratio"], TARGET_PUBLIC, unit="x"))
    Console().print(table)
    cli_table = Table(title="command line, end to end (subprocess, imports included)", header_style="bold")
    for col in ("command", "median", "min", "target", ""):
        cli_table.add_column(col, justify="left" if col == "command" else "right")
    for name, (s, target) in cli.items():
        cli_table.add_row(name, f"{s['median']:.2f} s", f"{s['min']:.2f} s", f"{target} s",
                          verdict(s["median"], target))
        checks.append(check(f"cli {name}", f"{name}, end to end", s["median"], target, unit="s"))
    Console().print(cli_table)
    if not_applicable:
        print("does not apply:", ", ".join(not_applicable))
    path = write_result("compile_time", {
        "cases": rows,
        "cli_s": {name: s for name, (s, _) in cli.items()},
        "targets": {"passes_ratio": TARGET_PASSES, "simple_passes_ratio": TARGET_SIMPLE,
                    "public_ratio": TARGET_PUBLIC, "instant_cli_s": TARGET_INSTANT_S, "compile_cli_s": TARGET_CLI_S},
        "checks": checks,
        "not_applicable": not_applicable,
    })
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
