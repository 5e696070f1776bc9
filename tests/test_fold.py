"""Folding: exact merges (outputs equal within 1e-5), exact parameter counts, and the block protocol.

The bypass and ``folded()`` protocols are exercised with blocks defined here (registered under test-only
names), so these tests do not depend on any particular method's block.
"""

from __future__ import annotations

import operator

import pytest
import torch
import torch.nn.functional as F
from torch import fx, nn

import peftc
from peftc.blocks import BlockArgs, Site, register_block
from peftc.errors import TaskError
from peftc.export.fold import fold, fold_graph
from peftc.methods.clr.channel_conv import ChannelConv
from peftc.runtime.model import Compiled

from .conftest import synthetic_task, train_steps

RESNET18 = 11_689_512
RESNET18_BN_CHANNELS = 4_800  # 20 BatchNorm2d layers
CLR_RESNET18 = 35_136


def assert_close(a: torch.Tensor, b: torch.Tensor, tol: float = 1e-5) -> None:
    scale = max(1.0, b.abs().max().item())
    diff = (a - b).abs().max().item()
    assert diff <= tol * scale, f"max abs diff {diff:.3g} at output scale {scale:.3g}"


# -- test-local blocks ---------------------------------------------------------------------------------------
class LowRankArgs(BlockArgs):
    rank: int = 2


class LowRank(nn.Module):
    """A LoRA-like bypass on a Linear or Conv2d: up(down(x)); linear in x, so it folds."""

    def __init__(self, layer: nn.Module, rank: int):
        super().__init__()
        if isinstance(layer, nn.Conv2d):
            self.down: nn.Module = nn.Conv2d(layer.in_channels, rank, layer.kernel_size, layer.stride,
                                             layer.padding, bias=False)
            self.up: nn.Module = nn.Conv2d(rank, layer.out_channels, 1, bias=True)
        else:
            self.down = nn.Linear(layer.in_features, rank, bias=False)
            self.up = nn.Linear(rank, layer.out_features, bias=True)
        nn.init.normal_(self.up.weight, std=0.1)
        nn.init.normal_(self.up.bias, std=0.1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(self.down(x))

    def delta_weight(self, base: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
        dw = self.up.weight.flatten(1) @ self.down.weight.flatten(1)
        return dw.view_as(base.weight), self.up.bias


class ReluBypass(nn.Module):
    """A non-linear bypass (AdaptFormer-like): no delta_weight, so it must stay."""

    def __init__(self, features: int):
        super().__init__()
        self.lin = nn.Linear(features, features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.lin(x))


class Rescale(nn.Module):
    """A replace block: the original Linear times a per-output scale; folds itself into a plain Linear."""

    def __init__(self, base: nn.Linear, declines: bool = False):
        super().__init__()
        self.base = base
        self.scale = nn.Parameter(1.0 + 0.1 * torch.randn(base.out_features))
        self.declines = declines

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) * self.scale

    def folded(self) -> nn.Module | None:
        if self.declines:
            return None
        out = nn.Linear(self.base.in_features, self.base.out_features)
        out.weight.copy_(self.base.weight * self.scale[:, None])
        out.bias.copy_(self.base.bias * self.scale)
        return out


class RescaleArgs(BlockArgs):
    declines: bool = False


@register_block("test_lowrank", args=LowRankArgs, suffix="lowrank")
def _lowrank(site: Site, args: LowRankArgs) -> nn.Module:
    """Test-only low-rank bypass."""
    return LowRank(site.module, args.rank)


@register_block("test_relu_bypass", suffix="relu_bypass")
def _relu_bypass(site: Site, args: BlockArgs) -> nn.Module:
    """Test-only non-linear bypass."""
    return ReluBypass(site.channels("input"))


@register_block("test_rescale", args=RescaleArgs, suffix="rescale")
def _rescale(site: Site, args: RescaleArgs) -> nn.Module:
    """Test-only replace block."""
    assert isinstance(site.module, nn.Linear)
    return Rescale(site.module, args.declines)


class Tiny(nn.Module):
    """A small CNN + MLP with non-trivial BatchNorm statistics."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 16, 3, stride=2, padding=1)
        self.bn2 = nn.BatchNorm2d(16)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc1 = nn.Linear(16, 32)
        self.fc2 = nn.Linear(32, 32)
        self.fc = nn.Linear(32, 5)
        gen = torch.Generator().manual_seed(1)
        for bn in (self.bn1, self.bn2):
            bn.running_mean.copy_(torch.randn(bn.num_features, generator=gen))
            bn.running_var.copy_(torch.rand(bn.num_features, generator=gen) + 0.5)
            bn.weight.data.copy_(torch.randn(bn.num_features, generator=gen))
            bn.bias.data.copy_(torch.randn(bn.num_features, generator=gen))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.relu(self.bn2(self.conv2(x)))
        x = torch.flatten(self.pool(x), 1)
        return self.fc(self.fc2(F.relu(self.fc1(x))))


def tiny_spec(*rules: dict) -> dict:
    return {"peftc": 1, "name": "fold_test", "rules": [{"freeze": {}}, *rules]}


def plain_tiny_params() -> int:
    """Tiny with its BatchNorms folded: conv1 gains a bias, BN parameters leave."""
    tiny = Tiny()
    return sum(p.numel() for p in tiny.parameters()) - 2 * (8 + 16) + 8


# -- CLR + BatchNorm -----------------------------------------------------------------------------------------
def test_clr_untrained_folds_to_the_plain_backbone() -> None:
    model = peftc.compile("clr", "resnet18")
    result = fold(model)
    r = result.report
    # identity-initialised CLR kernels are per-channel scales: merged into their conv, then every BN folds
    assert r.counts() == {"plain": 17, "scale": 17, "batchnorm": 20}
    assert r.params_before == RESNET18 + CLR_RESNET18
    assert r.params_after == RESNET18 - 2 * RESNET18_BN_CHANNELS + RESNET18_BN_CHANNELS == 11_684_712
    assert r.remaining == {}
    kinds = {type(m) for m in result.module.modules()}
    assert ChannelConv not in kinds and nn.BatchNorm2d not in kinds
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert_close(result.module(x), model(x))


def test_clr_trained_folds_bn_into_clr_per_task_and_keeps_model_intact() -> None:
    model = peftc.compile("clr", "resnet18", num_classes=3)
    model.add_task("b", num_classes=4)
    train_steps(model, *synthetic_task(size=64, n=8), steps=1)  # 64x64: every CLR tap gets a gradient
    model.set_task("b")
    train_steps(model, *synthetic_task(classes=4, size=64, n=8, seed=1), steps=1)
    model.set_task("default")
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        before = model(x)
    result = fold(model)
    r = result.report
    assert r.task == "default" and r.counts() == {"plain": 17, "batchnorm": 20}
    head = 512 * 3 + 3
    # backbone body + CLR kernels + one bias per BN channel (on the CLR conv or the downsample conv)
    assert r.params_after == RESNET18 - 513_000 + head - 2 * RESNET18_BN_CHANNELS + CLR_RESNET18 \
        + RESNET18_BN_CHANNELS == 11_208_387
    assert r.params_after == sum(p.numel() for p in result.module.parameters())
    assert not any(p.requires_grad for p in result.module.parameters())
    with torch.no_grad():
        assert_close(result.module(x), before)
        assert torch.equal(model(x), before)  # the compiled model is untouched
    assert sum(isinstance(m, ChannelConv) for m in model.modules()) == 17

    folded_b = fold(model, task="b")
    assert folded_b.report.task == "b" and model.active_task == "default"
    model.set_task("b")
    with torch.no_grad():
        assert folded_b.module(x).shape == (2, 4)
        assert_close(folded_b.module(x), model(x))
    with pytest.raises(TaskError, match="unknown task 'c'"):
        fold(model, task="c")


# -- the block protocol --------------------------------------------------------------------------------------
def test_bypass_protocol_on_conv_and_linear_with_scale() -> None:
    spec = tiny_spec(
        {"parallel": {"to": {"type": ["Conv2d", "Linear"], "exclude": {"role": "head"}},
                      "block": "test_lowrank", "scale": 0.5}},
        {"label": "bitfit", "train": {"type": "Linear", "params": "bias"}},
    )
    model = peftc.compile(spec, Tiny())
    images = torch.randn(8, 3, 16, 16)
    train_steps(model, images, torch.arange(8) % 5, steps=2)
    result = fold(model)
    assert result.report.counts() == {"bypass": 4, "batchnorm": 2}
    assert result.report.remaining == {}
    assert result.report.params_after == plain_tiny_params()
    assert not any(isinstance(m, LowRank) for m in result.module.modules())
    assert not any(n.target in (operator.add, operator.mul) for n in result.module.graph.nodes)
    x = torch.randn(3, 3, 16, 16)
    with torch.no_grad():
        assert_close(result.module(x), model(x))


def perturb(model: Compiled, std: float = 0.05) -> None:
    """Move every trainable tensor off its init (as training would), so no fold is trivially exact."""
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.trainable_parameters():
            p.add_(std * torch.randn(p.shape, generator=gen))


VIT_TINY = 5_717_416  # timm vit_tiny_patch16_224 with its 1000-class head


def test_non_linear_and_declining_blocks_stay_and_are_reported() -> None:
    spec = tiny_spec(
        {"label": "adapter", "parallel": {"to": {"name": "fc2"}, "block": "test_relu_bypass", "scale": 0.1}},
        {"label": "rescale", "replace": {"target": {"name": "fc1"}, "block": "test_rescale"}},
        {"label": "kept", "replace": {"target": {"name": "fc"}, "block": "test_rescale",
                                      "args": {"declines": True}}},
    )
    model = peftc.compile(spec, Tiny())
    result = fold(model)
    r = result.report
    assert r.counts() == {"folded": 1, "batchnorm": 2}
    assert set(r.remaining) == {"fc2.relu_bypass", "fc"}
    assert "delta_weight" in r.remaining["fc2.relu_bypass"] and "declined" in r.remaining["fc"]
    assert type(result.module.get_submodule("fc1")) is nn.Linear
    x = torch.randn(3, 3, 16, 16)
    with torch.no_grad():
        assert_close(result.module(x), model(x))


def test_batchnorm_is_not_folded_when_the_conv_output_has_other_readers() -> None:
    class Branchy(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3, padding=1)
            self.bn = nn.BatchNorm2d(4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = self.conv(x)
            return self.bn(y) + y

    gm = fx.symbolic_trace(Branchy().eval())
    report = fold_graph(gm)
    assert report.counts() == {} and report.params_after == report.params_before
    assert isinstance(gm.get_submodule("bn"), nn.BatchNorm2d)
