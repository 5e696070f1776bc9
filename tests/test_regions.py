"""Region mode (issue 17 item 6): a model whose forward does not trace whole is rewritten region by region.

The model below branches on a tensor value at its top level, which neither plain nor shape-aware fx can put in
one graph. peftc traces its submodules that trace (the patch conv, the stack of timm ViT blocks, the final norm,
the head) as regions, runs the rules on them chained, and installs the rewritten regions in place: the model's
own forward is the eager glue.
"""

from __future__ import annotations

import inspect
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from timm.models.vision_transformer import Block
from torch import fx, nn
from torchvision.models.resnet import BasicBlock, ResNet

import peftc
from peftc.errors import PeftcError
from peftc.export.fold import fold

pytestmark = pytest.mark.usefixtures("one_thread")


class Guarded(nn.Module):
    """A small ViT whose forward branches on the input's values."""

    image_size = 16

    def __init__(self) -> None:
        super().__init__()
        self.patch = nn.Conv2d(3, 32, 8, 8)
        self.blocks = nn.Sequential(Block(32, 2), Block(32, 2))
        self.norm = nn.LayerNorm(32)
        self.head = nn.Linear(32, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.amin() < -1e6:  # data-dependent: the top level does not trace
            x = x.clamp(min=-1e6)
        tokens = self.blocks(self.patch(x).flatten(2).transpose(1, 2))
        return self.head(self.norm(tokens).mean(1))


LINE = inspect.getsourcelines(Guarded.forward)[1] + 1
REGIONS = ("patch", "blocks", "norm", "head")


def _net() -> Guarded:
    torch.manual_seed(0)
    return Guarded().eval()


def _x(batch: int = 2) -> torch.Tensor:
    return torch.randn(batch, 3, 16, 16, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("spec, params", [("lora", {}), ("adaptformer", {"num_classes": 5}),
                                          ("bitfit", {"num_classes": 5}), ("ln_tuning", {})])
def test_specs_compile_per_region_and_equal_the_model_at_init(spec: str, params: dict) -> None:
    net = _net()
    model = peftc.compile(spec, net, **params)
    assert model.regions == REGIONS and model.net is not net  # the caller's module is copied, never changed
    assert not isinstance(model.net, fx.GraphModule) and isinstance(model.net.blocks, fx.GraphModule)
    why = model.report.tracing[0]
    assert why.startswith("traced per region") and f"test_regions.py:{LINE}" in why and "x.amin()" in why
    assert model.report.tracing[1] == f"regions (rules apply inside): {', '.join(REGIONS)}"
    trainable = {n for n, _ in model.named_trainable_parameters()}
    assert trainable and not any(n.startswith("patch.weight") for n in trainable)
    x = _x()
    with torch.no_grad():
        assert (model(x) - net(x)).abs().max() < 1e-5
        assert (model(x - 2e6) - net(x - 2e6)).abs().max() < 1e-5  # the other branch of the glue


def test_train_save_load_and_fold(tmp_path: Path) -> None:
    net = _net()
    model = peftc.compile("lora", net)
    before = {n: p.detach().clone() for n, p in model.net.named_parameters()}
    model.train()
    opt = torch.optim.SGD(model.trainable_parameters(), lr=0.5)
    model(_x()).square().mean().backward()
    opt.step()
    model.eval()
    changed = {n for n, p in model.net.named_parameters() if not torch.equal(p, before[n])}
    trainable = {n for n, _ in model.named_trainable_parameters()}
    assert changed and changed <= trainable and "blocks.0.attn.qkv.lora.B.weight" in changed
    model.save(tmp_path / "a")
    manifest = json.loads((tmp_path / "a" / "peftc.json").read_text())
    assert manifest["regions"] == list(REGIONS)
    assert set(load_file(tmp_path / "a" / "delta.safetensors")) <= {f"shared/{n}" for n in trainable} | {
        f"tasks/default/{n}" for n in trainable}
    loaded = peftc.load(tmp_path / "a", backbone=net)
    x = _x(3)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
        folded = fold(model)
        assert folded.report.counts() == {"bypass": 2} and (folded.module(x) - model(x)).abs().max() < 1e-4
    # a lone leaf region that a rule added to is cut back as its operations: the bypass around it stays
    assert set(folded.report.remaining) == {"patch.lora"}


def test_diff_names_the_regions_and_why() -> None:
    d = peftc.diff("lora", backbone=_net())
    text = d.text(width=400)
    assert "regions (rules apply inside): patch, blocks, norm, head" in text
    assert f"test_regions.py:{LINE}" in text and "blocks.{0,1}.attn.qkv ∥ +lora" in text


def test_onnx_export_is_refused_naming_why(tmp_path: Path) -> None:
    model = peftc.compile("bitfit", _net(), num_classes=5)
    with pytest.raises(PeftcError) as err:
        peftc.export_onnx(model, tmp_path / "m.onnx")
    message = str(err.value)
    assert "compiled per region (patch, blocks, norm, head)" in message and f"test_regions.py:{LINE}" in message


def test_a_rule_reaching_into_the_glue_says_so() -> None:
    spec = {"peftc": 1, "name": "glue", "rules": [{"freeze": {}}, {"train": {"name": "pos_embed"}}]}
    with pytest.raises(PeftcError) as err:
        peftc.compile(spec, _net())
    message = str(err.value)
    assert "lies in the eager glue of Guarded" in message and "x.amin()" in message


class Halving(ResNet):
    """A torchvision ResNet whose forward loops a number of times that depends on the input's values."""

    image_size = 32

    def _forward_impl(self, x: torch.Tensor) -> torch.Tensor:
        while x.abs().amax() > 100:
            x = x / 2
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


@pytest.mark.parametrize("spec", ["lora", "confit"])
def test_resnet_stages_are_regions_and_rules_cross_their_boundaries(spec: str) -> None:
    torch.manual_seed(0)
    net = Halving(BasicBlock, [1, 1, 1, 1], num_classes=7).eval()
    model = peftc.compile(spec, net)  # confit inserts before layer2.0.conv1, which reads layer1's output
    assert model.regions == ("conv1", "bn1", "layer1", "layer2", "layer3", "layer4", "fc")
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert (model(x) - net(x)).abs().max() < 1e-5 and (model(x * 1e3) - net(x * 1e3)).abs().max() < 1e-5


class Scaled(nn.Module):
    """Its only parameter is read by its own forward, which branches on tensor values: nothing to trace."""

    image_size = 4

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > 0:
            x = -x
        return x.flatten(1) * self.scale


def test_a_model_with_no_region_is_one_message_naming_the_line() -> None:
    line = inspect.getsourcelines(Scaled.forward)[1] + 1
    with pytest.raises(PeftcError) as err:
        peftc.compile("bitfit", Scaled())
    message = str(err.value)
    assert f"test_regions.py:{line}" in message and "nor does any submodule trace as a region" in message
