"""AdaptFormer (full precision and binary): placement, identity at init, packed size, exact reload, training."""

from __future__ import annotations

import json

import torch
from safetensors.torch import load_file

import peftc
from peftc.methods.adaptformer.adapter import Adapter
from peftc.methods.adaptformer.quant import QuantLinear
from peftc.runtime.model import Compiled

from .cached import image, small_vit, vit_b_skeleton
from .conftest import synthetic_task, train_steps


def test_one_bit_dim32_on_vit_b_packs_to_73920_bytes_plus_head(tmp_path) -> None:
    model = peftc.compile("adaptformer", vit_b_skeleton(), bits=1)
    r = model.report
    adapters = [m for m in model.modules() if isinstance(m, Adapter)]
    assert len(adapters) == 12 and all(a.dim == 32 and a.bits == 1 for a in adapters)
    assert r.added_params == 12 * 2 * 768 * 32
    head = 768 * 1000 + 1000
    assert r.delta_head_bytes == 4 * head
    assert r.delta_bytes - r.delta_head_bytes == 73_920 == 12 * 2 * (3_072 + 8)
    assert r.to_dict()["delta_bytes_without_head"] == 73_920
    # what the artifact really stores
    model.save(tmp_path / "a")
    tensors = load_file(str(tmp_path / "a" / "delta.safetensors"))
    packed = {k: v for k, v in tensors.items() if k.endswith((":codes", ":stats"))}
    assert len(packed) == 48 and all(":codes" in k or v.dtype == torch.float32 for k, v in packed.items())
    assert sum(v.numel() * v.element_size() for v in packed.values()) == 73_920
    manifest = json.loads((tmp_path / "a" / "peftc.json").read_text())
    quantized = manifest["delta"]["quantized"]
    assert len(quantized) == 24
    assert sorted({(q["bits"], tuple(q["shape"])) for q in quantized.values()}) == [(1, (32, 768)), (1, (768, 32))]


def test_reads_the_residual_stream_and_adds_to_the_mlp_output() -> None:
    """x = x + attn(LN1 x); x = x + mlp(LN2 x) + s * adapter(x), recomputed by hand from the timm blocks."""
    bb = small_vit()
    model = peftc.compile("adaptformer", bb.module, scale=0.5, bits=2)
    adapters = [m for m in model.modules() if isinstance(m, Adapter)]
    with torch.no_grad():
        for a in adapters:
            a.up.weight.normal_(0, 0.02)
    ref = bb.module.eval()
    x_img = image(64, 2)
    with torch.no_grad():
        x = ref.norm_pre(ref._pos_embed(ref.patch_embed(x_img)))
        for blk, adapter in zip(ref.blocks, adapters, strict=True):
            x = x + blk.ls1(blk.attn(blk.norm1(x)))
            x = x + blk.ls2(blk.mlp(blk.norm2(x))) + 0.5 * adapter(x)
        expected = ref.forward_head(ref.norm(x))
        assert torch.allclose(model(x_img), expected, atol=1e-5)


def test_full_precision_training_lowers_the_loss_and_keeps_frozen_tensors() -> None:
    model = peftc.compile("adaptformer", small_vit().module, num_classes=3)
    r = model.report
    assert r.delta_bytes - r.delta_head_bytes == 12 * 2 * 192 * 32 * 4  # float32 adapters
    _train_and_check(model)


def test_one_bit_training_then_artifact_reloads_exactly(tmp_path) -> None:
    bb = small_vit()
    model = peftc.compile("adaptformer", bb.module, bits=1, num_classes=3)
    ups = [m.up for m in model.modules() if isinstance(m, Adapter)]
    assert all(isinstance(u, QuantLinear) and 0 < u.weight.abs().max() <= 2e-3 for u in ups)  # near, not at
    _train_and_check(model)
    x = image(64, 2)
    with torch.no_grad():
        before = model(x)
    model.save(tmp_path / "bin")
    again = peftc.load(tmp_path / "bin", backbone=bb.module)
    with torch.no_grad():
        assert torch.equal(again(x), before)
    # saving the reloaded model stores the same codes and stats: a round trip loses nothing
    again.save(tmp_path / "bin2")
    first = load_file(str(tmp_path / "bin" / "delta.safetensors"))
    second = load_file(str(tmp_path / "bin2" / "delta.safetensors"))
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)


def _train_and_check(model: Compiled) -> None:
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".adapter." in n or "head" in n for n in trainable)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    images, labels = synthetic_task(n=6, size=64)
    ups = [m.up.weight.detach().clone() for m in model.modules() if isinstance(m, Adapter)]
    losses = train_steps(model, images, labels, steps=4)
    assert losses[-1] < losses[0]
    after = [m.up.weight for m in model.modules() if isinstance(m, Adapter)]
    assert all(not torch.equal(a, b) for a, b in zip(ups, after, strict=True))
    for name, p in model.named_parameters():
        if name in frozen:
            assert torch.equal(p, frozen[name]), name
