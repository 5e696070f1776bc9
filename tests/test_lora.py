"""LoRA: one spec on torchvision/timm ViTs and CNNs, identity at init, PEFT's counts, folding, training."""

from __future__ import annotations

import importlib.util

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import peftc
from peftc.methods.lora.lora import LoraConv, LoraLinear

from .cached import module as cached
from .conftest import synthetic_task, train_steps

ALL = ["qkv", "proj", "fc1", "fc2"]
HAS_PEFT = importlib.util.find_spec("peft") is not None


def _linear_formula(dim: int, rank: int, targets: list[str], depth: int = 12) -> int:
    """HF PEFT's LoRA count for a ViT: r*(in + out) per adapted Linear."""
    shapes = {"qkv": (dim, 3 * dim), "proj": (dim, dim), "fc1": (dim, 4 * dim), "fc2": (4 * dim, dim)}
    return depth * sum(rank * (shapes[t][0] + shapes[t][1]) for t in targets)


def _conv_formula(module: nn.Module, rank: int) -> int:
    """HF PEFT's Conv2d LoRA count: A = r*in*kh*kw, B = out*r, for every ungrouped conv."""
    return sum(rank * (m.in_channels * m.kernel_size[0] * m.kernel_size[1] + m.out_channels)
               for m in module.modules() if isinstance(m, nn.Conv2d) and m.groups == 1)


@pytest.fixture(scope="module")
def vit_b_16() -> peftc.runtime.model.Compiled:
    return peftc.compile("lora", cached("vit_b_16"), targets=ALL)


def test_identity_at_init_torchvision_vit_b_16(vit_b_16: peftc.runtime.model.Compiled) -> None:
    reference = cached("vit_b_16")
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        assert (vit_b_16(x) - reference(x)).abs().max().item() <= 1e-5


def test_vit_base_counts_are_the_same_on_both_libraries(vit_b_16: peftc.runtime.model.Compiled) -> None:
    assert vit_b_16.report.added_params == _linear_formula(768, 8, ALL) == 1_179_648
    assert {r.label: r.nodes for r in vit_b_16.report.rules}["lora"] == 48
    timm_base = peftc.compile("lora", cached("timm:vit_base_patch16_224"), targets=ALL)
    assert timm_base.report.added_params == vit_b_16.report.added_params
    assert "lora_conv" not in {r.label for r in timm_base.report.rules}


def test_default_targets_qkv() -> None:
    model = peftc.compile("lora", cached("timm:vit_tiny_patch16_224"))
    assert model.report.added_params == _linear_formula(192, 8, ["qkv"])


@pytest.mark.parametrize(("backbone", "dim"), [("timm:vit_tiny_patch16_224", 192),
                                              ("timm:deit_small_patch16_224", 384),
                                              ("timm:deit_tiny_distilled_patch16_224", 192)])
def test_one_spec_on_every_vit(backbone: str, dim: int) -> None:
    model = peftc.compile("lora", cached(backbone), targets=["qkv", "fc2"], rank=2)
    assert model.report.added_params == _linear_formula(dim, 2, ["qkv", "fc2"])
    trainable = {n for n, p in model.named_trainable_parameters()}
    assert all(".lora." in n or n.startswith("head") for n in trainable)
    assert not any("patch_embed" in n for n in trainable)


def test_cnn_gets_conv_lora_with_peft_counts() -> None:
    model = peftc.compile("lora", cached("resnet18"), rank=4)
    reference = cached("resnet18")
    assert model.report.added_params == _conv_formula(reference, 4)
    blocks = [m for m in model.modules() if isinstance(m, LoraConv)]
    assert len(blocks) == 20  # 17 3x3 convs + the 7x7 stem ... + 3 downsample 1x1 convs
    stem = model.net.get_submodule("conv1.lora")
    assert stem.A.kernel_size == (7, 7) and stem.A.stride == (2, 2) and stem.A.padding == (3, 3)
    assert stem.B.kernel_size == (1, 1)


def test_grouped_convs_are_skipped_and_convs_switch() -> None:
    model = peftc.compile("lora", cached("mobilenet_v3_small"), rank=2)
    reference = cached("mobilenet_v3_small")
    assert model.report.added_params == _conv_formula(reference, 2)
    assert peftc.compile("lora", cached("resnet18"), convs=False).report.added_params == 0


@pytest.mark.skipif(not HAS_PEFT, reason="HF PEFT is not installed")
def test_counts_equal_hf_peft() -> None:
    import peft
    import timm
    import torchvision

    vit = timm.create_model("vit_tiny_patch16_224")
    config = peft.LoraConfig(r=8, lora_alpha=8, target_modules=r".*\.attn\.(qkv|proj)|.*\.mlp\.fc[12]")
    theirs, _ = peft.get_peft_model(vit, config).get_nb_trainable_parameters()
    ours = peftc.compile("lora", cached("timm:vit_tiny_patch16_224"), targets=ALL).report.added_params
    assert ours == theirs == 294_912

    def small_tv_vit() -> nn.Module:  # torchvision's ViT (nn.MultiheadAttention), two small layers
        torch.manual_seed(0)
        return torchvision.models.VisionTransformer(image_size=32, patch_size=16, num_layers=2, num_heads=2,
                                                    hidden_dim=64, mlp_dim=128).eval()

    config = peft.LoraConfig(r=4, lora_alpha=4, target_modules=["self_attention"])
    theirs, _ = peft.get_peft_model(small_tv_vit(), config).get_nb_trainable_parameters()
    ours = peftc.compile("lora", small_tv_vit(), targets=["qkv", "proj"], rank=4).report.added_params
    assert ours == theirs == 2 * 4 * (64 + 192 + 64 + 64)

    cnn = torchvision.models.resnet18()
    config = peft.LoraConfig(r=8, lora_alpha=8, target_modules=r".*conv\d|.*downsample\.0|conv1")
    theirs, _ = peft.get_peft_model(cnn, config).get_nb_trainable_parameters()
    assert peftc.compile("lora", cached("resnet18")).report.added_params == theirs


def test_training_lowers_loss_and_keeps_frozen_tensors() -> None:
    model = peftc.compile("lora", cached("timm:vit_tiny_patch16_224", 32), targets=ALL, rank=4, num_classes=3)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    images, labels = synthetic_task(classes=3, n=12, size=32)
    losses = train_steps(model, images, labels, steps=5, lr=3e-3)
    assert losses[-1] < losses[0]
    for name, p in model.named_parameters():
        if name in frozen:
            assert torch.equal(p, frozen[name]), name
    moved = model.net.get_submodule("blocks.0.attn.qkv.lora").B.weight
    assert moved.abs().sum() > 0


def test_lora_weights_are_the_task_state() -> None:
    """Each task owns exactly the LoRA weights (isolation, new-task init, artifacts: tests/test_contract.py)."""
    model = peftc.compile("lora", cached("timm:vit_tiny_patch16_224", 32), rank=2)
    assert model.report.task_state_without_head == model.report.added_params == _linear_formula(192, 2, ["qkv"])


def test_new_task_lora_is_made_again_not_snapshotted() -> None:
    """The model at rest holds no second copy of the LoRA weights: a new task's A comes from the block's seed
    (equal to the compile-time A, whatever was trained since) and B from zero; the head is still snapshotted."""
    model = peftc.compile("lora", cached("resnet18"), num_classes=3, rank=2)
    lora = {n: p.detach().clone() for n, p in model.net.named_parameters() if ".lora." in n}
    assert lora and not any(".lora." in n for n in model.bank._initial.tensors)
    assert set(model.bank._initial.modules) == set(model.bank.module_slots)
    with torch.no_grad():
        for p in model.trainable_parameters():
            p.add_(1.0)
    model.add_task("b").set_task("b")
    now = dict(model.net.named_parameters())
    assert all(torch.equal(now[n], v) for n, v in lora.items())
    assert all(not now[n].abs().sum() for n in lora if n.endswith("B.weight"))


def test_conv_lora_trains() -> None:
    model = peftc.compile("lora", cached("resnet18"), num_classes=3, rank=2)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    images, labels = synthetic_task(classes=3, n=12, size=32)
    losses = train_steps(model, images, labels, steps=6, lr=3e-3)  # Adam at 1e-2 overshoots here (either init)
    assert losses[-1] < losses[0]
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if n in frozen)


# -- blocks and the fold protocol ------------------------------------------------------------------------


def _randomise(block: nn.Module) -> None:
    with torch.no_grad():
        for p in block.parameters():
            p.normal_(0, 0.1)


def test_linear_delta_weight_equals_bypass() -> None:
    base = nn.Linear(16, 24)
    block = LoraLinear(16, 24, rank=3, alpha=6.0)
    assert torch.equal(block.B.weight, torch.zeros(24, 3))
    _randomise(block)
    dw, db = block.delta_weight(base)
    assert dw.shape == base.weight.shape and db is None
    x = torch.randn(5, 7, 16)
    with torch.no_grad():
        expected = base(x) + 0.5 * block(x)  # the rule's scale (0.5 here) is applied by the graph
        folded = F.linear(x, base.weight + 0.5 * dw, base.bias)
    assert (expected - folded).abs().max().item() <= 1e-5
    assert block.scaling == 2.0


@pytest.mark.parametrize(("kwargs", "shape"), [
    ({"kernel_size": 3, "padding": 1}, (2, 6, 9, 9)),
    ({"kernel_size": 7, "stride": 2, "padding": 3}, (2, 6, 17, 17)),
    ({"kernel_size": 3, "dilation": 2, "padding": 2, "bias": False}, (2, 6, 11, 11)),
    ({"kernel_size": 1}, (2, 6, 5, 5)),
])
def test_conv_delta_weight_equals_bypass(kwargs: dict, shape: tuple[int, ...]) -> None:
    base = nn.Conv2d(6, 10, **kwargs)
    block = LoraConv(base, rank=4, alpha=4.0)
    _randomise(block)
    dw, db = block.delta_weight(base)
    assert dw.shape == base.weight.shape and db is None
    x = torch.randn(*shape)
    with torch.no_grad():
        expected = base(x) + block(x)
        folded = F.conv2d(x, base.weight + dw, base.bias, base.stride, base.padding, base.dilation)
    assert (expected - folded).abs().max().item() <= 1e-5


def test_grouped_conv_declines_to_fold() -> None:
    base = nn.Conv2d(8, 8, 3, padding=1, groups=8)
    block = LoraConv(base, rank=2)
    assert block(torch.randn(1, 8, 5, 5)).shape == (1, 8, 5, 5)
    with pytest.raises(NotImplementedError):
        block.delta_weight(base)


def test_dropout_and_rank_params() -> None:
    model = peftc.compile("lora", cached("timm:vit_tiny_patch16_224"), rank=3, alpha=12.0, dropout=0.1)
    block = model.net.get_submodule("blocks.5.attn.qkv.lora")
    assert block.rank == 3 and block.scaling == 4.0 and isinstance(block.dropout, nn.Dropout)


def test_bad_targets_are_clear_errors() -> None:
    with pytest.raises(peftc.PeftcError, match="unknown role 'qkvv'"):
        peftc.compile("lora", cached("timm:vit_tiny_patch16_224"), targets=["qkvv"])
    with pytest.raises(peftc.PeftcError, match="LoRA bypasses a Linear or a convolution"):
        peftc.compile("lora", cached("timm:vit_tiny_patch16_224"), targets=["attn_norm"])
    assert peftc.compile("lora", cached("timm:vit_tiny_patch16_224"), targets=[]).report.added_params == 0
