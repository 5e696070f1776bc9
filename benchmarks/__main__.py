"""``python -m benchmarks [suite …] [--quick]``: run benchmark suites, then plots and docs/benchmarks.md.

Each suite runs as its own ``python -m benchmarks.<script>`` process, one after the other, so no suite's memory,
threads or allocator state leaks into the next and each prints its own tables as it goes. Afterwards every
``benchmarks/results/*.json`` (those just written and older ones of suites not run this time) is collected into
``summary.json`` and PNG plots, and docs/benchmarks.md is regenerated from them. A missing suite, a suite without
a quick mode, a failure or a timeout is a visible note, never a silent gap.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from benchmarks.suites import SUITES, Suite, quick_args

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
DOC = ROOT / "docs" / "benchmarks.md"
QUICK_BUDGET_S = 300.0


def _load() -> float | None:
    try:
        return os.getloadavg()[0]
    except OSError:
        return None


def run_suite(suite: Suite, quick: bool, timeout: float | None, threads: int | None = None,
              extra: tuple[str, ...] = ()) -> dict[str, Any]:
    """Run one suite's script in a child process; its output goes straight to ours.

    ``threads`` sets ``OMP_NUM_THREADS`` for the suite and is passed as ``--threads`` to scripts that take it."""
    record: dict[str, Any] = {"module": f"benchmarks.{suite.module}", "args": [], "status": "skipped", "note": ""}
    if not suite.exists():
        record["note"] = f"benchmarks/{suite.module}.py does not exist yet"
        return record
    args: tuple[str, ...] | None = ()
    if quick:
        args = quick_args(suite)
        if args is None:
            record["note"] = "the script has no --quick mode and no reduced arguments are known"
            return record
        if "--quick" not in args:
            record["note"] = "no --quick in the script; ran with reduced arguments"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    if not sys.stdout.isatty():
        env.setdefault("COLUMNS", "120")  # rich tables of the suites, written to a log, are not cut at 80
    if threads is not None:
        env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(threads)
        if '"--threads"' in suite.source():
            args = (*args, "--threads", str(threads))
    args = (*args, *extra)
    record["args"] = list(args)
    cmd = [sys.executable, "-m", f"benchmarks.{suite.module}", *args]
    print(f"\n── {suite.name}: {' '.join(cmd[1:])}", flush=True)
    load_before, start = _load(), time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, start_new_session=True)
    try:
        rc = proc.wait(timeout=timeout)
        record["status"] = "ok" if rc == 0 else "failed"
        if rc:
            record["note"] = f"exit status {rc}"
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the suite and the children it started, nothing else
        proc.wait()
        record.update(status="timeout", note=f"stopped after {timeout:.0f} s")
    except KeyboardInterrupt:  # the suite runs in its own session, so Ctrl-C did not reach it: stop it too
        stop_group(proc)
        raise
    record["wall_s"] = time.perf_counter() - start
    record["load_avg"] = [load_before, _load()]
    return record


def stop_group(proc: subprocess.Popen[bytes]) -> None:
    """Stop a suite and everything it started: SIGTERM, then SIGKILL if it is still there after 5 s."""
    for sig, grace in ((signal.SIGTERM, 5.0), (signal.SIGKILL, None)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            break
        try:
            proc.wait(timeout=grace)
            break
        except subprocess.TimeoutExpired:
            continue


def finish(run: dict[str, dict[str, Any]], quick: bool, total_s: float | None, results_dir: Path = RESULTS,
           doc: Path = DOC, threads: int | None = None) -> dict[str, Any]:
    """Collect the result files into summary.json, draw the plots, write the docs page; returns the summary.

    The summary keeps the latest record of every suite (a run of some suites updates theirs only) and, from
    the latest invocation that ran all of them, the total time against the --quick budget."""
    from benchmarks import plots, report
    from peftc.storage.atomic import write_file

    results = report.load_results(results_dir)
    previous = results.pop(report.SUMMARY, {})
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    loads = [v for r in run.values() for v in r.get("load_avg", []) if v is not None]
    invocation = {"suites": list(run), "quick": quick, "threads": threads, "total_s": total_s, "at": stamp,
                  "load_avg": [min(loads), max(loads)] if loads else None}
    complete = previous.get("complete_run")
    if run and set(run) == set(SUITES):
        complete = {**invocation, "budget_s": QUICK_BUDGET_S if quick else None,
                    "within_budget": (total_s <= QUICK_BUDGET_S) if quick and total_s is not None else None}
    summary = {
        "machine": next((d["machine"] for d in results.values() if "machine" in d), {}),
        "measured_at": stamp if run else previous.get("measured_at", stamp),
        "cpus": os.cpu_count(),
        "suites": {**previous.get("suites", {}), **{k: {**v, "at": stamp} for k, v in run.items()}},
        "invocation": invocation if run else previous.get("invocation"),
        "complete_run": complete,
        "checks": report.collect_checks(results),
    }
    results_dir.mkdir(parents=True, exist_ok=True)
    write_file(results_dir / f"{report.SUMMARY}.json", json.dumps(summary, indent=2) + "\n")
    drawn = plots.draw_all(results, results_dir)
    doc.parent.mkdir(parents=True, exist_ok=True)
    write_file(doc, report.render(results, summary, drawn, doc))
    return summary


def print_summary(summary: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    from benchmarks.report import fmt_target, fmt_value

    console = Console(width=None if sys.stdout.isatty() else 120)
    invocation = summary.get("invocation") or {}
    if invocation.get("suites"):
        table = Table(title="suites", header_style="bold")
        for col in ("suite", "status", "wall", "note"):
            table.add_column(col)
        for name in invocation["suites"]:
            r = summary["suites"][name]
            colour = {"ok": "green", "failed": "red", "timeout": "red"}.get(r["status"], "yellow")
            table.add_row(name, f"[{colour}]{r['status']}[/]", f"{r['wall_s']:.0f} s" if "wall_s" in r else "",
                          r.get("note", ""))
        console.print(table)
    checks = Table(title="targets", header_style="bold")
    for col in ("suite", "target", "value", "goal", ""):
        checks.add_column(col)
    for c in summary["checks"]:
        colour = "green" if c["verdict"] == "PASS" else "red"
        checks.add_row(c["suite"], c["name"], fmt_value(c["value"], c["unit"]), fmt_target(c),
                       f"[{colour}]{c['verdict']}[/]")
    console.print(checks)
    if invocation.get("quick") and invocation.get("total_s") is not None:
        complete = set(invocation["suites"]) == set(SUITES)
        console.print(f"--quick took {invocation['total_s']:.0f} s for {'all suites' if complete else 'these suites'}"
                      f" (budget for all: {QUICK_BUDGET_S:.0f} s; load average {invocation.get('load_avg')})")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks",
        description="Run peftc's benchmark suites (each in its own process), write benchmarks/results/*.json and "
                    "PNG plots, and regenerate docs/benchmarks.md.")
    parser.add_argument("suites", nargs="*", metavar="suite", help=f"any of: {', '.join(SUITES)} (default: all)")
    parser.add_argument("--quick", action="store_true",
                        help=f"a smaller configuration of every suite (target: under {QUICK_BUDGET_S / 60:.0f} "
                             "minutes on 2 CPU cores)")
    parser.add_argument("--list", action="store_true", help="list the suites and exit")
    parser.add_argument("--report-only", action="store_true",
                        help="run nothing: redraw plots and docs/benchmarks.md from the stored results")
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU threads per suite (OMP_NUM_THREADS, and --threads where a script takes it); on a "
                             "machine shared with other jobs, 1 avoids thread oversubscription")
    parser.add_argument("--suite-args", default="", metavar="ARGS",
                        help="more arguments for each suite's script, e.g. "
                             "python -m benchmarks train-step --suite-args '--methods lora,clr'")
    parser.add_argument("--timeout", type=float, default=None,
                        help="seconds per suite before it is stopped (default: 600 with --quick, none otherwise)")
    args = parser.parse_args(argv)
    unknown = [s for s in args.suites if s not in SUITES]
    if unknown:
        parser.error(f"unknown suite(s) {', '.join(unknown)}; choose from {', '.join(SUITES)}")
    if args.list:
        for suite in SUITES.values():
            state = "" if suite.exists() else "  (script missing)"
            print(f"{suite.name:12} benchmarks/{suite.module}.py  {suite.title}{state}")
        return 0
    run: dict[str, dict[str, Any]] = {}
    total = None
    if not args.report_only:
        timeout = args.timeout if args.timeout is not None else (600.0 if args.quick else None)
        start = time.perf_counter()
        for name in args.suites or list(SUITES):
            try:
                run[name] = run_suite(SUITES[name], args.quick, timeout, args.threads,
                                      tuple(shlex.split(args.suite_args)))
            except KeyboardInterrupt:
                print(f"\ninterrupted: stopped the {name} suite; results so far are unchanged", file=sys.stderr)
                return 130
            if run[name]["status"] != "ok":
                print(f"!! {name}: {run[name]['status']}: {run[name]['note']}", flush=True)
        total = time.perf_counter() - start
    summary = finish(run, args.quick, total, threads=args.threads)
    print_summary(summary)
    print(f"wrote {RESULTS / 'summary.json'}, plots in {RESULTS}, and {DOC}")
    return 0 if all(r["status"] in ("ok", "skipped") for r in run.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
