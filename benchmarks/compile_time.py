"""How long compilation takes: trace + passes per spec × backbone, and the `peftc compile` command end to end.

    python -m benchmarks.compile_time [--runs 15] [--quick]

Trace + passes is timed in-process on a freshly built backbone each run (construction and ``import torch`` are
excluded, as they do not depend on peftc). The CLI is timed as a subprocess, imports included.
Targets: trace + passes ≤ 50 ms for CLR on resnet50; CLI end to end ≤ 5 s.
"""

from __future__ import annotations

import argparse
import subprocess
import sys

from rich.console import Console
from rich.table import Table

from benchmarks.common import summary, timings, verdict, write_result

CASES = [("clr", "resnet50"), ("clr", "resnet18"), ("clr", "timm:resnet50")]
TARGET_PASSES_S = 0.050
TARGET_CLI_S = 5.0


def trace_and_passes(spec_name: str, backbone_id: str, runs: int) -> dict[str, float]:
    from peftc.backbones import build_backbone
    from peftc.canonical import canonicalize
    from peftc.compiler import rewrite
    from peftc.spec import load_spec

    spec = load_spec(spec_name)
    backbones = [build_backbone(backbone_id) for _ in range(runs + 1)]
    for bb in backbones:
        canonicalize(bb.module)
    pending = iter(backbones)
    return summary(timings(lambda: rewrite(spec, next(pending)), runs=runs, warmup=1))


def cli_wall(runs: int) -> dict[str, float]:
    cmd = [sys.executable, "-m", "peftc", "compile", "clr", "--backbone", "resnet50", "--json"]
    return summary(timings(lambda: subprocess.run(cmd, check=True, capture_output=True), runs=runs, warmup=1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=15)
    parser.add_argument("--quick", action="store_true", help="fewer runs, resnet50 only")
    args = parser.parse_args()
    runs = 5 if args.quick else args.runs
    cases = CASES[:1] if args.quick else CASES
    rows = {f"{s} on {b}": trace_and_passes(s, b, runs) for s, b in cases}
    cli = cli_wall(3 if args.quick else 5)
    table = Table(title="compile time (median of runs; seconds)", header_style="bold")
    for col in ("case", "median", "min", "max", "target", ""):
        table.add_column(col, justify="left" if col == "case" else "right")
    first = next(iter(rows))
    for name, s in rows.items():
        target = TARGET_PASSES_S if name == first else None
        table.add_row(f"trace+passes {name}", f"{s['median'] * 1e3:.1f} ms", f"{s['min'] * 1e3:.1f} ms",
                      f"{s['max'] * 1e3:.1f} ms", f"{target * 1e3:.0f} ms" if target else "",
                      verdict(s["median"], target) if target else "")
    table.add_row("peftc compile clr -b resnet50 (CLI)", f"{cli['median']:.2f} s", f"{cli['min']:.2f} s",
                  f"{cli['max']:.2f} s", f"{TARGET_CLI_S:.0f} s", verdict(cli["median"], TARGET_CLI_S))
    Console().print(table)
    path = write_result("compile_time", {
        "trace_and_passes_s": rows,
        "cli_end_to_end_s": cli,
        "targets": {"trace_and_passes_s": TARGET_PASSES_S, "cli_s": TARGET_CLI_S},
        "verdicts": {"passes": verdict(rows[first]["median"], TARGET_PASSES_S),
                     "cli": verdict(cli["median"], TARGET_CLI_S)},
    })
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
