"""The benchmark runner's plumbing, without running a heavy suite: CLI, suite discovery and quick arguments,
process isolation and peak memory, ratio/verdict arithmetic, the peers' equivalence to peftc, and the docs page
generated from fixture results. Never asserts a timing."""

from __future__ import annotations

import importlib.util
import json
import mmap
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import peftc
from benchmarks.__main__ import finish, run_suite
from benchmarks.common import check
from benchmarks.isolate import IsolatedError, Peak, Worker, run_isolated
from benchmarks.report import collect_checks
from benchmarks.suites import SUITES, Suite, quick_args
from benchmarks.train_step import Job, _aggregate

ROOT = Path(__file__).resolve().parent.parent
HAS_MPL = importlib.util.find_spec("matplotlib") is not None


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "benchmarks", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=60)


def test_help_list_and_bad_suite() -> None:
    assert _cli("--help").returncode == 0
    listed = _cli("--list")
    assert listed.returncode == 0
    for name in ("compile", "train-step", "deploy", "tokens", "replacement", "storage"):
        assert name in listed.stdout
    bad = _cli("no-such-suite")
    assert bad.returncode == 2 and "unknown suite" in bad.stderr


def test_quick_arguments_are_read_from_the_script() -> None:
    plain = Suite("x", "x", "x", "X")
    assert quick_args(plain, 'parser.add_argument("--quick")') == ("--quick",)
    assert quick_args(plain, "no flags here") is None
    extra = Suite("x", "x", "x", "X", quick_extra=("--eager-only",))
    assert quick_args(extra, '"--quick" "--eager-only"') == ("--quick", "--eager-only")
    assert quick_args(extra, '"--quick"') == ("--quick",)  # a flag the script lacks is not passed
    fallback = Suite("x", "x", "x", "X", quick_fallback=("--rounds", "1"))
    assert quick_args(fallback, '"--rounds"') == ("--rounds", "1")
    assert quick_args(fallback, "") is None
    for suite in SUITES.values():  # our own suites offer --quick
        if suite.name in ("train-step", "storage", "compile"):
            assert quick_args(suite) is not None and quick_args(suite)[0] == "--quick"


def test_missing_script_is_a_visible_skip() -> None:
    record = run_suite(Suite("ghost", "no_such_suite", "ghost", "Ghost"), quick=True, timeout=5)
    assert record["status"] == "skipped" and "does not exist" in record["note"]
    record = run_suite(Suite("plain", "common", "plain", "Plain"), quick=True, timeout=5)  # common.py: no --quick
    assert record["status"] == "skipped" and "no --quick" in record["note"]


def _square(x: int) -> int:
    return x * x


def _fail() -> None:
    raise ValueError("boom")


def _peak_of_allocation(mib: int) -> tuple[int, str]:
    peak = Peak("cpu")
    peak.reset()
    before = peak.bytes()
    # a fresh anonymous mapping: malloc could reuse pages a big forked parent (the test session) left resident
    block = mmap.mmap(-1, mib * 2**20)
    for offset in range(0, len(block), 4096):
        block[offset] = 1  # touch every page so it is resident
    grown = peak.bytes() - before
    block.close()
    return grown, peak.method


def test_isolated_runs_return_results_errors_and_peaks() -> None:
    assert run_isolated(_square, 7) == 49
    with pytest.raises(IsolatedError, match="ValueError: boom"):
        run_isolated(_fail)
    grown, method = run_isolated(_peak_of_allocation, 64)
    assert grown >= 60 * 2**20, (grown, method)


class _Counter:
    def __init__(self, start: int):
        self.n = start
        self.ready = {"pid": os.getpid()}

    def add(self, k: int) -> int:
        self.n += k
        return self.n

    def fail(self) -> None:
        raise RuntimeError("no")


def test_worker_keeps_an_object_in_its_own_process() -> None:
    with Worker(_Counter, 10, timeout=60) as worker:
        assert worker.ready["pid"] != os.getpid()
        assert worker.call("add", 5) == 15 and worker.call("add", 1) == 16  # state lives in the child
        with pytest.raises(IsolatedError, match="RuntimeError: no"):
            worker.call("fail")


def _sample(step: float, mem: int) -> dict[str, object]:
    return {"step_s": [step, step], "forward_s": [step / 3] * 2, "peak_bytes": mem, "model_bytes": mem // 2,
            "trainable": 10, "memory_method": "VmHWM", "device": "cpu"}


def test_ratios_are_paired_per_round_and_judged() -> None:
    jobs = [Job("vit", "full", "b", 224), Job("vit", "peftc", "b", 224, "lora"),
            Job("vit", "peft", "b", 224, "lora")]
    rounds = [{"vit/full": _sample(4.0, 400), "vit/peftc:lora": _sample(1.0, 220), "vit/peft:lora": _sample(2.0, 200)},
              {"vit/full": _sample(8.0, 400), "vit/peftc:lora": _sample(2.0, 220), "vit/peft:lora": _sample(4.0, 200)}]
    out = _aggregate(jobs, rounds, {}, {})
    step = out["ratios"]["vit lora step peftc/peft"]
    assert step["median"] == pytest.approx(0.5) and step["rounds"] == 2  # load doubled in round 2: ratio holds
    assert out["ratios"]["vit lora memory peftc/peft"]["median"] == pytest.approx(1.1)
    verdicts = {c["id"]: c["verdict"] for c in out["checks"]}
    assert verdicts == {"lora_step": "PASS", "lora_memory": "MISS"}
    assert out["ratios"]["vit lora step vs full"]["median"] == pytest.approx(0.25)


def _small_cnn() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.BatchNorm2d(8), torch.nn.ReLU(),
        torch.nn.Conv2d(8, 8, 1), torch.nn.BatchNorm2d(8), torch.nn.ReLU(),
        torch.nn.Conv2d(8, 16, 3, padding=1), torch.nn.BatchNorm2d(16), torch.nn.ReLU(),
        torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(16, 5))


def test_a_peer_training_other_parameters_is_not_compared() -> None:
    jobs = [Job("vit", "peftc", "b", 224, "lora"), Job("vit", "peft", "b", 224, "lora")]
    other = {**_sample(1.0, 100), "trainable": 11}
    out = _aggregate(jobs, [{"vit/peftc:lora": _sample(1.0, 100), "vit/peft:lora": other}], {}, {})
    assert out["checks"] == [] and "not the same adaptation" in out["failed"]["vit/peft:lora"]


def test_clr_wrappers_match_peftc() -> None:
    from benchmarks.peers import ClrWrapper, build_peer, check_same_function, plan

    model = peftc.compile("clr", _small_cnn())
    peer_plan = plan(model, "clr")
    assert peer_plan["sites"] == ["0", "6"]  # the 3x3 convs, not the 1x1
    peer = build_peer("wrapper", "clr", _small_cnn(), peer_plan)
    assert sum(isinstance(m, ClrWrapper) for m in peer.modules()) == 2
    assert sum(p.numel() for p in peer.parameters() if p.requires_grad) == sum(
        p.numel() for p in model.trainable_parameters())
    assert check_same_function(model, peer, (3, 16, 16)) < 1e-5


def test_storage_finds_frozen_tensors_in_a_delta(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    from benchmarks.storage import frozen_in_delta, safetensors_elements

    model = peftc.compile("clr", _small_cnn())
    saved = model.save(tmp_path / "clr") / "delta.safetensors"
    assert frozen_in_delta(model, saved) == []
    assert safetensors_elements(saved)[1] >= sum(p.numel() for p in model.trainable_parameters())
    bad = tmp_path / "bad.safetensors"
    save_file({"tasks/default/0.weight": torch.zeros(8, 3, 3, 3), "shared/3.weight": torch.zeros(8, 8, 1, 1)},
              str(bad))
    assert frozen_in_delta(model, bad) == ["0.weight", "3.weight"]


@pytest.mark.skipif(importlib.util.find_spec("peft") is None, reason="HF PEFT is not installed")
def test_peft_lora_adapts_the_same_layers() -> None:
    import timm

    from benchmarks.peers import build_peer, plan

    def vit() -> torch.nn.Module:
        torch.manual_seed(0)
        return timm.create_model("vit_tiny_patch16_224", depth=2, img_size=32, num_classes=4)

    model = peftc.compile("lora", vit(), rank=2)
    peer_plan = plan(model, "lora")
    assert peer_plan["sites"] == ["blocks.0.attn.qkv", "blocks.1.attn.qkv"] and peer_plan["modules_to_save"] == [
        "head"]
    peer = build_peer("peft", "lora", vit(), peer_plan)
    assert sum(p.numel() for p in peer.parameters() if p.requires_grad) == sum(
        p.numel() for p in model.trainable_parameters())


def test_peft_with_frozen_norms_in_eval_computes_peftcs_training_function() -> None:
    """peftc keeps a frozen backbone's BatchNorms in eval mode while training; PEFT's ``train()`` does not. The
    "peft-eval-bn" peer is PEFT made to do the same, so the CNN step is compared on the same arithmetic."""
    from benchmarks.peers import FrozenNormsInEval, build_peer, plan

    model = peftc.compile("lora", _small_cnn(), rank=2)
    peer_plan = plan(model, "lora")
    assert peer_plan["frozen_norms"] and peer_plan["sites"] == ["0", "3", "6"]
    same = build_peer("peft-eval-bn", "lora", _small_cnn(), peer_plan)
    plain = build_peer("peft", "lora", _small_cnn(), peer_plan)
    assert isinstance(same, FrozenNormsInEval)
    x = torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    ours = model.train()(x)
    assert (ours - same.train()(x)).abs().max() < 1e-5
    assert (ours - plain.train()(x)).abs().max() > 1e-3  # batch statistics: another function
    bns = [m for m in same.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert bns and not any(m.training for m in bns) and same.training


def test_tensor_bytes_counts_storages_exactly() -> None:
    from benchmarks.tensor_memory import TensorBytes, live_bytes

    mib = 2**20
    base = live_bytes()
    x = torch.randn(1024, 256, requires_grad=True)  # 1 MiB
    assert live_bytes() - base == mib
    with TensorBytes() as counted:
        assert counted.live - base == mib
        view = x.detach().view(-1)  # a view shares its base's storage: counted once
        y = (x * 2).relu()  # x*2 lives until relu has run; relu keeps its output for the backward
        assert counted.live - base == 2 * mib
        y.sum().backward()  # + the gradient of x, the temporaries of the backward
        del y, view
        assert counted.live - base == 2 * mib  # x and x.grad
        x.grad = None
        assert counted.live - base == mib
    assert counted.peak - base >= 3 * mib


def _fixture_results(folder: Path) -> None:
    folder.mkdir(parents=True)
    machine = {"cpus": 2, "torch": "2.x", "cuda": None}
    summary = {"median": 0.04, "min": 0.03, "max": 0.05, "p90": 0.05, "runs": 5}
    (folder / "compile_time.json").write_text(json.dumps({
        "machine": machine, "measured_at": "2025-01-01T00:00:00+00:00",
        "cases": {"clr on resnet50": {"bare_s": 0.04, "passes_s": 0.05, "public_s": 0.07, "passes_ratio": 1.25,
                                      "public_ratio": 1.75, "passes_target": 1.5}},
        "cli_s": {"peftc compile": {**summary, "median": 6.0}},
        "checks": [check("compile clr on resnet50", "trace + passes, clr on resnet50", 1.25, 1.5, "x"),
                   check("compile cli", "peftc compile, end to end", 6.0, 5.0, "s")],
    }))
    (folder / "deploy.json").write_text(json.dumps({  # a suite with the older `targets` list and its own layout
        "machine": machine, "results": [{"model": "m", "rows": [
            {"model": "m", "variant": v, "backend": "ort", "batch": 1, "median_ms": 2.0} for v in
            ("plain", "unfolded", "folded")]}],
        "targets": [{"name": "folded/plain", "value": 1.2, "target": "<= 1.03", "verdict": "MISS"}]}))
    (folder / "replacement.json").write_text(json.dumps({  # a layout the page does not know: generic tables
        "machine": machine, "results": {"odd": True}, "table": [{"a": 1, "b": "x"}]}))


@pytest.mark.skipif(not HAS_MPL, reason="matplotlib is not installed")
def test_docs_page_from_fixture_results(tmp_path: Path) -> None:
    results, doc = tmp_path / "results", tmp_path / "docs" / "benchmarks.md"
    _fixture_results(results)
    ran = {name: {"status": "ok", "wall_s": 1.0, "load_avg": [1.0, 2.0], "args": ["--quick"]} for name in SUITES}
    summary = finish(ran, True, 12.0, results_dir=results, doc=doc, threads=1)
    assert summary["complete_run"]["within_budget"] is True
    again = finish({"compile": {**ran["compile"], "wall_s": 3.0}}, True, 400.0, results_dir=results, doc=doc)
    assert again["complete_run"]["total_s"] == 12.0  # a partial run keeps the last complete run's record
    assert again["suites"]["compile"]["wall_s"] == 3.0 and again["suites"]["storage"]["wall_s"] == 1.0
    checks = {c["name"]: c["verdict"] for c in summary["checks"]}
    assert checks == {"trace + passes, clr on resnet50": "PASS", "peftc compile, end to end": "MISS",
                      "folded/plain": "MISS"}
    text = doc.read_text()
    assert "| compile_time | trace + passes, clr on resnet50 | 1.2500× | ≤ 1.5000× | **PASS** |" in text
    assert "![compile_time](../results/compile_time.png)" in text and (results / "compile_time.png").is_file()
    assert "(plain)" not in text and "| 1 | folded | 2.0 (1.00×) |" in text  # deploy's own renderer
    assert "`table`" in text and "| 1 | x |" in text  # unknown layout: generic table
    misses = text.split("## Why targets are missed", 1)[1]
    assert "peftc compile, end to end" in misses and "folded/plain" in misses
    assert "trace + passes, clr on resnet50" not in misses
    assert "took 12 s" in text and "| compile | --quick | ok | 3 s |" in text
    saved = json.loads((results / "summary.json").read_text())
    assert saved["invocation"]["suites"] == ["compile"]
    assert len(collect_checks({"summary": saved, "deploy": json.loads((results / "deploy.json").read_text())})) == 1


def test_coverage_cells_and_table() -> None:
    """One headless tiny ViT: LoRA applies (compared on the features its new head reads), ConFiT does not."""
    import timm
    import torch

    from benchmarks import coverage
    from peftc.analysis.backbones import from_module

    torch.manual_seed(0)
    bb = from_module(timm.create_model("vit_tiny_patch16_224", img_size=32, depth=1, num_classes=0).eval())
    x, ref = coverage._image(bb)
    assert x.shape[-1] == 32 and coverage.headless(bb)
    ok = coverage.cell("lora", bb, x, ref, {"num_classes": 10})
    assert ok["status"] == "ok" and ok["identity"] <= coverage.TOL, ok
    na = coverage.cell("confit", bb, x, ref, {"num_classes": 10})
    assert na["status"] == "n/a" and na["reason"].startswith("specs/confit.yaml:"), na
    rows = {"tiny": {"image": 32, "cells": {"lora": ok, "confit": na}}}
    assert coverage.counts(rows) == {"ok": 1, "n/a": 1, "fail": 0, "backbone_errors": 0}
    assert "| `tiny` | ok (" in coverage.table(rows, ["lora", "confit"])
