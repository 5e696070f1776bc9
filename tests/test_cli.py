"""The command line: reports, JSON, and bad input → one located message, exit 1, no traceback."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from peftc.cli import app

runner = CliRunner()


def run(*args: str) -> tuple[int, str]:
    result = runner.invoke(app, list(args))
    return result.exit_code, result.output


def test_compile_report_and_json(tmp_path: Path) -> None:
    code, out = run("compile", "clr", "--backbone", "resnet18")
    assert code == 0 and "35,136" in out and "by rule" in out
    code, out = run("compile", "specs/clr.yaml", "-b", "resnet18", "--set", "variant=full", "--json",
                    "-o", str(tmp_path / "art"))
    data = json.loads(out)
    assert code == 0 and data["params"]["variant"] == "full"
    assert data["added_params"] > 35_136 and data["rules"][1]["label"] == "clr"
    assert (tmp_path / "art" / "peftc.json").is_file() and (tmp_path / "art" / "delta.safetensors").is_file()


def test_specs_and_backbones() -> None:
    code, out = run("specs", "--json")
    assert code == 0 and any(s["name"] == "clr" and s["summary"] for s in json.loads(out))
    code, out = run("backbones", "resnet1*", "--library", "torchvision", "--json")
    assert code == 0 and json.loads(out) == ["resnet101", "resnet152", "resnet18"]
    code, out = run("backbones", "vit_tiny_patch16_2*", "--library", "timm", "--json")
    assert "timm:vit_tiny_patch16_224" in json.loads(out)


def test_validate() -> None:
    code, out = run("validate", "clr", "--backbone", "resnet18", "--json")
    assert code == 0 and json.loads(out)["valid"] is True


BAD_SPECS = {
    "invalid_yaml": ("name: x\nrules: [\n", "invalid YAML"),
    "unknown_key": ("name: x\nrules:\n  - freeze: {selectr: 1}\n", "unknown key 'selectr'"),
    "unknown_block": ("name: x\nrules:\n  - insert: {after: {type: Conv2d}, block: lora2}\n", "unknown block 'lora2'"),
    "no_match": ("name: x\nrules:\n  - train: {type: Conv2d, name: 'stage9.*'}\n", "no node named 'stage9.*'"),
}


@pytest.mark.parametrize("case", sorted(BAD_SPECS))
def test_bad_specs_exit_1_with_location(tmp_path: Path, case: str) -> None:
    text, expected = BAD_SPECS[case]
    path = tmp_path / f"{case}.yaml"
    path.write_text(text)
    code, out = run("compile", str(path), "--backbone", "resnet18")
    assert code == 1
    assert expected in out and f"{path}:" in out
    assert "Traceback" not in out


@pytest.mark.parametrize(("args", "expected"), [
    (("compile", "clr", "-b", "resnet18", "--set", "kernel_size=big"), "param 'kernel_size' must be an int"),
    (("compile", "clr", "-b", "resnet1800"), "unknown backbone 'resnet1800'"),
    (("compile", "clr", "-b", "timm:vit_tiniest"), "unknown timm model 'vit_tiniest'"),
    (("compile", "missing/spec.yaml", "-b", "resnet18"), "spec file not found: missing/spec.yaml"),
    (("compile", "clr", "-b", "resnet18", "--weights", "missing.safetensors"), "weights file not found"),
    (("compile", "clr", "-b", "resnet18", "--plugin", "no_such_plugin_module"), "cannot import plugin module"),
])
def test_bad_arguments_exit_1(args: tuple[str, ...], expected: str) -> None:
    code, out = run(*args)
    assert code == 1 and expected in out and "Traceback" not in out


def test_usage_error_exits_2() -> None:
    code, _ = run("compile", "clr", "--no-such-option")
    assert code == 2


def test_real_process_prints_one_line_and_no_traceback(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("name: x\nrules:\n  - freeze: {}\n  - head: {clases: 3}\n")
    proc = subprocess.run([sys.executable, "-m", "peftc", "validate", str(path)], capture_output=True, text=True)
    assert proc.returncode == 1
    assert proc.stdout == ""
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and f"{path}:4:" in lines[0] and "did you mean 'classes'" in lines[0]
