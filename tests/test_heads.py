"""Heads follow the backbone's own convention: Linear, 1×1 conv and MLP classifiers, double heads, headless
feature extractors (a new Linear after the pooled features)."""

from __future__ import annotations

import pytest
import timm
import torch
from torch import nn

import peftc
from peftc.analysis.index import NodeIndex, block_positions
from peftc.analysis.roles import head
from peftc.analysis.trace import trace
from peftc.errors import SpecError

X = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))


def _tiny_vit(**kwargs: object) -> nn.Module:
    torch.manual_seed(0)
    return timm.create_model("vit_tiny_patch16_224", img_size=32, depth=1, **kwargs).eval()


def _features(model: peftc.runtime.model.Compiled, path: str, x: torch.Tensor) -> torch.Tensor:
    seen: list[torch.Tensor] = []
    hook = model.net.get_submodule(path).register_forward_pre_hook(lambda _, args: seen.append(args[0]))
    model(x)
    hook.remove()
    return seen[0]


def _head_paths(module: nn.Module) -> list[str]:
    return [str(c.node.target) for c in head(NodeIndex(trace(module), block_positions(module)))]


@pytest.mark.parametrize("name, kwargs", [
    ("vit_tiny_patch16_224", {"img_size": 32, "depth": 1}),
    ("deit_tiny_distilled_patch16_224", {"img_size": 32, "depth": 1}),
    ("resnetv2_50", {"layers": [1, 1, 1, 1]}),
    ("convnext_atto", {"depths": (1, 1, 1, 1)}),
])
def test_head_role_agrees_with_timm_convention(name: str, kwargs: dict) -> None:
    """The structural head is what timm's pretrained_cfg calls the classifier (found without reading it)."""
    module = timm.create_model(name, **kwargs).eval()
    classifier = module.pretrained_cfg["classifier"]
    assert _head_paths(module) == ([classifier] if isinstance(classifier, str) else list(classifier))
    assert _head_paths(timm.create_model(name, num_classes=0, **kwargs).eval()) == []


@pytest.mark.parametrize("spec", ["lora", "fact"])
def test_headless_model_gets_a_linear_after_its_features(spec: str) -> None:
    """The new head needs shapes after the other rules ran: FacT's shared factors must come back from the meta
    device the shape propagation swaps them to (they stayed there: NaN outputs)."""
    backbone = _tiny_vit(num_classes=0)
    model = peftc.compile(spec, backbone, num_classes=10).eval()
    assert not any(p.is_meta for p in model.parameters())
    with torch.no_grad():
        assert model(X).shape == (2, 10)
        assert torch.equal(_features(model, "head", X), backbone(X))  # the new head reads the pooled features
    rule = next(r for r in model.report.rules if r.label == "head")  # the report shows the new head
    assert rule.added_params == 192 * 10 + 10
    model.add_task("b", num_classes=3)
    model.set_task("b")
    assert model(X).shape == (2, 3)


def test_headless_model_without_classes_says_so() -> None:
    with pytest.raises(SpecError, match=r"no classifier: its output is 192-dim pooled features.*num_classes"):
        peftc.compile("lora", _tiny_vit(num_classes=0))


class _ConvHead(nn.Module):
    """A CNN classifying with a 1×1 conv on the pooled map (timm's resnetv2, SqueezeNet)."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1))
        self.fc = nn.Conv2d(8, 5, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.body(x)).flatten(1)


def test_conv_head_is_replaced_by_a_conv() -> None:
    backbone = _ConvHead().eval()
    same = peftc.compile("linear_probe", backbone, init="backbone")
    assert same.net.fc is not backbone.fc and torch.equal(same(X), backbone(X))
    model = peftc.compile("linear_probe", backbone, num_classes=3)
    assert isinstance(model.net.fc, nn.Conv2d) and model(X).shape == (2, 3)


def test_mlp_classifier_keeps_its_bias_convention() -> None:
    """maxvit's classifier ends in a Linear without bias: the kept head is exact, a new one has no bias either."""
    backbone = nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, 16), nn.Tanh(), nn.Linear(16, 4, bias=False))
    for spec in ("bitfit", "lora"):
        assert torch.equal(peftc.compile(spec, backbone)(X), backbone(X))
    assert peftc.compile("linear_probe", backbone, num_classes=7).net.get_submodule("3").bias is None


def test_distilled_double_head_both_replaced() -> None:
    torch.manual_seed(0)
    backbone = timm.create_model("deit_tiny_distilled_patch16_224", img_size=32, depth=1).eval()
    model = peftc.compile("linear_probe", backbone, num_classes=6)
    assert model.net.head.out_features == model.net.head_dist.out_features == 6
    assert model(X).shape == (2, 6)
