"""CLR on CNNs end to end: the numbers of the METHODS card, identity at init, training, continual use."""

from __future__ import annotations

import pytest
import torch

import peftc
from peftc.analysis.backbones import build_backbone
from peftc.methods.clr.channel_conv import ChannelConv

from .conftest import synthetic_task, train_steps


def test_reduced_resnet50_counts() -> None:
    model = peftc.compile("clr", "resnet50")
    r = model.report
    blocks = [m for m in model.modules() if isinstance(m, ChannelConv)]
    assert len(blocks) == 17
    assert sum(b.channels for b in blocks) == 3840
    assert r.added_params == 34_560
    assert r.backbone_params == 25_557_032
    assert r.backbone_body_params == 23_508_032
    assert r.task_state_without_head == 140_800
    assert round(r.percent(r.task_state_without_head), 3) == 0.599
    assert round(100 * r.added_params / r.backbone_params, 4) == 0.1352
    by_rule = {x.label: x for x in r.rules}
    assert by_rule["batchnorm"].task_params == 53_120 and by_rule["batchnorm"].nodes == 53
    assert by_rule["clr"].task_params == 34_560
    # trainable = CLR + BN affine + the head (reused from the backbone, 1000 classes)
    assert r.trainable_params == 34_560 + 53_120 + 2_049_000


@pytest.mark.parametrize(("variant", "added"), [("full", 239_040), ("reduced_v2", 57_280)])
def test_variants_resnet50(variant: str, added: int) -> None:
    assert peftc.compile("clr", "resnet50", variant=variant).report.added_params == added


def test_reduced_resnet18() -> None:
    assert peftc.compile("clr", "resnet18").report.added_params == 35_136


def test_kernel_size_param() -> None:
    model = peftc.compile("clr", "resnet18", kernel_size=5)
    assert model.report.added_params == 35_136 // 9 * 25


def test_backbone_passed_in_is_not_modified() -> None:
    backbone = build_backbone("resnet18").module
    before = {k: v.clone() for k, v in backbone.state_dict().items()}
    flags = [p.requires_grad for p in backbone.parameters()]
    model = peftc.compile("clr", backbone, num_classes=3)
    images, labels = synthetic_task()
    train_steps(model, images, labels, steps=2)
    assert [p.requires_grad for p in backbone.parameters()] == flags
    assert all(torch.equal(before[k], v) for k, v in backbone.state_dict().items())
    assert not any(isinstance(m, ChannelConv) for m in backbone.modules())


def test_training_lowers_loss_and_keeps_frozen_tensors() -> None:
    model = peftc.compile("clr", "resnet18", num_classes=3)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    owned = (".clr.", ".bn", "downsample.1", "net.fc", "net.bn1")
    assert trainable and all(any(key in n for key in owned) for n in trainable)
    images, labels = synthetic_task()
    losses = train_steps(model, images, labels, steps=8)
    assert losses[-1] < losses[0]
    for name, p in model.named_parameters():
        if name in frozen:
            assert torch.equal(p, frozen[name]), name


def test_frozen_batchnorm_stats_do_not_drift_in_train_mode() -> None:
    spec = {"name": "probe", "rules": [{"freeze": {}}, {"head": {"classes": 3}}]}
    model = peftc.compile(spec, "resnet18")
    stats = {n: b.clone() for n, b in model.named_buffers()}
    images, labels = synthetic_task()
    train_steps(model, images, labels, steps=2)
    assert all(torch.equal(stats[n], b) for n, b in model.named_buffers())


def test_unknown_task_is_a_clear_error() -> None:
    model = peftc.compile("clr", "resnet18")
    with pytest.raises(peftc.PeftcError, match="unknown task 'nope'"):
        model.set_task("nope")
