"""Bytes on disk per task: each method's saved delta (``model.save``) vs HF PEFT's saved adapter.

    python -m benchmarks.storage [--quick]

For every method the delta of one task is saved (``delta.safetensors``; the manifest ``peftc.json`` is reported
beside it), then a second task is added and the artifact saved again: the growth is what each further task
costs. For LoRA and LN tuning, HF PEFT builds the same adapter on the same timm module (the same target layers,
rank and trained head, read off the compiled peftc model) and ``save_pretrained`` writes
``adapter_model.safetensors`` (+ ``adapter_config.json``). Both files are safetensors holding the same tensors,
so the comparison shows what the formats add (tensor names, headers). Each delta's tensor names are checked
against the frozen backbone parameters (none may be saved); elements stored beyond the trainable parameters are
per-task statistics (BatchNorm running mean/var). Sizes are deterministic.
Target: peftc's delta ≤ PEFT's adapter file, for the same method.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from benchmarks.common import check, write_result

VIT = "timm:deit_small_patch16_224"
CNN = "resnet50"
PEER_METHODS = ("lora", "ln_tuning")
PARAMS: dict[str, dict[str, Any]] = {"ln_tuning": {"keys": False}}  # PEFT's LN tuning has no task keys
TARGET_RATIO = 1.0


def _header(path: Path) -> tuple[dict[str, Any], int]:
    with path.open("rb") as f:
        size = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(size))
    header.pop("__metadata__", None)
    return header, size + 8


def safetensors_elements(path: Path) -> tuple[int, int, int]:
    """(tensors, elements, header bytes) of a safetensors file, read from its header only."""
    header, header_bytes = _header(path)
    elements = 0
    for info in header.values():
        n = 1
        for d in info["shape"]:
            n *= d
        elements += n
    return len(header), elements, header_bytes


def frozen_in_delta(model: Any, path: Path) -> list[str]:
    """Names in a saved delta that are frozen backbone parameters (there should be none)."""
    frozen = {n for n, p in model.net.named_parameters() if not p.requires_grad}
    saved = {key.split(":", 1)[0].split("/", 2)[-1] if key.startswith("tasks/") else
             key.split(":", 1)[0].removeprefix("shared/") for key in _header(path)[0]}
    return sorted(saved & frozen)


def _file_facts(path: Path) -> dict[str, int]:
    tensors, elements, header = safetensors_elements(path)
    return {"bytes": path.stat().st_size, "tensors": tensors, "elements": elements, "header_bytes": header}


def peftc_delta(method: str, backbone: str, tmp: Path) -> dict[str, Any]:
    """Save one task, then two; sizes of the delta, the manifest, and the growth per added task."""
    import peftc
    from peftc.storage.artifact import DELTA, MANIFEST

    model = peftc.compile(method, backbone, **PARAMS.get(method, {}))
    one = model.save(tmp / f"{method}-1")
    expected = sum(p.numel() for p in model.trainable_parameters())
    frozen = frozen_in_delta(model, one / DELTA)
    model.add_task("second")
    two = model.save(tmp / f"{method}-2")
    delta = _file_facts(one / DELTA)
    return {
        "backbone": backbone,
        "delta": delta,
        "manifest_bytes": (one / MANIFEST).stat().st_size,
        "per_added_task_bytes": (two / DELTA).stat().st_size - delta["bytes"],
        "trainable_params": expected,
        "frozen_tensors_saved": frozen,
    }


def peft_adapter(method: str, backbone: str, tmp: Path) -> dict[str, Any]:
    """HF PEFT's ``save_pretrained`` of the same adapter on the same timm module."""
    import peftc
    from benchmarks.peers import build_peer, plan
    from peftc.analysis.backbones import build_backbone

    model = peftc.compile(method, backbone, **PARAMS.get(method, {}))
    peer = build_peer("peft", method, build_backbone(backbone).module, plan(model, method))
    out = tmp / f"peft-{method}"
    peer.save_pretrained(str(out))
    adapter = _file_facts(out / "adapter_model.safetensors")
    return {"backbone": backbone, "delta": adapter, "config_bytes": (out / "adapter_config.json").stat().st_size,
            "trainable_params": sum(p.numel() for p in peer.parameters() if p.requires_grad)}


def _methods(quick: bool) -> list[tuple[str, str]]:
    from peftc.errors import PeftcError
    from peftc.language import builtin_specs, load_spec

    names = sorted(builtin_specs())
    if quick:
        return [(m, VIT) for m in PEER_METHODS if m in names]
    out = []
    for name in names:
        try:
            load_spec(name)
        except PeftcError:
            continue
        out += [(name, VIT), (name, CNN)]
    return out


def run(quick: bool, console: Console) -> dict[str, Any]:
    from peftc.errors import PeftcError

    peft_ok = importlib.util.find_spec("peft") is not None
    rows: dict[str, Any] = {}
    skipped: dict[str, str] = {}
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        for method, backbone in _methods(quick):
            key = f"{method} on {backbone}"
            console.print(f"[dim]{key}[/dim]")
            try:
                rows[key] = {"method": method, "peftc": peftc_delta(method, backbone, tmp / key.replace(":", "_"))}
            except PeftcError as exc:
                skipped[key] = f"does not apply: {str(exc).splitlines()[0]}"
                continue
            if method in PEER_METHODS:
                if peft_ok:
                    rows[key]["peft"] = peft_adapter(method, backbone, tmp / key.replace(":", "_"))
                else:
                    skipped[f"peft {key}"] = "HF PEFT is not installed (pip install 'peftc[bench]')"
    checks = []
    for key, row in rows.items():
        if "peft" in row:
            ratio = row["peftc"]["delta"]["bytes"] / row["peft"]["delta"]["bytes"]
            row["ratio"] = ratio
            backbone = row["peftc"]["backbone"].split(":")[-1]
            checks.append(check(f"storage {key}", f"{row['method']} delta per task on {backbone}, peftc / HF PEFT",
                                ratio, TARGET_RATIO, unit="x"))
    return {"rows": rows, "checks": checks, "skipped": skipped, "config": {"quick": quick}}


def print_table(result: dict[str, Any], console: Console) -> None:
    table = Table(title="bytes on disk per task (safetensors)", header_style="bold")
    for col in ("method on backbone", "trainable", "peftc delta", "+task", "PEFT adapter", "ratio", ""):
        table.add_column(col, justify="left" if col == "method on backbone" else "right")
    verdicts = {c["id"]: c["verdict"] for c in result["checks"]}
    for key, row in result["rows"].items():
        ours, theirs = row["peftc"], row.get("peft")
        table.add_row(key, f"{ours['trainable_params']:,}", f"{ours['delta']['bytes']:,}",
                      f"{ours['per_added_task_bytes']:,}", f"{theirs['delta']['bytes']:,}" if theirs else "",
                      f"{row['ratio']:.4f}" if theirs else "", verdicts.get(f"storage {key}", ""))
    console.print(table)
    for key, why in result["skipped"].items():
        console.print(f"[dim]not measured: {key}: {why}[/dim]")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="only the methods PEFT also implements, on deit_small")
    args = parser.parse_args(argv)
    console = Console()
    result = run(args.quick, console)
    print_table(result, console)
    print(f"wrote {write_result('storage', result)}")


if __name__ == "__main__":
    sys.exit(main())
