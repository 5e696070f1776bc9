"""ConFiT: input means tracked per stride phase, per-task BN state, and old tasks' running means re-derived
through the current conv weights when they are switched back to."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import peftc
from peftc.analysis.backbones import build_backbone
from peftc.methods.confit.blocks import CrossConvBN, InputMean

from .conftest import synthetic_task, train_steps

SIZE = 16  # images: enough for resnet18's five stride-2 steps


@pytest.fixture(scope="module")
def resnet18() -> nn.Module:
    return build_backbone("resnet18").module


def _pairs(model: peftc.runtime.model.Compiled) -> dict[str, CrossConvBN]:
    return {n: m for n, m in model.net.named_modules() if isinstance(m, CrossConvBN)}


def test_structure_on_resnet18(resnet18: nn.Module) -> None:
    model = peftc.compile("confit", resnet18, num_classes=3)
    pairs = _pairs(model)
    trackers = {n: m for n, m in model.net.named_modules() if isinstance(m, InputMean)}
    assert len(pairs) == len(trackers) == 20  # every conv of resnet18 feeds a BN
    assert pairs["layer1.0.bn1"].conv is model.net.get_submodule("layer1.0.conv1")
    assert pairs["layer2.0.downsample.1"].tracker is trackers["layer2.0.downsample.0.input_mean"]
    strided = {n for n, t in trackers.items() if t.stride == (2, 2)}
    assert strided == {"conv1.input_mean", *(f"layer{i}.0.{c}.input_mean" for i in (2, 3, 4)
                                             for c in ("conv1", "downsample.0"))}
    assert trackers["conv1.input_mean"].input_mean.shape == (3, 2, 2)  # 4 phase means per channel
    assert trackers["layer1.0.conv2.input_mean"].input_mean.shape == (64, 1, 1)
    # the cross-conv BN is the backbone's BN: same tensors, nothing added but the new 3-class head
    r = model.report
    assert r.added_params == 512 * 3 + 3 and r.removed_params == 513_000
    rule = {x.label: x for x in r.rules}
    assert rule["cross_conv_bn"].added_params == 0 and rule["cross_conv_bn"].task_params == 9_600
    channels = sum(t.channels * t.stride[0] * t.stride[1] for t in trackers.values())
    assert rule["input_mean"].task_buffers == channels + 2 * 20  # means + input sizes


def test_input_mean_per_phase() -> None:
    tracker = InputMean(3, (2, 2), momentum=0.25).train()
    for h, w in ((6, 8), (5, 7), (1, 1)):  # divisible, ragged, and too small for three of the phases
        tracker.input_mean.zero_()
        x = torch.randn(2, 3, h, w)
        assert tracker(x) is x
        for p in range(2):
            for q in range(2):
                part = x[:, :, p::2, q::2]
                expected = 0.25 * part.mean(dim=(0, 2, 3)) if part.numel() else torch.zeros(3)
                torch.testing.assert_close(tracker.input_mean[:, p, q], expected)
        assert tracker.input_size.tolist() == [h, w]
    before = tracker.input_mean.clone()
    tracker.eval()(torch.randn(2, 3, 4, 4))
    assert torch.equal(tracker.input_mean, before)
    image = tracker.constant_map(5, 7)[0]
    assert image.shape == (3, 5, 7) and torch.equal(image[:, 3, 4], tracker.input_mean[:, 1, 0])


def _expected_mean(bn: CrossConvBN, stored: torch.Tensor) -> torch.Tensor:
    """Directly: spatial mean of conv(the stored phase means laid out as an image), current weights."""
    tracker, conv = bn.tracker, bn.conv
    h, w = (int(v) for v in tracker.input_size)
    sh, sw = tracker.stride
    image = torch.zeros(1, tracker.channels, h, w)
    for p in range(sh):
        for q in range(sw):
            image[0, :, p::sh, q::sw] = stored[:, p, q, None, None]
    out = F.conv2d(image, conv.weight, conv.bias, conv.stride, conv.padding, conv.dilation, conv.groups)
    return out.mean(dim=(0, 2, 3))


def _two_tasks(model: peftc.runtime.model.Compiled) -> dict[str, dict[str, dict[str, torch.Tensor]]]:
    """Train task 1 then task 2 (different data), everything trainable; returns each task's BN state."""
    model.schedule_at(1.0)
    state: dict[str, dict[str, dict[str, torch.Tensor]]] = {}
    for task, seed, shift in (("t1", 1, 0.0), ("t2", 2, 1.5)):
        model.add_task(task)
        model.set_task(task)
        images, labels = synthetic_task(n=6, size=SIZE, seed=seed)
        train_steps(model, images + shift, labels, steps=2, lr=1e-2)
        state[task] = {n: {"mean": bn.running_mean.clone(), "var": bn.running_var.clone(),
                           "weight": bn.weight.detach().clone(), "input": bn.tracker.input_mean.clone()}
                       for n, bn in _pairs(model).items()}
    return state


@pytest.fixture(scope="module")
def trained() -> tuple[peftc.runtime.model.Compiled, dict[str, dict[str, dict[str, torch.Tensor]]]]:
    """ConFiT on resnet18 after task 1 then task 2 (shared by the tests below: they only switch tasks)."""
    torch.manual_seed(0)
    model = peftc.compile("confit", "resnet18", num_classes=3)
    state = _two_tasks(model)
    assert not any(bn.stale for bn in _pairs(model).values())
    return model, state


def test_switching_back_recomputes_running_means(trained) -> None:
    model, state = trained
    model.set_task("t1")
    for name, bn in _pairs(model).items():
        old = state["t1"][name]
        assert torch.equal(bn.tracker.input_mean, old["input"])  # task 1's stored input means
        assert torch.equal(bn.weight, old["weight"]) and torch.equal(bn.running_var, old["var"])  # var kept
        expected = _expected_mean(bn, old["input"])
        assert torch.equal(bn.running_mean, expected), name
        assert not torch.equal(bn.running_mean, old["mean"])
    # the task trained last keeps its measured statistics
    model.set_task("t2")
    for name, bn in _pairs(model).items():
        assert torch.equal(bn.running_mean, state["t2"][name]["mean"])
        assert torch.equal(bn.tracker.input_mean, state["t2"][name]["input"])


def test_save_load_corrects_the_same_tasks(trained, tmp_path: Path) -> None:
    model, _ = trained
    model.set_task("t2")
    model.save(tmp_path / "confit")
    loaded = peftc.load(tmp_path / "confit")
    x = torch.randn(2, 3, SIZE, SIZE)
    with torch.no_grad():
        for task in ("t2", "t1", "t2"):
            assert torch.equal(loaded.set_task(task)(x), model.set_task(task)(x)), task


def test_fold_for_deployment(trained) -> None:
    from peftc.export import fold

    model, _ = trained
    x = torch.randn(2, 3, SIZE, SIZE)
    for task in ("t1", "t2"):
        folded = fold(model, task=task)  # the old task folds with its corrected statistics
        with torch.no_grad():
            torch.testing.assert_close(folded.module(x), model.set_task(task)(x), rtol=1e-5, atol=1e-5)
        assert not any(isinstance(m, (nn.BatchNorm2d, InputMean)) for m in folded.module.modules())


def test_cross_conv_bn_needs_its_tracker(resnet18: nn.Module) -> None:
    doc = {"name": "t", "rules": [{"replace": {"target": {"role": "bn_after_conv"}, "block": "cross_conv_bn"}}]}
    with pytest.raises(peftc.PeftcError, match="needs an input_mean block right before 'conv1'"):
        peftc.compile(doc, resnet18)


def test_batchnorm_with_a_fused_activation_is_refused() -> None:
    """timm's BatchNormAct2d is a BatchNorm2d subclass that also activates: replacing it would drop the
    activation (the model differed from the backbone at init by 8x its output scale)."""

    class BNAct(nn.BatchNorm2d):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.relu(super().forward(x))

    model = nn.Sequential(nn.Conv2d(3, 4, 3), BNAct(4), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2))
    with pytest.raises(peftc.PeftcError, match=r"'1' \(BNAct\) computes more than batch normalisation"):
        peftc.compile("confit", model.eval())
