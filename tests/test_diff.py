"""Graph diffs: golden JSON for the built-in specs, folding, ownership, artifacts, DOT, HTML in Chromium, CLI.

Golden files live in tests/golden/diff/ and are only rewritten with ``pytest --update-golden`` (or
``PEFTC_UPDATE_GOLDEN=1``): a pass that changes what a built-in spec does to resnet18, vit_tiny or vit_b_16 fails
here until someone looks at the new diff and regenerates the reference on purpose. Which (spec, backbone,
params) pairs have a golden diff is the contract table's say (tests/contract_table.py, rows with "golden").
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import subprocess
import tempfile
from collections.abc import Callable
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn
from typer.testing import CliRunner

import peftc
from peftc.analysis.backbones import Backbone, build_backbone
from peftc.blocks import BlockArgs, Site, register_block
from peftc.cli import app
from peftc.language import builtin_specs, get_primitive, primitives
from peftc.tools.compare import KINDS, SCHEMA, GraphDiff
from peftc.tools.render.style import STATUS
from peftc.tools.view import GraphView, input_shape, view_backbone

from .conftest import synthetic_task, train_steps
from .contract_table import GOLDEN_DIFF as GOLDEN
from .contract_table import GOLDEN_SIZES, ROWS, Row, rows
from .unprivileged import run_peftc

SPECS_DIR = str(Path(builtin_specs()["clr"]).parent)
runner = CliRunner()


# -- golden diffs -----------------------------------------------------------------------------------------------

_BUILT: dict[str, tuple[Backbone, GraphView]] = {}


def _backbone(name: str) -> tuple[Backbone, GraphView]:
    """Each golden backbone is built, traced and run once (the reference view) for all specs."""
    if name not in _BUILT:
        bb = build_backbone(name)
        _BUILT[name] = bb, view_backbone(bb, input_shape(bb.input_size, GOLDEN_SIZES[name]))
    return _BUILT[name]


def _row(spec: str, backbone: str) -> Row:
    return next(r for r in ROWS if r.spec == spec and r.backbone == backbone and not r.label)


def _golden_payload(row: Row) -> dict[str, Any]:
    """The JSON diff of the row's spec on its backbone, or the error that says the spec does not apply there."""
    bb, reference = _backbone(row.backbone)
    try:
        return peftc.diff(row.spec, backbone=bb, params=dict(row.params), image_size=GOLDEN_SIZES[row.backbone],
                          reference=reference).to_json()
    except peftc.PeftcError as exc:
        message = str(exc).replace(SPECS_DIR + os.sep, "specs/")
        return {"schema": SCHEMA, "spec": row.spec, "backbone": row.backbone,
                "error": {"type": type(exc).__name__, "message": message}}


def _golden_path(row: Row) -> Path:
    return GOLDEN / f"{row.golden_name}.json"


def _first_difference(expected: Any, actual: Any, path: str = "$") -> str | None:
    if type(expected) is not type(actual):
        return f"{path}: {expected!r} != {actual!r}"
    if isinstance(expected, dict):
        for key in [*expected, *(k for k in actual if k not in expected)]:
            if key not in expected or key not in actual:
                return f"{path}.{key}: only in {'actual' if key in actual else 'golden'}"
            found = _first_difference(expected[key], actual[key], f"{path}.{key}")
            if found:
                return found
        return None
    if isinstance(expected, list):
        for i, (x, y) in enumerate(zip(expected, actual)):
            found = _first_difference(x, y, f"{path}[{i}]")
            if found:
                return found
        return None if len(expected) == len(actual) else f"{path}: {len(expected)} items != {len(actual)}"
    return None if expected == actual else f"{path}: {expected!r} != {actual!r}"


@pytest.mark.parametrize("row", [pytest.param(r, id=r.id) for r in rows("golden")])
def test_golden_diff(row: Row, update_golden: bool) -> None:
    spec, backbone = row.spec, row.backbone
    path = _golden_path(row)
    actual = _golden_payload(row)
    if not row.applies:  # the table says where a spec does not apply; the compiler must say so too
        assert actual.get("error", {}).get("message", "").startswith(row.error), actual.get("error") or "it applies"
    if update_golden:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(actual, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
        return
    if not path.is_file():
        pytest.fail(f"no golden diff for {spec} on {backbone} ({path.name}); review `peftc diff {spec} -b {backbone}` "
                    "and create it with `pytest tests/test_diff.py --update-golden`")
    expected = json.loads(path.read_text(encoding="utf-8"))
    difference = _first_difference(expected, actual)
    assert difference is None, (
        f"{spec} on {backbone} no longer matches {path.name}: {difference}. If the change is intended, "
        "regenerate with `pytest tests/test_diff.py --update-golden` and commit the new reference."
    )


def test_a_reference_view_changes_nothing_but_cost() -> None:
    bb, reference = _backbone("resnet18")
    assert peftc.diff("bitfit", backbone=bb, image_size=64).to_json() == _golden_payload(_row("bitfit", "resnet18"))
    with pytest.raises(peftc.PeftcError, match="reference= is a view of resnet18 at"):
        peftc.diff("bitfit", backbone=bb, image_size=32, reference=reference)


def test_golden_files_have_a_spec() -> None:
    """A golden file whose spec (or table row) was removed or renamed is stale, not silently ignored."""
    wanted = {_golden_path(r).name for r in rows("golden")}
    stale = sorted(p.name for p in GOLDEN.glob("*.json") if p.name not in wanted)
    assert not stale, f"golden files without a built-in spec and a golden row in tests/contract_table.py: {stale}"


def test_a_changed_pass_fails_the_golden(monkeypatch: pytest.MonkeyPatch) -> None:
    row = _row("clr", "resnet18")
    golden = json.loads(_golden_path(row).read_text(encoding="utf-8"))
    assert _first_difference(golden, _golden_payload(row)) is None
    broken = dataclasses.replace(get_primitive("insert"), run=lambda ctx: None)  # a broken insert pass
    monkeypatch.setitem(primitives.PRIMITIVES, "insert", broken)
    difference = _first_difference(golden, _golden_payload(row))
    assert difference is not None and difference.startswith("$.summary")


# -- what the diff says -----------------------------------------------------------------------------------------


def _section(text: str, title: str) -> list[str]:
    """The item lines of one section of the text tree."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if title in line)
    items = []
    for line in lines[start + 1:]:
        if not line.startswith("│   "):
            break
        if line.startswith(("│   ├── ", "│   └── ")):
            items.append(line[8:])
    return items


def test_clr_resnet50_folds_17_insertions_into_5_lines() -> None:
    d = peftc.diff("clr", backbone="resnet50", image_size=64)
    text = d.text(width=200)
    added = _section(text, "+ added: 17 insertions, +34,560 params")
    assert [line.split("  ")[0] for line in added] == [
        "conv1 → +clr (576 params)",
        "layer1.{0..2}.conv2 → +clr (3×, 576 params each)",
        "layer2.{0..3}.conv2 → +clr (4×, 1,152 params each)",
        "layer3.{0..5}.conv2 → +clr (6×, 2,304 params each)",
        "layer4.{0..2}.conv2 → +clr (3×, 4,608 params each)",
    ]
    counts = [int(m.group(1)) if (m := re.search(r"\((\d+)×", line)) else 1 for line in added]
    assert sum(counts) == 17 == len(d["added"])
    s = d.summary()
    assert s["params"]["delta"] == 34_560 and s["params"]["a"] == 25_557_032  # METHODS: CLR reduced, resnet50
    assert s["task_params"]["b"] - 2_049_000 + s["task_buffers"]["b"] == 140_800  # per-task state without head
    bn = [c for c in d["ownership"] if c.rule == "batchnorm"]
    assert len(bn) == 53 and sum(t["numel"] for c in bn for t in c.data["tensors"] if t["kind"] == "param") == 53_120
    assert all(t["a"] == "frozen" and t["b"] == "task" for c in bn for t in c.data["tensors"])


def test_change_kinds_on_resnet18() -> None:
    d = peftc.diff("clr", backbone="resnet18", image_size=64)
    added = {c.name: c.data for c in d["added"]}
    assert sum(x["params"] for x in added.values()) == 35_136  # METHODS: CLR reduced, resnet18
    assert added["layer2.0.conv1.clr"] == {
        "anchor": "layer2.0.conv1", "action": "insert", "type": "ChannelConv", "op": "call_module", "params": 1152,
        "tied": 0, "state": {"task": 1152}, "shape": [1, 128, 8, 8], "flops": 2 * 1152 * 8 * 8,
        "nodes": ["layer2.0.conv1.clr"],
    }
    rewired = {c.name: c.data for c in d["rewired"]}
    assert rewired["layer2.0.bn1"] == {"a": ["layer2.0.conv1"], "b": ["layer2.0.conv1.clr"]}
    assert not d["removed"] and not d["replaced"] and not d["reshaped"]
    # shapes and FLOPs come from a real forward: conv1 (7x7, stride 2) on 64x64 → 32x32
    conv1 = d.a.nodes["conv1"]
    assert conv1.shape == (1, 64, 32, 32) and conv1.flops == 2 * 64 * 32 * 32 * 3 * 49
    # the views are networkx graphs: nodes by qualified name, an edge per input
    assert set(d.b.graph.nodes) == set(d.b.nodes) and d.b.graph.has_edge("layer2.0.conv1.clr", "layer2.0.bn1")
    assert not d.b.graph.has_edge("layer2.0.conv1", "layer2.0.bn1") and d.a.graph.has_edge("layer2.0.conv1",
                                                                                          "layer2.0.bn1")
    # a ResNet block calls its relu twice: the second call is a node of its own
    assert "layer1.0.relu#2" in d.b.nodes and d.b.nodes["layer1.0.relu#2"].inputs == ("layer1.0.add",)


def test_two_specs_on_one_backbone() -> None:
    d = peftc.diff("clr", "clr", backbone="resnet18", params_b={"variant": "full"}, image_size=64)
    assert d.a.label == "clr" and d.b.label == "clr(variant=full)"
    assert [c.name for c in d["added"]] == [f"layer{i}.0.downsample.0.clr" for i in (2, 3, 4)]
    assert {c.rule for c in d["added"]} == {"clr_1x1"}
    assert [c.name for c in d["rewired"]] == [f"layer{i}.0.downsample.1" for i in (2, 3, 4)]
    assert not d["ownership"]  # both specs own the same tensors the same way


class _TiedArgs(BlockArgs):
    pass


class _TiedProbe(nn.Module):
    """Scales by the BatchNorm it follows: computes with that layer's own weight (a tie, not a copy)."""

    def __init__(self, weight: nn.Parameter):
        super().__init__()
        self.scale = weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.scale.view(1, -1, 1, 1)


@register_block("_test_tied_probe", args=_TiedArgs, suffix="probe")
def _tied_probe(site: Site, args: _TiedArgs) -> nn.Module:
    """Test block sharing the selected module's weight."""
    return _TiedProbe(site.module.weight)


def test_a_block_sharing_another_layers_tensors_is_tied() -> None:
    spec = {"name": "probe", "rules": [{"freeze": {}}, {"insert": {"after": {"name": "layer1.0.bn1"},
                                                                    "block": "_test_tied_probe"}}]}
    d = peftc.diff(spec, backbone="resnet18", image_size=64)
    (added,) = d["added"]
    assert added.name == "layer1.0.bn1.probe" and added.data["params"] == 0 and added.data["tied"] == 64
    tensors = {t.name: t for t in d.b.nodes["layer1.0.bn1.probe"].tensors}
    assert tensors["scale"].state == "tied" and tensors["scale"].source == "layer1.0.bn1.weight"
    owner = {t.name: t.state for t in d.b.nodes["layer1.0.bn1"].tensors}
    assert owner["weight"] == owner["bias"] == "frozen"
    # a borrowed tensor keeps its owner's flag: inserting the block does not unfreeze layer1.0.bn1.weight
    assert not d["ownership"]
    assert d.summary()["params"]["delta"] == 0 and d.summary()["trainable"]["b"] == 0


def test_artifacts(tmp_path: Path) -> None:
    model = peftc.compile("clr", "resnet18", num_classes=3)
    model.save(tmp_path / "a")
    images, labels = synthetic_task()
    train_steps(model, images, labels, steps=2)
    model.save(tmp_path / "b")
    result = runner.invoke(app, ["diff", "--artifacts", str(tmp_path / "a"), str(tmp_path / "b"), "--json",
                                 "--image-size", "32"])
    assert result.exit_code == 0, result.output
    d = json.loads(result.output)
    assert not any(d["summary"]["changes"].values())  # the same spec: the same graph
    assert d["a"]["kind"] == d["b"]["kind"] == "artifact" and d["a"]["spec"] == "clr"
    tensors = d["tensors"]
    assert tensors["differ"] and not tensors["only_a"] and not tensors["only_b"] and tensors["same"] >= 0
    assert "tasks/default/conv1.clr.weight" in {entry["tensor"] for entry in tensors["changed"]}
    alone = peftc.diff(str(tmp_path / "a"), image_size=32)  # one artifact against its backbone
    assert alone.a.source["kind"] == "backbone" and len(alone["added"]) == 17 and alone.tensors is None
    assert {c.name: c for c in alone["replaced"]}["fc"].data["b"]["config"].endswith("out_features=3, bias=True")


# -- renderers --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def clr18() -> GraphDiff:
    return peftc.diff("clr", backbone="resnet18", image_size=64)


def _dot_statements(text: str) -> tuple[dict[str, dict[str, str]], list[tuple[str, str]]]:
    """A strict reader for the DOT subset peftc writes: every statement parsed, every token accounted for."""
    token = re.compile(r'\s*(?:(?P<str>"(?:[^"\\]|\\.)*")|(?P<arrow>->)|(?P<id>[A-Za-z_][\w.]*|-?\d+(?:\.\d+)?)'
                       r'|(?P<punct>[{}\[\];=,]))')
    pos, tokens = 0, []
    while pos < len(text.rstrip()):
        m = token.match(text, pos)
        assert m and m.end() > pos, f"bad DOT at {text[pos:pos + 40]!r}"
        tokens.append(next((k, v) for k, v in m.groupdict().items() if v is not None))
        pos = m.end()
    assert tokens[:3] == [("id", "digraph"), ("id", "peftc_diff"), ("punct", "{")] and tokens[-1] == ("punct", "}")
    nodes: dict[str, dict[str, str]] = {}
    edges: list[tuple[str, str]] = []
    depth, i = 0, 2

    def attrs(j: int) -> tuple[dict[str, str], int]:
        out: dict[str, str] = {}
        assert tokens[j] == ("punct", "[")
        j += 1
        while tokens[j] != ("punct", "]"):
            key, eq, value = tokens[j], tokens[j + 1], tokens[j + 2]
            assert key[0] == "id" and eq == ("punct", "=") and value[0] in ("str", "id"), tokens[j:j + 3]
            out[key[1]] = value[1]
            j += 3
            if tokens[j] == ("punct", ","):
                j += 1
        return out, j + 1

    while i < len(tokens):
        kind, value = tokens[i]
        if value == "{":
            depth, i = depth + 1, i + 1
        elif value == "}":
            depth, i = depth - 1, i + 1
        elif value == "subgraph":
            assert tokens[i + 1][0] == "str" and tokens[i + 2] == ("punct", "{")
            i += 2
        elif value in ("graph", "node", "edge"):
            _, i = attrs(i + 1)
            assert tokens[i] == ("punct", ";")
            i += 1
        elif kind == "id" and tokens[i + 1] == ("punct", "="):  # cluster attribute: label="..."
            assert tokens[i + 2][0] in ("str", "id") and tokens[i + 3] == ("punct", ";")
            i += 4
        elif kind == "str" and tokens[i + 1] == ("arrow", "->"):
            assert tokens[i + 2][0] == "str"
            edges.append((json.loads(value), json.loads(tokens[i + 2][1])))
            _, i = attrs(i + 3)
            assert tokens[i] == ("punct", ";")
            i += 1
        elif kind == "str":
            nodes[json.loads(value)], i = attrs(i + 1)
            assert tokens[i] == ("punct", ";")
            i += 1
        else:
            raise AssertionError(f"unexpected DOT token {tokens[i]}")
    assert depth == 0
    return nodes, edges


def test_dot_is_valid_graphviz(clr18: GraphDiff, tmp_path: Path) -> None:
    text = clr18.dot()
    shown = clr18.display_graph()
    nodes, edges = _dot_statements(text)
    assert set(nodes) == set(shown.nodes) and len(nodes) == len(shown) and len(edges) == shown.number_of_edges()
    assert all(u in nodes and v in nodes for u, v in edges)
    assert nodes["layer1.0.conv1.clr"]["fillcolor"] == json.dumps(STATUS["added"][0])
    assert "added" in nodes["layer1.0.conv1.clr"]["class"]
    dot = shutil.which("dot")
    if dot is not None:  # Graphviz itself, when installed
        svg = subprocess.run([dot, "-Tsvg"], input=text, capture_output=True, text=True, timeout=120)
        assert svg.returncode == 0, svg.stderr
        assert len(re.findall(r'<g id="node\d+" class="node', svg.stdout)) == len(nodes)
    try:
        import pydot
    except ImportError:
        return
    (graph,) = pydot.graph_from_dot_data(text)
    assert len(graph.get_edges()) == len(edges)


def test_json_schema_is_documented(clr18: GraphDiff) -> None:
    doc = (Path(__file__).resolve().parents[1] / "docs" / "diff.md").read_text(encoding="utf-8")
    data = clr18.to_json(include_graph=True)
    keys = set(data) | set(data["summary"]) | set(data["folded"]) | set(data["folded"]["added"][0])
    keys |= {k for kind in KINDS for change in data[kind] for k in change} | set(data["graph"]["b"][0])
    keys |= {k for change in data["ownership"] for t in change["tensors"] for k in t}
    missing = sorted(k for k in keys if not re.search(rf"\b{re.escape(k)}\b", doc))
    assert not missing, f"docs/diff.md does not document {missing}"
    assert f'"schema": "{SCHEMA}"' in doc


def test_html_is_one_self_contained_file(clr18: GraphDiff) -> None:
    html = clr18.html()
    assert html.startswith("<!DOCTYPE html>") and html.count("<svg") == 1
    assert not re.search(r"\b(?:src|href)\s*=|<link|@import|url\(", html)
    assert re.findall(r"https?://[^\s\"'<>]+", html) == ["http://www.w3.org/2000/svg"]  # a namespace, never fetched


class _Classes(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.groups: list[list[str]] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == "g":
            self.groups.append((dict(attrs).get("class") or "").split())


_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
          "--disable-background-networking", "--disable-component-update", "--disable-sync"]


@pytest.fixture(scope="module")
def chromium() -> Callable[..., subprocess.CompletedProcess[str]]:
    """Headless Chromium (.ci/run installs Debian's ``chromium``); the tests skip, saying why, if it cannot run."""
    names = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
    binary = next((p for p in map(shutil.which, names) if p), None)
    if binary is None:
        pytest.skip("headless Chromium is not installed (.ci/run installs it: apt-get install chromium)")
    profile = tempfile.mkdtemp(prefix="peftc-chromium-")

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([binary, *_FLAGS, f"--user-data-dir={profile}", *args], capture_output=True,
                              text=True, timeout=180, check=False)

    probe = run("--dump-dom", "data:text/html,<p>ok</p>")
    if probe.returncode != 0 or "<p>ok</p>" not in probe.stdout:
        pytest.skip(f"Chromium cannot run here: {(probe.stderr.strip().splitlines() or ['no output'])[-1]}")
    yield run
    shutil.rmtree(profile, ignore_errors=True)


def test_html_renders_in_headless_chromium(clr18: GraphDiff, chromium: Callable[..., Any], tmp_path: Path) -> None:
    page = tmp_path / "diff.html"
    page.write_text(clr18.html(), encoding="utf-8")
    dom = chromium("--dump-dom", page.as_uri())
    assert dom.returncode == 0, dom.stderr[-2000:]
    parser = _Classes()
    parser.feed(dom.stdout)
    nodes = [c for c in parser.groups if "node" in c]
    shown = clr18.display_graph()
    assert len(nodes) == len(shown) == 88  # one SVG node per graph node (resnet18: 71 nodes + 17 insertions)
    assert sum("added" in c for c in nodes) == 17 == sum(s == "added" for _, s in shown.nodes(data="status"))
    assert sum("rewired" in c for c in nodes) == 17
    bands = [c for c in parser.groups if "band" in c]
    assert any("collapsed" in c for c in bands)  # repeated blocks (layer1.1, …) start folded after the script ran
    shot = tmp_path / "diff.png"
    result = chromium(f"--screenshot={shot}", "--window-size=1200,1400", page.as_uri())
    assert result.returncode == 0 and shot.is_file(), result.stderr[-2000:]
    from PIL import Image

    image = Image.open(shot).convert("RGB")
    green = tuple(int(STATUS["added"][0][i:i + 2], 16) for i in (1, 3, 5))
    colours = image.getcolors(image.width * image.height) or []
    pixels = sum(n for n, rgb in colours if all(abs(a - b) <= 3 for a, b in zip(rgb, green)))
    assert pixels > 3 * 150 * 30, "the screenshot shows no added (green) node boxes"


# -- command line -----------------------------------------------------------------------------------------------


def _run(*args: str) -> tuple[int, str]:
    result = runner.invoke(app, list(args))
    return result.exit_code, result.output


def test_cli_formats_and_output_files(tmp_path: Path) -> None:
    code, out = _run("diff", "clr", "-b", "resnet18", "--image-size", "64")
    assert code == 0 and "17 insertions" in out and "layer1.{0,1}.conv1 → +clr (2×, 576 params each)" in out
    code, out = _run("diff", "clr", "-b", "resnet18", "--image-size", "64", "-o", str(tmp_path / "d.json"))
    data = json.loads((tmp_path / "d.json").read_text())
    assert code == 0 and data["schema"] == SCHEMA and data["summary"]["changes"]["added"] == 17
    code, out = _run("diff", "clr", "-b", "resnet18", "--image-size", "64", "-f", "html", "-o", str(tmp_path / "d"))
    assert code == 0 and (tmp_path / "d").read_text().startswith("<!DOCTYPE html>")


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["diff", "clr", "-b", "resnet18", "--format", "yaml"], "unknown format 'yaml'"),
        (["diff", "clr", "-b", "resnet18", "-o", "/nonexistent-dir/d.json"], "cannot write /nonexistent-dir/d.json"),
        (["diff", "clr", "-b", "resnet1800"], "unknown backbone 'resnet1800'"),
        (["diff", "clr"], "needs --backbone"),
        (["diff", "clr", "lora", "bitfit", "-b", "resnet18"], "one or two sources"),
        (["diff", "--artifacts", "specs", "-b", "resnet18"], "not an artifact directory"),
        (["diff", "nope", "-b", "resnet18"], "no built-in spec named 'nope'"),
        (["diff", "clr", "-b", "timm:vit_tiny_patch16_224", "--image-size", "64"], "--image-size"),
    ],
)
def test_cli_bad_input(args: list[str], message: str) -> None:
    code, out = _run(*args)
    assert code == 1 and message in out and "Traceback" not in out, out


def test_cli_unwritable_output(tmp_path: Path) -> None:
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        done = run_peftc("diff", "clr", "-b", "resnet18", "-o", str(locked / "d.html"))  # as root in CI, too
        assert done.returncode == 1 and "permission denied" in done.stderr and "Traceback" not in done.stderr, (
            done.stderr)
        assert list(locked.iterdir()) == []
    finally:
        locked.chmod(0o700)
    code, out = _run("diff", "clr", "-b", "resnet18", "-o", str(tmp_path))
    assert code == 1 and "is a directory" in out
