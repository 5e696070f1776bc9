"""``peftc inspect`` (a map of a backbone for writing selectors) and ``peftc select`` (a selector dry run)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from peftc.cli import app
from peftc.errors import SpecError
from peftc.tools.inspect import dry_run, inspect_nodes, parse_selector

runner = CliRunner()


def _run(*args: str) -> tuple[int, str]:
    result = runner.invoke(app, list(args))
    return result.exit_code, result.output


def test_vit_tiny_has_49_linear_layers_with_shapes() -> None:
    code, out = _run("inspect", "timm:vit_tiny_patch16_224", "--filter", "type: Linear")
    assert code == 0, out
    rows = [line for line in out.splitlines() if "│ Linear" in line]
    assert len(rows) == 49 and "49 nodes" in out  # 12 blocks x (qkv, proj, fc1, fc2) + head
    qkv = next(line for line in rows if "blocks.0.attn.qkv " in line)
    assert "1×197×576" in qkv and "111,168" in qkv and "qkv" in qkv.split("│")[-2]
    assert all(re.search(r"1×(197×)?\d+ ", line) for line in rows)  # every row has its output shape
    assert "1×1000" in next(line for line in rows if "│ head " in line)


def test_inspect_json() -> None:
    code, out = _run("inspect", "resnet18", "--filter", "type: Linear", "--image-size", "32", "--json")
    assert code == 0, out
    data = json.loads(out)
    (fc,) = data["nodes"]
    assert "head" in fc.pop("roles")
    assert data["count"] == 1 and fc == {
        "name": "fc", "type": "Linear", "op": "call_module", "shape": [1, 1000], "params": 513_000,
        "flops": 2 * 512 * 1000, "block": None,
    }


def test_inspect_filters_and_rewritten_graphs() -> None:
    rows = inspect_nodes("resnet18", '{type: Conv2d, where: "kernel_size == (3, 3)", blocks: "-1"}', image_size=64)
    assert [r.name for r in rows] == [f"layer{i}.1.conv{j}" for i in range(1, 5) for j in (1, 2)]
    assert rows[0].shape == (1, 64, 16, 16) and rows[0].params == 64 * 64 * 9
    clr = inspect_nodes("resnet18", "type: ChannelConv", spec="clr", image_size=64)  # after the rewrite
    assert len(clr) == 17 and clr[0].name == "conv1.clr" and clr[0].params == 64 * 9
    everything = inspect_nodes("resnet18", image_size=32)
    assert sum(r.params for r in everything) == 11_689_512 and everything[0].name == "conv1"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("type: Linaer", "--filter.type: no node has type 'Linaer' (did you mean 'Linear'?)"),
        ("typo: Linear", "unknown selector key 'typo' (did you mean 'type'?)"),
        ("Linear", "expected a selector mapping"),
        ("{type: [", "invalid YAML"),
        ("where: 'kernel_size =='", "invalid expression"),
    ],
)
def test_inspect_bad_filters(text: str, message: str) -> None:
    code, out = _run("inspect", "resnet18", "--filter", text, "--image-size", "32")
    assert code == 1 and message in out and "Traceback" not in out, out


def test_inspect_unknown_backbone() -> None:
    code, out = _run("inspect", "resnet1800")
    assert code == 1 and "unknown backbone 'resnet1800'" in out


def test_parse_selector_is_the_spec_selector() -> None:
    sel = parse_selector('{role: qkv, blocks: "::2", exclude: {name: "blocks.0.*"}}')
    assert sel.role == "qkv" and sel.blocks == "::2" and sel.exclude is not None
    with pytest.raises(SpecError, match="blocks must be a slice"):
        parse_selector("blocks: 'x'")


def test_select_dry_run_resnet50() -> None:
    code, out = _run("select", "clr", "-b", "resnet50", "--json")
    assert code == 0, out
    rules = {(r["rule"], r["key"]): r for r in json.loads(out)["rules"]}
    assert rules[("clr", "after")]["count"] == 17 and rules[("clr", "after")]["matches"][0] == "conv1"
    assert rules[("batchnorm", "")]["count"] == 53
    assert rules[("head", "target")]["matches"] == ["fc"]
    assert rules[("freeze", "")]["selector"] == "all"
    code, text = _run("select", "clr", "-b", "resnet50")
    assert code == 0 and "layer3.{0..5}.conv2 Conv2d (6×)" in text and "nothing rewritten" in text


def test_select_reports_selectors_that_match_nothing(tmp_path: Path) -> None:
    spec = tmp_path / "later.yaml"
    spec.write_text(yaml.safe_dump({"name": "later", "rules": [
        {"insert": {"after": {"type": "Conv2d", "name": "layer1.*"}, "block": "channel_conv"}},
        {"train": {"type": "ChannelConv"}},  # selects what the rule before inserts: nothing in the backbone
    ]}))
    matches = dry_run(str(spec), "resnet18")
    assert [len(m.matches) for m in matches] == [4, 0]
    assert matches[1].error is not None and "no node has type 'ChannelConv'" in matches[1].error
    assert "later.yaml:" in matches[1].error  # located in the spec file
    code, out = _run("select", str(spec), "-b", "resnet18")
    assert code == 0 and "no match" in out
    code, out = _run("select", str(spec), "-b", "resnet18", "--strict")
    assert code == 1
