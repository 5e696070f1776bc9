"""docs/benchmarks.md, regenerated from ``benchmarks/results/*.json``: targets with PASS/MISS, one section per suite
(its tables and plots), and why each missed target misses.

Nothing here measures anything: the page is a pure function of the result files, the run summary and the plots,
so it can be rebuilt at any time (``python -m benchmarks --report-only``). Each suite has a renderer that knows
its file's layout; a file a renderer cannot read (a suite changed its layout) falls back to a generic rendering of
its tables instead of breaking the page.
"""

from __future__ import annotations

import ast
import importlib.util
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from benchmarks.suites import SUITES, Suite

__all__ = ["EXPLANATIONS", "collect_checks", "fmt_target", "fmt_value", "load_results", "render"]

SUMMARY = "summary"

# Why a target misses, by check id (first prefix match), written after profiling; shown only while it misses.
_TIED_STEP = (
    "the method's own extra work on the tied weights, memory-bound, measured in interleaved pairs. A tied block "
    "still runs its forward and backward; on top, each step forms θ̃ = a·θ_prev + b·θ_next for every tied "
    "tensor and, in the backward, a·dθ̃ and b·dθ̃ (added into the neighbours' gradients) and ⟨dθ̃, θ_prev⟩, "
    "⟨dθ̃, θ_next⟩ for the scalars: about 19 passes over each tied tensor against the 5 of the SGD-with-momentum "
    "update end-to-end spends on it (which Replacement Learning saves). The mix is now one autograd node "
    "(forward mul + fused addcmul; backward two products and two dot products, instead of autograd's four "
    "weight-sized products and two sums) and tied BatchNorms skip functional_call: torch.profiler on resnet50 "
    "at 112 px, one thread, CPU time per step, replacement / end-to-end 1.07 → 1.03 (aten::mul 540 → 117 calls "
    "per two steps). What is left is the mix's own traffic (aten::add 20 ms, dot 17 ms, mul 14 ms, addcmul 5 "
    "ms per step against 48 ms less aten::add_ in SGD) plus, with two threads on a loaded machine, one OpenMP "
    "fork/join per extra op, which is why the wall-clock ratio of a loaded run is above the CPU-time one. The "
    "paper's step-time saving is not reproduced by this reading of the method (docs/methods.md); parameters, "
    "SGD state and peak memory do shrink.")

_SAME_OPS_STEP = (
    "not a measurable difference: both sides run the same kernels, so the ratio sits at 1 and the machine's load "
    "decides its side (see the range). torch.profiler, one step each (deit_small, batch 8): peftc's LN tuning "
    "and PEFT's issue the same ops with the same call counts (49 addmm, 50 mm, 25 native_layer_norm and its "
    "backward, 12 flash-attention forwards and backwards, 322 copy_) and the same self times within 2–3%; "
    "peftc's LoRA does one element-wise multiplication less per adapted layer and pass (the α/r scale on the "
    "r-wide bottleneck, skipped at α/r = 1, where PEFT scales the whole output) and keeps frozen BatchNorms "
    "in eval mode (compared with PEFT doing the same: the `peft-eval-bn` peer).")
_SAME_TENSORS = (
    "tensor memory is counted exactly (benchmarks/tensor_memory.py: every live storage at rest, then every "
    "storage an op of one training step creates, minus those freed). peftc and PEFT hold the same tensors at "
    "rest (deit_small 86.15 MiB, resnet50 107.94 MiB) and peak at the same byte count for LoRA (the same saved "
    "activations); a ratio above 1 here would be a real difference to look for in the per-variant table.")

EXPLANATIONS: dict[str, str] = {
    "compile passes warm": (
        "what a warm trace cache leaves: the passes themselves. Blocks are Python modules: LoRA's 53 conv "
        "bypasses on resnet50 build 106 nn.Conv2d (~0.18 ms a block with A's kaiming init, plus ~0.08 ms to "
        "register it: ~14 ms, about the bare trace on its own); the linear probe draws a new 2048×1000 head "
        "(5.7 ms of uniform_); CLR and Replacement add 17 / 15 blocks and their index rebuilds. On ViT-B the code "
        "generation of the rewritten graph (one, ~20 ms) is the largest fixed part."),
    "compile passes": (
        "cold: the trace itself. peftc's trace is fx's with the leaf policy plus the architecture key (~1.3 ms), "
        "and now writes no code until the passes are done (one code generation per compile instead of two; "
        "torch's lazy GraphModule, made plain again when the code is written), interprets the graph for shapes "
        "without regenerating code, walks the modules once per node index, validates a rule's block args once "
        "and runs its tiny tensor work (norm probes, block inits) on one thread (a 2×3×768 layer_norm took 17 "
        "ms on two threads under load, 4 µs on one). What remains on top of the floor is the method's blocks "
        "(see the warm figure: LoRA's 106 convs on resnet50, a new 2M-parameter head for the linear probe) and, "
        "for specs whose blocks read shapes (AdaptFormer, Convpass, MemVP, ToMe, ToCom, FacT), one shape "
        "propagation on the meta device. It now runs each distinct op once — a ViT's identical blocks repeat the "
        "same ops on the same shapes, so ops and leaf modules are memoised by their inputs' metadata and the "
        "module's own state: ViT-B 80 → 21 ms on one thread (PyTorch's meta kernels are Python: layer_norm, "
        "addmm, element-wise type promotion) — but with fx's interpreter and the TensorMetadata of every node it "
        "is still ~0.5× a bare trace, and the blocks themselves (24 Convpass or AdaptFormer modules) add about as "
        "much. A warm cache keeps those shapes with the graph, per example input."),
    "compile public": (
        "the public call adds, on top of trace + passes, a structural copy of the user's module (~9 ms of CPU on "
        "resnet50, ~13 ms on ViT-B: its tensors are shared, not copied; a hand-written tree copy saved only 8% and "
        "was not kept), reading the spec, the report and the task bank, and its own storage for every tensor "
        "the spec trains, so the user's module never changes: for specs that train every weight (ConFiT, "
        "Replacement Learning, the generative classifier) that is a clone of ~100 MB of weights, page faults "
        "included — 10–20× the bare trace on a loaded machine (cProfile: `clone` is 65% of the call)."),
    "cli peftc compile": (
        "imports, before any peftc code runs: `python -X importtime -m peftc compile clr -b resnet50` on this "
        "machine (quiet, 02:20 UTC) gives `import torch` 1.06 s and `import torchvision` 1.06 s of the command's "
        "3.45 s — 0.99 s of the latter is `torchvision.models.convnext` → `torchvision.ops` importing all of "
        "`torch._dynamo`, which torchvision's package `__init__` always does (no model of torchvision can be "
        "built without it); peftc's own modules import in 0.06 s and no timm, ONNX or transformers is imported. "
        "The rest is building resnet50 with its random init (0.17 s of `uniform_`/`normal_`), hashing the "
        "weights the artifact records (0.1 s), trace + passes, writing the artifact and the report."),
    "clr-resnet50: folded/plain under ORT": (
        "CLR's own layers, which folding cannot remove once trained. The folded graph (export.fold on the "
        "perturbed model) merges all 53 BatchNorms but keeps CLR's 17 depthwise 3×3 convs — with BN folded into "
        "them — because a k×k depthwise conv does not compose exactly with the conv before it (stride and zero "
        "padding at the borders; docs/deploy.md): 70 convs against the stock model's 53 (ORT fuses the stock "
        "model's BNs into its convs as well). They are few FLOPs but each reads and writes a whole feature map, "
        "which shows at batch 1 (1.05×) and fades at batch 8 (1.01×). An untrained CLR (identity kernels) folds "
        "away completely."),
    "replacement_resnet50_step_time": _TIED_STEP,
    "replacement_deit_small_step_time": _TIED_STEP,
    "compile ": (
        "profiled with cProfile and by timing each stage in one process, variants interleaved. About half of "
        "`rewrite` is torch.fx's symbolic trace, a third of which is `GraphModule` code generation; on ViTs "
        "torch.fx also disassembles the caller's bytecode at every tuple unpack of a traced value (25 per ViT-B "
        "trace), which peftc/trace.py caches per code object. Specs whose blocks need example shapes (Convpass, "
        "AdaptFormer, FacT) add a shape propagation: a real ViT-B forward at 224² costs ~0.35 s on this CPU, so "
        "it now runs on the meta device (falling back to a real run for an op without a meta kernel) and "
        "`parallel` no longer invalidates shapes it cannot change — Convpass on ViT-B went from 1.04 s to 0.32 s "
        "and AdaptFormer from 0.49 s to 0.28 s, same graphs. `add_block` stopped walking the whole model per "
        "inserted block (CLR on resnet50: 55 → 44 ms on a quiet machine). What remains is fx's own tracing and "
        "per-block bookkeeping; a loaded machine adds 10–30 % to every figure here."),
    "lora_memory": _SAME_TENSORS,
    "cnn_lora_memory": _SAME_TENSORS,
    "ln_tuning_memory": _SAME_TENSORS,
    "clr_forward": (
        "not a measurable difference. peftc's graph runs the same kernels as the wrappers (conv, depthwise conv, "
        "BatchNorm, in the same order). Timed in one process, 8 interleaved rounds of eval forwards of "
        "resnet50 (batch 8, 112 px, one thread): peftc / wrappers = 0.975 (0.99–1.01 for the bare graph "
        "module). An earlier version of this suite fixed glibc's mmap threshold for exact memory numbers, "
        "which made every forward page-fault its activations afresh and penalised the fx code, which frees "
        "intermediates early, by 12–14%; the suite now keeps the default allocator."),
    "lora_step": _SAME_OPS_STEP,
    "cnn_lora_step": _SAME_OPS_STEP,
    "ln_tuning_step": _SAME_OPS_STEP,
}


# Why a peftc/peer ratio without a target is above 1 (by ratio name prefix); shown only while it is.
RATIO_NOTES: dict[str, str] = {
    "lora": (
        "`cnn lora … peftc/peft` compares two functions: PEFT's `train()` puts the frozen backbone's BatchNorms "
        "in train mode (batch statistics, running statistics updated: 53 more `native_batch_norm` reductions "
        "and their saved mean and inverse std), peftc keeps them in eval mode as their statistics are frozen; "
        "the `peft-eval-bn` peer computes peftc's function and carries the target. The `resident memory` ratios "
        "are the resident-set high-water marks: the same tensors (see `memory`) plus what glibc keeps after "
        "frees and the Python objects — peftc's model at rest is 4–6 MiB above PEFT's there, all of it outside "
        "tensors: tracemalloc over one compile of deit_small shows +2.4 MiB of Python allocations against PEFT's "
        "+1.4 (fx's graph and nodes 0.6 MiB, torch.overrides' tables that fx builds once per process 0.5 MiB, "
        "abc caches 0.2 MiB) and the rest is arena fragmentation; fx's out-of-place residual adds (torchvision "
        "writes `out += identity`, a traced graph `add`) fragment more: making the adds in place cut resnet50's "
        "resident peak by 69 MiB in a one-off experiment without changing the tensor peak. The resident peak "
        "also varies by ~8% between runs of identical code."),
}


def load_results(folder: Path) -> dict[str, dict[str, Any]]:
    """Result-file stem → parsed JSON, for every ``*.json`` in ``folder`` (unreadable files are skipped)."""
    out = {}
    for path in sorted(folder.glob("*.json")):
        try:
            out[path.stem] = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            continue
    return out


def collect_checks(results: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """Every target of every result file, normalised to ``{suite, id, name, value, target, unit, verdict}``.

    Reads the ``checks`` list (:func:`benchmarks.common.check`) and, for suites that predate it, a ``targets``
    list of ``{name, value, target, verdict}`` records."""
    out = []
    for stem, data in results.items():
        if stem == SUMMARY:
            continue
        records = data.get("checks")
        if not isinstance(records, list):
            records = [t for t in data.get("targets", []) if isinstance(t, dict)] if isinstance(
                data.get("targets"), list) else []
        for rec in records:
            if not isinstance(rec, dict) or "verdict" not in rec:
                continue
            out.append({"suite": stem, "id": rec.get("id", rec.get("name", "")), "name": rec.get("name", ""),
                        "value": rec.get("value"), "target": rec.get("target"), "unit": rec.get("unit", ""),
                        "lower_is_better": rec.get("lower_is_better", True), "verdict": rec["verdict"]})
    return out


# -- formatting -------------------------------------------------------------------------------------------------
def fmt_value(value: Any, unit: str = "") -> str:
    if not isinstance(value, (int, float)):
        return str(value)
    if unit == "s":
        return f"{value * 1e3:.1f} ms" if value < 1 else f"{value:.2f} s"
    if unit == "x":
        return f"{value:.6f}×" if 0 < abs(value - 1.0) < 5e-5 else f"{value:.4f}×"  # never print 1.0000 for ≠ 1
    if unit == "bytes":
        return f"{value:,.0f} B"
    return f"{value:,}" if isinstance(value, int) else f"{value:.4g}"


def fmt_target(check: dict[str, Any]) -> str:
    target = check["target"]
    if isinstance(target, str):
        return target
    return ("≤ " if check.get("lower_is_better", True) else "≥ ") + fmt_value(target, check.get("unit", ""))


def _table(header: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c).replace("|", "\\|") for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _ms(summary: dict[str, Any]) -> str:
    return f"{summary['median'] * 1e3:.1f}"


def _docstring(suite: Suite) -> str:
    """The suite script's docstring without its usage line (read from source; the suite is never imported)."""
    try:
        doc = ast.get_docstring(ast.parse(suite.source())) or ""
    except SyntaxError:
        return ""
    paras = [p for p in doc.split("\n\n")[1:] if not p.strip().startswith(("python -m", "    python -m"))]
    return "\n\n".join(" ".join(line.strip() for line in p.splitlines()) for p in paras).strip()


# -- per-suite renderers ----------------------------------------------------------------------------------------
def _compile(data: dict[str, Any]) -> str:
    """Per case: the bare fx trace, then trace + passes and the public call, cold and warm, as ratios to it."""
    verdicts = {c["id"]: c["verdict"] for c in data.get("checks", [])}
    rows = []
    for name, c in data["cases"].items():
        rows.append([name, f"{c['bare_s'] * 1e3:.0f}",
                     f"{c['passes_s'] * 1e3:.0f} / {c['passes_warm_s'] * 1e3:.0f}",
                     f"{c['passes_ratio']:.2f}× / {c['passes_warm_ratio']:.2f}×",
                     f"≤ {c['passes_target']}×", verdicts.get(f"compile passes {name}", ""),
                     f"{c['public_s'] * 1e3:.0f} / {c['public_warm_s'] * 1e3:.0f}",
                     f"{c['public_ratio']:.2f}× / {c['public_warm_ratio']:.2f}×",
                     verdicts.get(f"compile public {name}", "")])
    text = _table(["case", "bare trace ms", "trace + passes ms (cold / warm)", "÷ bare", "target", "",
                   "peftc.compile ms (cold / warm)", "÷ bare (≤ 2×)", ""], rows)
    targets = data.get("targets", {})
    cli_rows = []
    for command, t in data.get("cli_s", {}).items():
        target = targets.get("compile_cli_s") if command.startswith("peftc compile") else targets.get("instant_cli_s")
        verdict = "" if target is None else ("PASS" if t["median"] <= target else "MISS")
        cli_rows.append([f"`{command}`", f"{t['median']:.2f}", f"{t['min']:.2f}–{t['max']:.2f}", t.get("runs", ""),
                         f"≤ {target}" if target else "", verdict])
    if cli_rows:
        text += "\n\n" + _table(["command (a new process, imports included)", "median s", "range", "runs",
                                   "target s", ""], cli_rows)
    if data.get("not_applicable"):
        text += "\n\nNot applicable (the spec's selectors match nothing there): " + ", ".join(
            data["not_applicable"]) + "."
    return text


def _train_step(data: dict[str, Any]) -> str:
    cfg = data.get("config", {})
    rows = []
    for key, v in data["variants"].items():
        rows.append([f"`{key}`", f"{v['backbone']} @ {v['image']}", f"{v['trainable_params']:,}", _ms(v["step_s"]),
                     f"{v['step_s']['min'] * 1e3:.0f}–{v['step_s']['max'] * 1e3:.0f}", _ms(v["forward_s"]),
                     f"{v.get('model_mb', 0):.1f}", f"{v['peak_mb']['median']:.1f}",
                     f"{v['model_rss_mb']:.0f}" if "model_rss_mb" in v else "",
                     f"{v['rss_peak_mb']:.0f}" if "rss_peak_mb" in v else ""])
    per_round = (f" of {cfg['steps']} timed steps" if "steps" in cfg else
                 " (one training step and one eval forward per variant each)")
    method = next((v.get("memory_method") for v in data["variants"].values()), None)
    text = (f"Batch {cfg.get('batch', '?')}, {cfg.get('rounds', '?')} interleaved rounds{per_round}, "
            f"{cfg.get('threads', '?')} thread{'' if cfg.get('threads') == 1 else 's'}, one process per variant."
            + (f" Memory: {method}." if method else "") + "\n\n")
    text += _table(["variant", "backbone", "trainable", "step ms", "range", "eval fwd ms", "model MiB",
                    "peak MiB", "resident model MiB", "resident peak MiB"], rows)
    checks = {c["id"]: c for c in data.get("checks", [])}
    ratio_rows = []
    for name, r in data.get("ratios", {}).items():
        c = checks.get(r.get("check", ""))
        ratio_rows.append([name, f"{r['median']:.3f}", f"{r['min']:.3f}–{r['max']:.3f}", r.get("rounds", ""),
                           fmt_target(c) if c else "", c["verdict"] if c else ""])
    if ratio_rows:
        text += "\n\nRatios (median of the per-round ratios; below 1 means peftc is cheaper):\n\n"
        text += _table(["ratio", "median", "range", "rounds", "target", ""], ratio_rows)
        above = {r.get("method") for r in data.get("ratios", {}).values()
                 if r.get("peer") != "full" and not r.get("check") and r["median"] > 1.0}
        notes = [f"*{m} above 1:* {RATIO_NOTES[m]}" for m in sorted(above - {None}) if m in RATIO_NOTES]
        if notes:
            text += "\n\n" + "\n\n".join(notes)
    notes = {**data.get("skipped", {}), **data.get("failed", {})}
    if notes:
        text += "\n\nNot measured: " + "; ".join(f"`{k}`: {v}" for k, v in notes.items()) + "."
    return text


def _storage(data: dict[str, Any]) -> str:
    rows = []
    for key, row in data["rows"].items():
        ours, theirs = row["peftc"], row.get("peft")
        frozen = ours.get("frozen_tensors_saved")
        rows.append([key, f"{ours['trainable_params']:,}", f"{ours['delta']['elements']:,}",
                     "" if frozen is None else (f"**{len(frozen)}**" if frozen else "0"),
                     f"{ours['delta']['bytes']:,}", f"{ours['per_added_task_bytes']:,}",
                     f"{theirs['delta']['bytes']:,}" if theirs else "", fmt_value(row["ratio"], "x") if theirs else ""])
    text = _table(["method on backbone", "trainable", "elements stored", "frozen saved", "peftc delta B", "+1 task B",
                   "PEFT adapter B", "peftc / PEFT"], rows)
    if data.get("skipped"):
        text += "\n\nNot measured: " + "; ".join(f"{k}: {v}" for k, v in data["skipped"].items()) + "."
    return text


def _tome(data: dict[str, Any]) -> str:
    from benchmarks.plots import throughput_curves

    curves = throughput_curves(data)
    backends = list(curves)
    results = data["results"]
    tokens = results.get("tokens_after_last_block", {})
    rows = []
    for r in sorted({r for pts in curves.values() for r, _ in pts}):
        row: list[Any] = [r, tokens.get(str(r), "")]
        for b in backends:
            cell = results[b][str(r)]
            row += [f"{cell['images_per_s']:.1f}", f"{cell.get('speedup', float('nan')):.2f}×"]
        rows.append(row)
    header = ["r", "tokens out"] + [h for b in backends for h in (f"{b} images/s", "× r=0")]
    cfg = data.get("config", {})
    return (f"{cfg.get('backbone', '')}, batch {cfg.get('batch', '?')}, {cfg.get('rounds', '?')} interleaved rounds."
            f"\n\n" + _table(header, rows))


def _deploy(data: dict[str, Any]) -> str:
    parts = []
    for res in data["results"]:
        rows = res["rows"]
        backends = sorted({r["backend"] for r in rows}, key=["eager", "compile", "ort"].index)
        cells = {(r["variant"], r["backend"], r["batch"]): r["median_ms"] for r in rows}
        table = []
        for batch in sorted({r["batch"] for r in rows}):
            for variant in ("plain", "unfolded", "folded"):
                row: list[Any] = [batch, variant]
                for b in backends:
                    ms, base = cells.get((variant, b, batch)), cells.get(("plain", b, batch))
                    row.append("" if ms is None else f"{ms:.1f}" + (
                        "" if variant == "plain" or not base else f" ({ms / base:.2f}×)"))
                table.append(row)
        parts.append(f"**{res['model']}** (median ms; ratio to plain under the same backend)\n\n"
                     + _table(["batch", "graph", *backends], table))
    return "\n\n".join(parts)


def _replacement(data: dict[str, Any]) -> str:
    rows = []
    for name, res in data["results"].items():
        for label in ("end_to_end", "replacement"):
            m = res[label]
            rows.append([f"{name} ({res['backbone']} @ {res['image']})", label.replace("_", "-"),
                         f"{m['params']:,}", f"{m['trainable']:,}", f"{m['peak_bytes'] / 2**20:.0f}",
                         f"{m['resident_peak_bytes'] / 2**20:.0f}" if "resident_peak_bytes" in m else "",
                         f"{m['step_s'] * 1e3:.0f}"])
        r = res["ratios"]
        rows.append(["", "ratio", f"{r['params']:.3f}×", f"{r['trainable']:.3f}×", f"{r['peak_memory']:.3f}×",
                     f"{r['resident_peak_memory']:.3f}×" if "resident_peak_memory" in r else "",
                     f"{r['step_time']:.3f}×"])
    method = next((res["end_to_end"].get("memory_method") for res in data["results"].values()), None)
    return (f"Memory: {method}.\n\n" if method else "") + _table(
        ["backbone", "variant", "params", "trainable", "peak MiB", "resident peak MiB", "step ms"], rows)


def _trainer(data: dict[str, Any]) -> str:
    cfg = data.get("config", {})
    rows = [["peftc train", f"{data['peftc_images_per_s']:,.1f}", f"{data['peftc_images_per_s_wall']:,.1f}"],
            ["hand-written loop", f"{data['hand_images_per_s']:,.1f}", f"{data['hand_images_per_s_wall']:,.1f}"]]
    rows += [[f"loader alone, {w} workers", "", f"{v:,.1f}"] for w, v in data.get("loader_images_per_s", {}).items()]
    text = (f"`{cfg.get('spec')}` on {cfg.get('backbone')} at {cfg.get('image')} px, batch {cfg.get('batch')}, "
            f"{cfg.get('images')} training images, {cfg.get('workers')} loader workers, {cfg.get('threads')} "
            f"thread(s), {cfg.get('rounds')} rounds (second epoch of each, step by step).\n\n")
    text += _table(["measure", "images/s, CPU time", "images/s, wall"], rows)
    text += (f"\n\nOverhead, peftc's step time over the hand loop's (median of the per-round ratios): CPU time "
             f"**{data['overhead']:.3f}**, wall {data['overhead_wall']:.3f} (load average "
             f"{data.get('load_average')} when it ended).")
    if data.get("gpu") is None:
        text += f"\n\nGPU figures: not measured ({data.get('gpu_note', 'no GPU')})."
    return text


def _generic(data: dict[str, Any]) -> str:
    """Tables of whatever flat records the file holds: lists of flat dicts, and dicts of timing summaries."""
    parts = []

    def flat(d: Any) -> bool:
        return isinstance(d, dict) and all(isinstance(v, (int, float, str, bool)) or v is None for v in d.values())

    def walk(node: Any, path: str, depth: int) -> None:
        if depth > 4 or len(parts) > 6:
            return
        if isinstance(node, list) and node and all(flat(x) for x in node):
            header = list(dict.fromkeys(k for x in node for k in x))
            body = [[fmt_value(x.get(k, "")) for k in header] for x in node[:40]]
            parts.append(f"`{path}`\n\n" + _table(header, body))
        elif isinstance(node, dict):
            stats = {k: v for k, v in node.items() if isinstance(v, dict) and "median" in v and flat(v)}
            if stats:
                body = [[k, fmt_value(v["median"]), fmt_value(v.get("min", "")), fmt_value(v.get("max", ""))]
                        for k, v in stats.items()]
                parts.append(f"`{path}`\n\n" + _table(["", "median", "min", "max"], body))
            for k, v in node.items():
                if k not in stats and k not in ("machine", "checks", "targets"):
                    walk(v, f"{path}.{k}" if path else k, depth + 1)

    walk(data, "", 0)
    return "\n\n".join(parts) or "(no tables in this result file)"


def _coverage(data: dict[str, Any]) -> str:
    n = data["counts"]
    return (f"{len(data['rows'])} backbones × {len(data['specs'])} specs: **{n['ok']} pairs apply and work**, "
            f"{n['n/a']} do not apply (each with the compiler's reason), {n['fail']} fail. The matrix, with compile "
            "time and identity error per cell, is in [backbones.md](backbones.md).")


def _online(data: dict[str, Any]) -> str:
    cfg = data.get("config", {})
    metrics = ("average_accuracy", "average_incremental_accuracy", "forgetting", "final_recent_share")
    rows = []
    for setting, learners in data["results"].items():
        for learner, res in learners.items():
            for name, r in res["classifiers"].items():
                rows.append([setting, learner, name, *[f"{r[k]['mean']:.3f} ± {r[k]['std']:.3f}" for k in metrics],
                             f"{res['images_per_second']['mean']:,.0f}"])
    return (f"{cfg.get('model', '')}, batch {cfg.get('batch_size', '?')}, {cfg.get('sampling', '')} memory, "
            f"{cfg.get('optimizer', '')}, {cfg.get('seeds', '?')} seed(s), mean ± std.\n\n"
            + _table(["setting", "learner", "classifier", "final avg acc", "avg incremental acc", "forgetting",
                      "recent-class share", "images/s"], rows))


RENDERERS: dict[str, Callable[[dict[str, Any]], str]] = {
    "compile_time": _compile, "train_step": _train_step, "storage": _storage, "tome": _tome, "deploy": _deploy,
    "replacement": _replacement, "online": _online, "trainer": _trainer, "coverage": _coverage}
PLOTS_OF = {"compile_time": ["compile_time"], "train_step": ["ratios", "memory"], "tome": ["tome_throughput"],
            "storage": []}


def _section(suite: Suite, data: dict[str, Any] | None, plots: dict[str, Path], doc_dir: Path,
             run: dict[str, Any]) -> str:
    head = f"## {suite.title}\n\n`python -m benchmarks {suite.name}` (script `benchmarks/{suite.module}.py`)"
    status = run.get(suite.name)
    if data is None:
        why = status["note"] if status and status.get("note") else (
            "the suite script does not exist yet" if not suite.exists() else "not run yet")
        return f"{head}\n\nNo results: {why}."
    text = [head]
    stamp = data.get("measured_at", "")
    machine = data.get("machine", {})
    text.append(f"Measured {stamp or '(time not recorded)'} on {machine.get('cpus', '?')} CPUs"
                f"{', ' + machine['cuda'] if machine.get('cuda') else ''}, torch {machine.get('torch', '?')}"
                + (f"; this run: {status['status']}" + (f" ({status['note']})" if status.get("note") else "")
                   if status else "") + ".")
    doc = _docstring(suite)
    if doc:
        text.append(doc)
    renderer = RENDERERS.get(suite.result, _generic)
    try:
        text.append(renderer(data))
    except (KeyError, TypeError, ValueError, AttributeError, IndexError) as exc:
        text.append(f"(this file's layout is not the one the page knows — {type(exc).__name__}: {exc}; "
                    f"generic rendering)\n\n" + _generic(data))
    for name in PLOTS_OF.get(suite.result, []):
        if name in plots:
            rel = Path(os.path.relpath(plots[name], doc_dir))
            text.append(f"![{name}]({rel.as_posix()})")
    return "\n\n".join(text)


def _explanations(checks: list[dict[str, Any]], results: dict[str, dict[str, Any]]) -> str:
    """One bullet per cause: misses that share an explanation are listed together."""
    misses = [c for c in checks if c["verdict"] != "PASS"]
    if not misses:
        return "Every target is met in these results."
    unexplained = ("not analysed yet — profile it (`python -m cProfile`, `torch.profiler`) and record the cause "
                   "here (benchmarks/report.py EXPLANATIONS, or an `explanations` map in the suite's JSON) or fix it.")
    grouped: dict[str, list[dict[str, Any]]] = {}
    for c in misses:
        own = results.get(c["suite"], {}).get("explanations", {})
        text = own.get(c["id"]) if isinstance(own, dict) else None
        text = text or next((v for k, v in EXPLANATIONS.items() if str(c["id"]).startswith(k)), None)
        grouped.setdefault(text or f"{unexplained}\0{c['id']}", []).append(c)
    parts = []
    for text, group in grouped.items():
        names = "; ".join(f"**{c['name']}** ({c['suite']}: {fmt_value(c['value'], c['unit'])}, target "
                          f"{fmt_target(c)})" for c in group)
        parts.append(f"- {names}: {text.split(chr(0))[0]}")
    return "\n".join(parts)


def _complete_run(complete: dict[str, Any] | None, cpus: Any) -> str:
    if not complete or complete.get("total_s") is None:
        return ""
    text = (f"The last run of all suites (`python -m benchmarks{' --quick' if complete.get('quick') else ''}"
            f"{' --threads ' + str(complete['threads']) if complete.get('threads') else ''}`, {complete.get('at', '')})"
            f" took {complete['total_s']:.0f} s")
    load = complete.get("load_avg")
    if load:
        text += f" while the machine's load average was {load[0]:.1f}–{load[1]:.1f} on {cpus or '?'} CPUs"
    if complete.get("budget_s"):
        text += (f" (the --quick budget is {complete['budget_s']:.0f} s on two idle cores: "
                 f"{'met' if complete.get('within_budget') else 'exceeded'})")
    return text + ". "


def render(results: dict[str, dict[str, Any]], summary: dict[str, Any], plots: dict[str, Path],
           doc_path: Path) -> str:
    """The whole of docs/benchmarks.md."""
    checks = collect_checks(results)
    run = summary.get("suites", {})
    lines = [
        "# Benchmarks",
        "",
        "<!-- Generated by `python -m benchmarks` from benchmarks/results/*.json; edit benchmarks/report.py, "
        "not this file. -->",
        "",
        "How peftc compares with its peers — HF PEFT, module-level wrapper implementations, the plain backbone — "
        "measured side by side on one machine in one run. Regenerate with `python -m benchmarks` (all suites), "
        "`python -m benchmarks train-step storage` (some), `--quick` (a smaller configuration of each; under five "
        "minutes on two idle CPU cores) or `--report-only` (redraw this page from the stored JSON). "
        "HF PEFT comes with `pip install -e '.[bench]'`.",
        "",
        "**Reading the numbers.** " + _complete_run(summary.get("complete_run"), summary.get("cpus"))
        + "Where the machine is shared with other jobs (a load average near or above the CPU count), absolute "
        "times are inflated and noisy; "
        "compare the *ratios*, which come from variants measured interleaved (round-robin, alternating order) in "
        "the same run, and the ranges beside each median. Memory and bytes on disk are not affected by load.",
        "",
        "## Targets",
        "",
    ]
    if checks:
        lines.append(_table(["suite", "target", "measured", "goal", ""], [
            [c["suite"], c["name"], fmt_value(c["value"], c["unit"]), fmt_target(c), f"**{c['verdict']}**"]
            for c in checks]))
    else:
        lines.append("No results yet.")
    for suite in SUITES.values():
        lines += ["", _section(suite, results.get(suite.result), plots, doc_path.parent, run)]
    if not plots and importlib.util.find_spec("matplotlib") is None:
        lines += ["", "(Plots need matplotlib: `pip install -e '.[bench]'`.)"]
    lines += ["", "## Why targets are missed", "", _explanations(checks, results)]
    if run:
        lines += ["", "## Runs", "", "The latest run of each suite (`python -m benchmarks` arguments passed to its "
                  "script; load average of the machine before and after it):", "",
                  _table(["suite", "script arguments", "status", "wall", "load average", "when"], [
                      [name, " ".join(r.get("args", [])) or "(defaults)", r.get("status", "") + (
                          f" — {r['note']}" if r.get("note") else ""),
                       f"{r['wall_s']:.0f} s" if "wall_s" in r else "",
                       "–".join(f"{v:.1f}" for v in r.get("load_avg", []) if v is not None), r.get("at", "")]
                      for name, r in run.items()])]
    lines.append("")
    return "\n".join(lines)
