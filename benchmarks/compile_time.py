"""How long compilation takes: trace + passes per spec × backbone, and the `peftc compile` command end to end.

    python -m benchmarks.compile_time [--runs 15] [--quick]

Trace + passes is timed in-process on a fresh copy of the backbone each run (construction, copying and
``import torch`` are excluded, as they do not depend on peftc), for every built-in spec on resnet50, timm
ViT-B/16 and DeiT-S (a spec that does not apply to a backbone is listed as such); --quick times CLR on resnet50
and LoRA on ViT-B/16 only. The CLI is timed as a subprocess, imports included.
Targets: trace + passes ≤ 50 ms on resnet50 and ≤ 100 ms on ViT-B/16, per spec; CLI end to end ≤ 5 s.
"""

from __future__ import annotations

import argparse
import copy
import subprocess
import sys
import time

from rich.console import Console
from rich.table import Table

from benchmarks.common import check, summary, timings, verdict, write_result

BACKBONES = ("resnet50", "timm:vit_base_patch16_224", "timm:deit_small_patch16_224")
QUICK_CASES = [("clr", "resnet50"), ("lora", "timm:vit_base_patch16_224")]
TARGET_PASSES_S = 0.050
TARGETS_S = {"resnet50": TARGET_PASSES_S, "timm:vit_base_patch16_224": 0.100}  # trace + passes, per backbone
TARGET_CLI_S = 5.0


def cases() -> list[tuple[str, str]]:
    """Every built-in spec on every benchmark backbone, CLR on resnet50 first."""
    from peftc.language import builtin_specs

    return QUICK_CASES + [(s, b) for b in BACKBONES for s in sorted(builtin_specs()) if (s, b) not in QUICK_CASES]


def trace_and_passes(spec_name: str, backbone_id: str, runs: int) -> dict[str, float] | None:
    """Seconds of ``rewrite`` per run, or None when the spec does not apply to the backbone."""
    from peftc.analysis.backbones import build_backbone
    from peftc.analysis.canonical import canonicalize
    from peftc.compiler import rewrite
    from peftc.errors import PeftcError
    from peftc.language import load_spec

    spec = load_spec(spec_name)
    base = build_backbone(backbone_id)
    canonicalize(base.module)
    samples = []
    for i in range(runs + 1):  # the first run is the warm-up
        bb = copy.deepcopy(base)
        start = time.perf_counter()
        try:
            rewrite(spec, bb)
        except PeftcError:
            return None
        if i:
            samples.append(time.perf_counter() - start)
    return summary(samples)


def cli_wall(runs: int) -> dict[str, float]:
    cmd = [sys.executable, "-m", "peftc", "compile", "clr", "--backbone", "resnet50", "--json"]
    return summary(timings(lambda: subprocess.run(cmd, check=True, capture_output=True), runs=runs, warmup=1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=15)
    parser.add_argument("--quick", action="store_true", help="fewer runs; CLR on resnet50 and LoRA on ViT-B only")
    args = parser.parse_args()
    runs = 5 if args.quick else args.runs
    timed = {(s, b): trace_and_passes(s, b, runs) for s, b in (QUICK_CASES if args.quick else cases())}
    rows = {f"{s} on {b}": t for (s, b), t in timed.items() if t is not None}
    targets = {f"{s} on {b}": TARGETS_S[b] for (s, b), t in timed.items() if t is not None and b in TARGETS_S}
    not_applicable = [f"{s} on {b}" for (s, b), t in timed.items() if t is None]
    cli = cli_wall(3 if args.quick else 5)
    table = Table(title="compile time (median of runs; seconds)", header_style="bold")
    for col in ("case", "median", "min", "max", "target", ""):
        table.add_column(col, justify="left" if col == "case" else "right")
    first = next(iter(rows))
    for name, s in rows.items():
        target = targets.get(name)
        table.add_row(f"trace+passes {name}", f"{s['median'] * 1e3:.1f} ms", f"{s['min'] * 1e3:.1f} ms",
                      f"{s['max'] * 1e3:.1f} ms", f"{target * 1e3:.0f} ms" if target else "",
                      verdict(s["median"], target) if target else "")
    table.add_row("peftc compile clr -b resnet50 (CLI)", f"{cli['median']:.2f} s", f"{cli['min']:.2f} s",
                  f"{cli['max']:.2f} s", f"{TARGET_CLI_S:.0f} s", verdict(cli["median"], TARGET_CLI_S))
    Console().print(table)
    if not_applicable:
        print("does not apply:", ", ".join(not_applicable))
    checks = [check(f"compile {name}", f"trace + passes, {name}", rows[name]["median"], target, unit="s")
              for name, target in targets.items()]
    checks.append(check("compile cli", "peftc compile clr -b resnet50, end to end", cli["median"], TARGET_CLI_S,
                        unit="s"))
    path = write_result("compile_time", {
        "trace_and_passes_s": rows,
        "cli_end_to_end_s": cli,
        "targets": {"trace_and_passes_s": TARGETS_S, "cli_s": TARGET_CLI_S},
        "verdicts": {"passes": verdict(rows[first]["median"], TARGET_PASSES_S),
                     "cli": verdict(cli["median"], TARGET_CLI_S)},
        "checks": checks,
        "not_applicable": not_applicable,
    })
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
