"""VeRA (arXiv 2310.11454) — the block contract's worked example: shared frozen projections, per-task vectors.

Identity at init, save/load, task isolation and fold ≈ eager are the contract battery's (``vera@vit_tiny`` in
tests/contract_table.py); this file keeps the method's facts and its parity with HF PEFT."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

import peftc
from peftc.methods.vera.vera import Vera
from tests.cached import module as cached

HAS_PEFT = importlib.util.find_spec("peft") is not None
VIT = "timm:vit_tiny_patch16_224"  # dim 192, 12 blocks: qkv 192->576, fc1 192->768, fc2 768->192


@pytest.fixture(scope="module")
def model() -> peftc.runtime.model.Compiled:
    return peftc.compile("vera", cached(VIT), rank=16)


def _perturb(model: peftc.runtime.model.Compiled, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in model.named_trainable_parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.05)


def test_counts_are_r_plus_out_per_layer(model: peftc.runtime.model.Compiled) -> None:
    assert model.report.added_params == 12 * ((16 + 576) + (16 + 768) + (16 + 192)) == 19_008
    blocks = [m for m in model.net.modules() if isinstance(m, Vera)]
    assert len(blocks) == 36 and len({id(b.projections) for b in blocks}) == 1  # one pair for every layer
    assert blocks[0].projections.A.shape == (16, 768) and blocks[0].projections.B.shape == (768, 16)  # largest


def test_projections_are_stored_once_and_vectors_per_task(tmp_path: Path) -> None:
    model = peftc.compile("vera", cached(VIT), rank=8)
    model.add_task("b")
    model.set_task("b")
    _perturb(model, 3)
    model.save(tmp_path / "art")
    with safe_open(str(tmp_path / "art" / "delta.safetensors"), "pt") as f:
        keys = list(f.keys())
    projections = [k for k in keys if ".projections." in k]
    assert sorted(projections) == ["shared/blocks.0.attn.qkv.vera.projections.A",
                                   "shared/blocks.0.attn.qkv.vera.projections.B"]
    per_task = {k.split("/")[1] for k in keys if k.startswith("tasks/")}
    assert per_task == {"default", "b"}
    assert {k.rsplit(".", 1)[-1] for k in keys if k.startswith("tasks/b/") and ".vera." in k} == {"lambda_b",
                                                                                                  "lambda_d"}
    again = peftc.load(tmp_path / "art", backbone=cached(VIT))
    x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(2))
    again.set_task("b")
    with torch.no_grad():
        assert torch.equal(again(x), model(x))


@pytest.mark.skipif(not HAS_PEFT, reason="HF PEFT is not installed")
def test_equals_hf_peft_vera_count_projections_and_outputs() -> None:
    import peft
    import timm

    torch.manual_seed(0)
    vit = timm.create_model("vit_tiny_patch16_224").eval()
    ours = peftc.compile("vera", vit, rank=16, d_initial=0.1, seed=0)
    theirs = peft.get_peft_model(vit, peft.VeraConfig(r=16, target_modules=["qkv", "fc1", "fc2"], d_initial=0.1,
                                                      projection_prng_key=0)).eval()
    assert theirs.get_nb_trainable_parameters()[0] == ours.report.added_params == 19_008
    mine = next(m for m in ours.net.modules() if isinstance(m, Vera)).projections
    assert torch.equal(mine.A, theirs.base_model.vera_A["default"])  # the same random matrices, bit for bit
    assert torch.equal(mine.B, theirs.base_model.vera_B["default"])
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, layer in theirs.base_model.model.named_modules():
            if hasattr(layer, "vera_lambda_d") and "default" in layer.vera_lambda_d:
                block = ours.net.get_submodule(f"{name}.vera")
                for ours_p, theirs_p in ((block.lambda_d, layer.vera_lambda_d["default"]),
                                         (block.lambda_b, layer.vera_lambda_b["default"])):
                    value = torch.randn(ours_p.shape, generator=gen) * 0.1
                    ours_p.copy_(value)
                    theirs_p.copy_(value)
        x = torch.randn(2, 3, 224, 224, generator=gen)
        torch.testing.assert_close(ours(x), theirs(x), atol=1e-5, rtol=1e-5)
