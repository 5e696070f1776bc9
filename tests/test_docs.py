"""The spec-language tutorial's spec is a fixture: it must compile, and the doc must show it as it is."""

from __future__ import annotations

import re
from pathlib import Path

import torch

import peftc

ROOT = Path(__file__).resolve().parents[1]
TUTORIAL = ROOT / "docs" / "tutorial" / "stage_clr.yaml"


def test_tutorial_snippets_are_in_the_fixture() -> None:
    doc = (ROOT / "docs" / "specs.md").read_text()
    tutorial = doc[doc.index("## Tutorial"):]
    fixture = TUTORIAL.read_text()
    snippets = re.findall(r"```yaml\n(.*?)```", tutorial, re.S)
    assert len(snippets) >= 5
    for snippet in snippets:
        for line in snippet.strip().splitlines():
            assert line.rstrip() in fixture, f"tutorial line not in the fixture: {line!r}"


def test_tutorial_spec_compiles_and_counts() -> None:
    model = peftc.compile(TUTORIAL, "resnet50")
    by_rule = {r.label: r for r in model.report.rules}
    # 3x3 convs of layer3 (6 x 256 channels) and layer4 (3 x 512), 9 taps each
    assert by_rule["clr"].added_params == (6 * 256 + 3 * 512) * 9
    assert by_rule["head"].added_params == 2048 * 10 + 10 and model.net.fc.out_features == 10
    assert by_rule["bn"].nodes == 6 * 3 + 1 + 3 * 3 + 1  # three BNs per block plus each stage's downsample BN
    variant = peftc.compile(TUTORIAL, "resnet50", pointwise=True, stages="4")
    clr = {r.label: r.added_params for r in variant.report.rules}
    assert clr["clr"] == 3 * 512 * 9
    assert clr["clr_1x1"] == 3 * (512 + 2048) + 2048  # conv1 and conv3 of each block, plus the downsample
    with torch.no_grad():
        assert model(torch.randn(1, 3, 64, 64)).shape == (1, 10)
