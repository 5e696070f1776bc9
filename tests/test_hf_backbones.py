"""HF transformers vision models as backbones, and models plain torch.fx cannot trace whole (issue 17, items 6-7).

Every built-in spec on each of the four HF models (tiny configs, random init): it compiles, equals the backbone at
init where the method is additive (ToMe at r=0, the linear probe with ``init: backbone``; a headless model is
compared on the features its new head reads) and trains a step — or it does not apply, with a message naming the
model's structure. Save/load, folding and ONNX parity of one model per method family are contract rows
(tests/contract_table.py).
"""

from __future__ import annotations

import inspect
from pathlib import Path

import pytest
import torch
from torch import fx, nn
from typer.testing import CliRunner

import peftc
from benchmarks.coverage import _image, cell, headless
from peftc.analysis.trace import trace, trace_info
from peftc.errors import BackboneError, PeftcError
from peftc.language import builtin_specs

from . import cached
from .contract_table import HF_BUILD, HF_CLIP, HF_SWIN, HF_VIT

pytest.importorskip("transformers")
pytestmark = pytest.mark.usefixtures("one_thread")

# the pairs that do not apply, and what in the model's structure the message names
NOT_APPLICABLE = {
    "confit": "it has no BatchNorm",
    "tocom": "attaches to a fused qkv Linear",
}
SWIN_NOT_APPLICABLE = {
    "tome": "adds a term tied to token positions",
    "tocom": "adds a term tied to token positions",
    "replacement": "differ from one another",
    "memvp": "every MemVP layer shares one memory",
}


@pytest.mark.parametrize("name", list(HF_BUILD))
def test_every_builtin_spec(name: str) -> None:
    bb = cached.backbone(name, **dict(HF_BUILD[name]))
    x, ref = _image(bb)
    extra = {"num_classes": 10} if headless(bb) else {}
    expected = {**NOT_APPLICABLE, **(SWIN_NOT_APPLICABLE if name == HF_SWIN else {})}
    cells = {spec: cell(spec, bb, x, ref, extra) for spec in builtin_specs()}
    failed = {s: c["reason"] for s, c in cells.items() if c["status"] == "fail"}
    assert not failed, failed
    na = {s: c["reason"] for s, c in cells.items() if c["status"] == "n/a"}
    assert na.keys() == expected.keys(), na
    for spec, words in expected.items():
        assert words in na[spec] and "\n" not in na[spec], (spec, na[spec])
    identity = [s for s, c in cells.items() if c.get("identity") is not None]
    assert len(identity) >= 9 and all(cells[s]["identity"] <= 1e-5 for s in identity)


def test_compiled_forward_returns_one_tensor_and_traces_dynamic_batch() -> None:
    """The compiled HF classifier returns the logits tensor (not a ModelOutput), for any batch size."""
    module = cached.module(HF_VIT, **dict(HF_BUILD[HF_VIT]))
    model = peftc.compile("lora", module)
    for batch in (1, 3):
        x = torch.randn(batch, 3, 32, 32)
        with torch.no_grad():
            assert torch.equal(model(x), module(x).logits)
    info = trace_info(model.net)
    assert info.tracer == "shape-aware" and info.input_size == (3, 32, 32) and not info.eager
    assert any("shape-aware" in line for line in model.report.tracing)
    with pytest.raises(PeftcError, match="3x32x32"):
        model(torch.randn(1, 3, 64, 64))  # sizes the code branched on are fixed at compile time


def test_tracing_leaves_the_model_as_it_was() -> None:
    """HF Swin stores the window size it computes from the input; tracing must not leave proxies behind."""
    module = cached.module(HF_SWIN, **dict(HF_BUILD[HF_SWIN]))
    before = [dict(vars(m)) for m in module.modules()]
    trace(module, input_size=(3, 32, 32))
    after = [dict(vars(m)) for m in module.modules()]
    assert all(a.keys() == b.keys() and all(a[k] is b[k] for k in a) for a, b in zip(after, before))
    assert not any(isinstance(v, fx.Proxy) for m in module.modules() for v in vars(m).values())


def test_hf_ids(tmp_path: Path) -> None:
    bb = cached.backbone(HF_CLIP, **dict(HF_BUILD[HF_CLIP]))
    assert bb.input_size == (3, 32, 32) and bb.library == "transformers"
    with pytest.raises(BackboneError, match="no config for hf:no/such-model here"):
        peftc.compile("lora", "hf:no/such-model")
    with pytest.raises(BackboneError, match="an architecture, not a checkpoint"):
        peftc.compile("lora", HF_VIT, pretrained=True)
    with pytest.raises(BackboneError, match="ViTConfig has no field 'hiden_size' \\(did you mean 'hidden_size'"):
        peftc.compile("lora", HF_VIT, backbone_kwargs={"hiden_size": 64})
    # a local directory with a config.json; a pair that does not apply is one message and exit 1
    import transformers

    config = transformers.SwinConfig(**dict(HF_BUILD[HF_SWIN]), architectures=["SwinForImageClassification"])
    config.save_pretrained(tmp_path)
    from peftc.cli import app

    result = CliRunner().invoke(app, ["compile", "tome", "-b", f"hf:{tmp_path}"])
    assert result.exit_code == 1, result.output
    assert "tied to token positions" in result.output and "Traceback" not in result.output


# -- region tracing: models whose code plain and shape-aware fx cannot trace ----------------------------------
class Gate(nn.Module):
    """Control flow on tensor values: no tracer can turn this into one graph."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(12, 12)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > 0:
            return self.fc(x)
        return -self.fc(x)


class Net(nn.Module):
    image_size = 2

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Linear(12, 12)
        self.gate = Gate()
        self.head = nn.Linear(12, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.gate(self.stem(x.flatten(1))))


class Branchy(Net):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.mean() > 0:  # at the top level: nothing to keep eager around it
            x = -x
        return super().forward(x)


TRAIN_LINEARS = {"peftc": 1, "name": "probe_linears", "rules": [{"freeze": {}}, {"train": {"type": "Linear"}}]}


def test_untraceable_module_is_kept_eager_and_rules_apply_elsewhere() -> None:
    net = Net().eval()
    model = peftc.compile(TRAIN_LINEARS, net)
    info = trace_info(model.net)
    line = inspect.getsourcelines(Gate.forward)[1] + 1
    assert list(info.eager) == ["gate"]
    assert f"test_hf_backbones.py:{line}" in info.eager["gate"] and "'gate' (Gate)" in info.eager["gate"]
    trained = {n for n, p in model.net.named_parameters() if p.requires_grad}
    assert trained == {"stem.weight", "stem.bias", "head.weight", "head.bias"}  # not gate.fc: it is inside
    x = torch.randn(3, 3, 2, 2)
    with torch.no_grad():
        assert torch.equal(model(x), net(x)) and torch.equal(model(-x.abs()), net(-x.abs()))
    assert any("kept eager" in line and "gate" in line for line in model.report.tracing)
    d = peftc.diff(TRAIN_LINEARS, backbone=net)
    assert any("kept eager" in line and "gate" in line for line in d.b.source["tracing"])
    assert "kept eager (one node, no rule reaches inside): gate" in d.text(width=400)


def test_top_level_control_flow_is_traced_per_region_naming_the_line() -> None:
    line = inspect.getsourcelines(Branchy.forward)[1] + 1
    net = Branchy().eval()
    model = peftc.compile(TRAIN_LINEARS, net)  # region mode (tests/test_regions.py): the forward stays eager
    assert model.regions == ("stem", "gate.fc", "head")
    why = model.report.tracing[0]
    assert "Branchy" in why and f"test_hf_backbones.py:{line}" in why and "x.mean() > 0" in why
    x = torch.randn(3, 3, 2, 2)
    with torch.no_grad():
        assert torch.equal(model(x), net(x)) and torch.equal(model(-x.abs()), net(-x.abs()))


def test_plain_models_keep_the_plain_trace() -> None:
    gm = trace(nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU()), input_size=(3, 8, 8))
    assert trace_info(gm).tracer == "plain" and trace_info(gm).describe() == []


class Gated(nn.Module):
    """Two blocks of the same untraceable code, called in turn."""

    image_size = 2

    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.Sequential(Gate(), Gate())
        self.head = nn.Linear(12, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(x.flatten(1)))


def test_blocks_of_the_same_code_are_kept_eager_together() -> None:
    info = trace_info(trace(Gated().eval(), input_size=(3, 2, 2)))
    assert list(info.eager) == ["blocks.0", "blocks.1"]
    assert info.eager["blocks.1"] == "same code as 'blocks.0'"


class PerSample(nn.Module):
    """A Python loop over the batch: traced at one batch size it would be wrong at every other."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(12, 12)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.stack([self.fc(x[i]) for i in range(x.shape[0])])


class Looped(Net):
    def __init__(self) -> None:
        super().__init__()
        self.gate = PerSample()


def test_code_specialised_to_the_batch_size_is_kept_eager() -> None:
    net = Looped().eval()
    gm = trace(net, input_size=(3, 2, 2))
    assert list(trace_info(gm).eager) == ["gate"]
    assert "specialises on the batch size" in trace_info(gm).eager["gate"]
    x = torch.randn(5, 3, 2, 2)
    with torch.no_grad():
        assert torch.equal(gm(x), net(x))
