"""ToMe throughput: images/s of a ViT at batch 8 for r ∈ {0, 8, 13, 16}, eager and torch.compile.

    python -m benchmarks.tome [--backbone timm:deit_small_patch16_224] [--batch 8] [--rounds 7] [--quick]
                              [--eager-only] [--threads N]

One model is compiled with the ``tome`` spec and ``r`` is changed at run time (``peftc.methods.tome.tome.set_r``), so
every r runs the same weights and the same graph. The r values are timed *interleaved* — each round times one
batch per r, in turn — so a noisy, shared machine slows them alike; the figure per r is the median over rounds.
``torch.compile`` guards on ``r`` (a Python int), so it holds one compiled graph per r; compilation happens in
the warm-up, outside the timed rounds. Target (ToMe's headline is 1.65× for ViT-B r=13 on a V100): r=13 runs at
≥ 1.5× the images/s of r=0. Results go to ``benchmarks/results/tome.json``.
"""

from __future__ import annotations

import argparse
from typing import Any

import torch
from rich.console import Console
from rich.table import Table

from benchmarks.common import check, summary, verdict, write_result
from peftc.export.bench import interleaved_seconds

RS = (0, 8, 13, 16)
TARGET_RATIO = 1.5
TARGET_R = 13


def _runner(model: torch.nn.Module, call: Any, x: torch.Tensor, r: int) -> Any:
    from peftc.methods.tome.tome import set_r

    def run() -> None:
        set_r(model, r)
        with torch.inference_mode():
            call(x)

    return run


def _tokens_after(model: torch.nn.Module, x: torch.Tensor, r: int) -> int:
    from peftc.methods.tome.tome import set_r, token_merges

    seen: list[int] = []
    hook = token_merges(model)[-1].register_forward_hook(lambda m, a, out: seen.append(out[0].shape[1]))
    set_r(model, r)
    with torch.inference_mode():
        model(x[:1])
    hook.remove()
    return seen[-1]


def measure(backbone: str, batch: int, rounds: int, backends: list[str], console: Console) -> dict[str, Any]:
    import peftc

    model = peftc.compile("tome", backbone, r=0).eval()
    x = torch.randn(batch, *model.backbone.input_size, generator=torch.Generator().manual_seed(0))
    result: dict[str, Any] = {"tokens_after_last_block": {str(r): _tokens_after(model, x, r) for r in RS}}
    for backend in backends:
        call = model
        if backend == "compile":
            call = torch.compile(model)
            console.print("  torch.compile: compiling one graph per r (warm-up)…")
        fns = {r: _runner(model, call, x, r) for r in RS}
        console.print(f"  {backend}: {rounds} interleaved rounds of batch {batch} per r")
        samples = interleaved_seconds(fns, runs=rounds, warmup=2 if backend == "compile" else 1)
        stats = {r: summary(s) for r, s in samples.items()}
        base = batch / stats[0]["median"]
        result[backend] = {
            str(r): {**stats[r], "images_per_s": batch / stats[r]["median"],
                     "speedup": (batch / stats[r]["median"]) / base}
            for r in RS
        }
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbone", default="timm:deit_small_patch16_224")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--quick", action="store_true", help="3 rounds, eager only (torch.compile's cold start "
                        "takes minutes on 2 cores)")
    parser.add_argument("--eager-only", action="store_true", help="skip torch.compile")
    parser.add_argument("--threads", type=int, default=None, help="intra-op threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    rounds = 3 if args.quick else args.rounds
    backends = ["eager"] if args.eager_only or args.quick else ["eager", "compile"]
    console = Console(highlight=False)
    console.print(f"ToMe throughput: {args.backbone}, batch {args.batch}, {torch.get_num_threads()} threads, "
                  f"device cpu")
    data = measure(args.backbone, args.batch, rounds, backends, console)
    table = Table(title=f"images/s (median of {rounds} interleaved rounds)", header_style="bold")
    table.add_column("r")
    table.add_column("tokens out", justify="right")
    for backend in backends:
        table.add_column(f"{backend} im/s", justify="right")
        table.add_column("× r=0", justify="right")
    for r in RS:
        row = [str(r), str(data["tokens_after_last_block"][str(r)])]
        for backend in backends:
            cell = data[backend][str(r)]
            row += [f"{cell['images_per_s']:.1f}", f"{cell['speedup']:.2f}×"]
        table.add_row(*row)
    console.print(table)
    checks = []
    for backend in backends:
        ratio = data[backend][str(TARGET_R)]["speedup"]
        mark = verdict(ratio, TARGET_RATIO, lower_is_better=False)
        console.print(f"{backend}: r={TARGET_R} is {ratio:.2f}× r=0 (target ≥ {TARGET_RATIO}×) — {mark}")
        checks.append(check(f"tome.{backend}.r{TARGET_R}_speedup", f"ToMe r={TARGET_R} speed-up, {backend}",
                            ratio, TARGET_RATIO, unit="x", lower_is_better=False, suite="tome"))
    path = write_result("tome", {
        "config": {"backbone": args.backbone, "batch": args.batch, "rounds": rounds, "rs": list(RS),
                   "backends": backends, "quick": args.quick, "threads": torch.get_num_threads()},
        "results": data,
        "checks": checks,
    })
    console.print(f"wrote {path}")


if __name__ == "__main__":
    main()
