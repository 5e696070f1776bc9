"""BitFit and linear probing: what trains, on ViTs of both libraries and on CNNs, and against HF PEFT."""

from __future__ import annotations

import importlib.util

import pytest
import torch

import peftc

from .cached import module as cached
from .conftest import synthetic_task, train_steps

HAS_PEFT = importlib.util.find_spec("peft") is not None


def _bias_count(backbone: str) -> tuple[int, int]:
    """(every parameter named bias, the head's weight) of the plain backbone."""
    module = cached(backbone)
    biases = sum(p.numel() for n, p in module.named_parameters() if n.endswith("bias"))
    return biases, module.get_submodule("head").weight.numel()


def test_bitfit_trains_every_bias_and_the_head() -> None:
    backbone = "timm:vit_tiny_patch16_224"
    model = peftc.compile("bitfit", cached(backbone))
    biases, head_weight = _bias_count(backbone)
    assert model.report.trainable_params == biases + head_weight
    assert model.report.added_params == 0
    names = [n for n, _ in model.named_trainable_parameters()]
    assert all(n.endswith("bias") or n.startswith("head.") for n in names)
    assert model.report.task_state_without_head == biases - 1000  # per task: every bias outside the head


def test_bitfit_same_count_on_both_libraries() -> None:
    tv_module = cached("vit_b_16")  # built once; compile works on private copies
    tm_module = cached("timm:vit_base_patch16_224")
    tv = peftc.compile("bitfit", tv_module, num_classes=10)
    tm = peftc.compile("bitfit", tm_module, num_classes=10)
    per_block = 3 * 768 + 768 + 3072 + 768 + 2 * 768  # qkv, proj, fc1, fc2 biases + LN betas
    body = 12 * per_block + 768 + 768  # + final LN beta + patch-embedding bias
    assert tv.report.trainable_params == tm.report.trainable_params == body + 768 * 10 + 10
    # torchvision's in_proj_bias trains as the canonical attention's qkv.bias
    names = {n for n, _ in tv.named_trainable_parameters()}
    assert "encoder.layers.encoder_layer_0.self_attention.qkv.bias" in names
    for module in (tv_module, tm_module):  # the linear probe on the same two backbones
        assert peftc.compile("linear_probe", module, num_classes=10).report.trainable_params == 768 * 10 + 10


@pytest.mark.skipif(not HAS_PEFT, reason="HF PEFT is not installed")
def test_bitfit_matches_peft_bias_all() -> None:
    import peft
    import timm

    vit = timm.create_model("vit_tiny_patch16_224")
    config = peft.LoraConfig(r=1, target_modules=["qkv"], bias="all")
    theirs, _ = peft.get_peft_model(vit, config).get_nb_trainable_parameters()
    lora = 12 * 1 * (192 + 576)  # PEFT needs an adapter; bias="all" then trains every bias of the model
    ours = peftc.compile("bitfit", cached("timm:vit_tiny_patch16_224")).report.trainable_params
    assert ours - 192 * 1000 == theirs - lora  # equal bias sets; peftc also trains the head weight


def test_bitfit_on_a_cnn_trains_batchnorm_beta() -> None:
    model = peftc.compile("bitfit", cached("resnet18"), num_classes=3)
    assert model.report.trainable_params == 4_800 + 3 * 512 + 3  # BN betas + the new head
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    stats = {n: b.clone() for n, b in model.named_buffers()}
    images, labels = synthetic_task(classes=3, n=12, size=32)
    losses = train_steps(model, images, labels, steps=5)
    assert losses[-1] < losses[0]
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if n in frozen)
    assert all(torch.equal(b, stats[n]) for n, b in model.named_buffers())


@pytest.mark.parametrize(("backbone", "head"), [("timm:vit_tiny_patch16_224", 192 * 5 + 5),
                                                ("timm:deit_small_patch16_224", 384 * 5 + 5),
                                                ("timm:deit_tiny_distilled_patch16_224", 2 * (192 * 5 + 5))])
def test_linear_probe_trains_only_the_head(backbone: str, head: int) -> None:
    module = cached(backbone)
    model = peftc.compile("linear_probe", module, num_classes=5)
    assert model.report.trainable_params == head
    assert peftc.compile("bitfit", module, num_classes=5).report.trainable_params > head


def test_linear_probe_trains_and_keeps_the_backbone() -> None:
    model = peftc.compile("linear_probe", cached("timm:vit_tiny_patch16_224", 32), num_classes=3)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    images, labels = synthetic_task(classes=3, n=12, size=32)
    losses = train_steps(model, images, labels, steps=5)
    assert losses[-1] < losses[0]
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if n in frozen)


def test_linear_probe_backbone_head_is_identity() -> None:
    model = peftc.compile("linear_probe", cached("resnet18"), init="backbone")
    reference = cached("resnet18")
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(model(x), reference(x))
