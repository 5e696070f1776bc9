"""ToCom: the METHODS card's numbers, exactness, folding, self-distillation (resumable) and model arithmetic."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

import peftc
from peftc.analysis.backbones import build_backbone
from peftc.compose import attach
from peftc.errors import ArtifactError, PeftcError, SpecError
from peftc.methods.tocom.distill import distill, distillation_kl
from peftc.methods.tocom.tocom import ToCom, compensators, set_compression
from peftc.methods.tome.tome import get_r, set_r

DEIT = "timm:deit_tiny_patch16_224"


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def deit() -> torch.nn.Module:
    return build_backbone(DEIT).module


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return torch.randn(4, 3, 224, 224, generator=torch.Generator().manual_seed(2))


def randomise_plugins(model: torch.nn.Module, seed: int = 0) -> None:
    """Stand-in for training: non-zero up-projections."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for plugin in compensators(model):
            for p in plugin.parameters():
                p.copy_(torch.randn(p.shape, generator=gen) * 0.05)


# -- the card's numbers ------------------------------------------------------------------------------------
def test_vit_b_trainable_params() -> None:
    model = peftc.compile("tocom", "timm:vit_base_patch16_224")
    assert model.report.trainable_params == 1_179_648 == 12 * 2 * 2 * 768 * 32
    assert model.report.added_params == 1_179_648
    plugins = compensators(model)
    assert len(plugins) == 12 and all(p.dim == 32 and p.rank == 2 for p in plugins)
    assert {n.split(".attn.qkv.tocom.")[-1] for n, _ in model.named_trainable_parameters()} == {
        "q_down.weight", "q_up.weight", "v_down.weight", "v_up.weight"}


def test_delta_mask_card_values() -> None:
    plugin = ToCom(768, r_tgt=3, r_src=1)
    mask = plugin.delta_mask()
    expected = torch.zeros(32)
    expected[26:30] = 1.0
    assert torch.equal(mask, expected)
    plugin.set_r(r_tgt=1, r_src=3)
    assert torch.equal(plugin.delta_mask(), -expected)
    plugin.set_r(r_tgt=5, r_src=5)
    assert not plugin.delta_mask().any()
    assert torch.equal(ToCom(768).mask(16), torch.ones(32))
    with pytest.raises(PeftcError, match="0..16"):
        plugin.set_r(r_tgt=17)


# -- exactness ---------------------------------------------------------------------------------------------
def test_equal_to_base_at_init_and_when_r_tgt_equals_r_src(deit, images) -> None:
    tome = peftc.compile("tome", deit, r=8)
    model = peftc.compile("tocom", deit, r=8, r_src=2)
    assert [p.r_tgt for p in compensators(model)] == [8] * 12  # r_tgt follows each block's merge r
    x = images[:2]
    with torch.no_grad():
        assert torch.equal(model(x), tome(x))  # zero-initialised up-projections
        randomise_plugins(model)
        assert not torch.equal(model(x), tome(x))  # a trained plugin compensates 2 -> 8
        set_compression(model, r_tgt=8, r_src=8)
        assert torch.equal(model(x), tome(x))  # Δmask = 0: exactly the base
        set_compression(model, r_tgt=4, r_src=4)
        set_r(tome, 4)
        assert torch.equal(model(x), tome(x))
    assert get_r(model) == [4] * 12 and {(p.r_src, p.r_tgt) for p in compensators(model)} == {(4, 4)}


def test_delta_weight_is_the_q_and_v_rows_of_qkv(deit) -> None:
    model = peftc.compile("tocom", deit, r=6, r_src=1).eval()
    randomise_plugins(model, seed=3)
    plugin = compensators(model)[0]
    qkv = model.net.get_submodule("blocks.0.attn.qkv")
    dw, db = plugin.delta_weight(qkv)
    d = qkv.in_features
    assert db is None and dw.shape == qkv.weight.shape
    assert not dw[d:2 * d].any() and dw[:d].any() and dw[2 * d:].any()  # k untouched
    x = torch.randn(2, 5, d)
    with torch.no_grad():
        bypass = qkv(x) + 0.1 * plugin(x)
        merged = torch.nn.functional.linear(x, qkv.weight + 0.1 * dw, qkv.bias)
    assert torch.allclose(bypass, merged, atol=1e-6)


def test_r_beyond_the_slices_is_an_error(deit) -> None:
    with pytest.raises(SpecError, match="tocom models merge degrees 0..16"):
        peftc.compile("tocom", deit, r=20)
    model = peftc.compile("tocom", deit, r=2)
    with pytest.raises(PeftcError, match="0..16"):
        set_compression(model, r_tgt=[17] * 12)
    with pytest.raises(PeftcError, match="no ToCom plugins"):
        set_compression(peftc.compile("tome", deit, r=2), r_tgt=3)


def test_plugins_follow_the_merge_of_their_own_block(deit) -> None:
    late = {"peftc": 1, "name": "late", "rules": [
        {"freeze": {}},
        {"merge_tokens": {"r": 5, "target": {"role": "attn_residual", "blocks": "6:"}}},
        {"parallel": {"to": {"role": "qkv"}, "block": "tocom", "scale": 0.1}},
    ]}
    model = peftc.compile(late, deit)
    assert [p.r_tgt for p in compensators(model)] == [0] * 6 + [5] * 6
    set_compression(model, r_tgt=[1, 2, 3, 4, 5, 6], r_src=1)
    assert [p.r_tgt for p in compensators(model)] == [0] * 6 + [1, 2, 3, 4, 5, 6]
    assert {p.r_src for p in compensators(model)} == {1}


# -- self-distillation -------------------------------------------------------------------------------------
def test_distillation_lowers_the_kl(images) -> None:
    torch.manual_seed(0)
    backbone = build_backbone(DEIT, num_classes=10).module
    with torch.no_grad():
        backbone.head.weight.mul_(50)  # a random ViT's logits are nearly flat: make them peaked, like a trained one
    model = peftc.compile("tocom", backbone)
    pairs = [(a, b) for a in (0, 8, 16) for b in (0, 8, 16) if a != b]
    before = distillation_kl(model, images[:2], pairs)
    result = distill(model, images, steps=8, batch_size=2, lr=1e-3, progress=False)
    after = distillation_kl(model, images[:2], pairs)
    assert len(result.losses) == 8 and all(a != b for a, b in result.pairs)
    assert all(0 <= r <= 16 for pair in result.pairs for r in pair)
    assert after < 0.9 * before
    assert not model.training and {(p.r_src, p.r_tgt) for p in compensators(model)} == {(0, 0)}


def test_distillation_resumes_exactly(deit, images, tmp_path: Path) -> None:
    base = peftc.compile("tocom", deit)
    straight, interrupted = copy.deepcopy(base), copy.deepcopy(base)
    torch.manual_seed(5)
    distill(straight, images, steps=4, batch_size=2, lr=1e-3, seed=1, progress=False)

    def stop(step: int, loss: float) -> None:
        if step == 3:
            raise KeyboardInterrupt

    torch.manual_seed(5)
    ckpt = tmp_path / "ckpt"
    with pytest.raises(KeyboardInterrupt):
        distill(interrupted, images, steps=4, batch_size=2, lr=1e-3, seed=1, progress=False, checkpoint=ckpt,
                checkpoint_every=2, on_step=stop)
    assert json.loads((ckpt / "state.json").read_text())["step"] == 2
    assert sorted(p.name for p in ckpt.iterdir()) == ["optimizer.safetensors", "plugin.safetensors", "state.json"]
    torch.manual_seed(123)  # the checkpoint restores the RNG
    result = distill(interrupted, images, steps=4, batch_size=2, lr=1e-3, seed=1, progress=False, checkpoint=ckpt)
    assert result.resumed_from == 2 and result.step == 4 and len(result.losses) == 4
    ours, theirs = dict(interrupted.named_trainable_parameters()), dict(straight.named_trainable_parameters())
    assert ours.keys() == theirs.keys()
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)
    with pytest.raises(ArtifactError, match="another model's plugin"):
        distill(peftc.compile("tocom", deit, dim=16), images, steps=4, batch_size=2, checkpoint=ckpt,
                progress=False)
    with pytest.raises(ArtifactError, match="another backbone"):  # same architecture, other weights
        distill(peftc.compile("tocom", DEIT, seed=1), images, steps=4, batch_size=2, checkpoint=ckpt,
                progress=False)


# -- model arithmetic --------------------------------------------------------------------------------------
DOWNSTREAM = """\
peftc: 1
name: downstream
summary: a downstream fine-tune with ToMe at r=4 (norms of the MLPs and a 3-class head)
include: tome
params:
  r: 4
rules:
  - train: {role: mlp_norm}
  - head: {classes: 3}
"""


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory: pytest.TempPathFactory, images) -> tuple[Path, Path]:
    """A downstream model fine-tuned (stand-in: perturbed) with ToMe r=4, and a distilled plugin."""
    root = tmp_path_factory.mktemp("tocom")
    (root / "downstream.yaml").write_text(DOWNSTREAM)
    torch.manual_seed(0)
    down = peftc.compile(root / "downstream.yaml", DEIT)
    with torch.no_grad():
        for p in down.trainable_parameters():
            p.add_(torch.randn_like(p) * 0.1)
    down.save(root / "down")
    plugin = peftc.compile("tocom", DEIT)
    distill(plugin, images, steps=2, batch_size=2, lr=1e-3, progress=False)
    plugin.save(root / "plugin")
    return root / "down", root / "plugin"


def test_attach_changes_outputs_only_through_q_and_v(artifacts, images, tmp_path: Path) -> None:
    from peftc.export.fold import fold

    down_dir, plugin_dir = artifacts
    downstream, plugin = peftc.load(down_dir), peftc.load(plugin_dir)
    model = attach("tocom", down_dir, delta=plugin_dir, r_src=4)
    assert model.spec.name == "downstream+tocom"
    assert sum(r.op == "merge_tokens" for r in model.spec.rules) == 1  # the downstream's schedule is kept
    assert get_r(model) == [4] * 12 and {(p.r_src, p.r_tgt) for p in compensators(model)} == {(4, 4)}
    theirs = downstream.net.state_dict()
    ours = model.net.state_dict()
    assert all(torch.equal(ours[k], v) for k, v in theirs.items())  # the downstream delta, exactly
    assert all(torch.equal(ours[k], v) for k, v in plugin.shared_state().items())  # the distilled plugin
    x = images[:2]
    with torch.no_grad():
        assert torch.equal(model(x), downstream(x))  # r_tgt == r_src: the downstream model itself
        set_compression(model, r_tgt=8)
        set_r(downstream, 8)
        compensated = model(x)
        assert not torch.equal(compensated, downstream(x))
    # the only difference: q and v rows of each fused qkv weight (fold merges the plugin there)
    folded = fold(model).module
    plain = fold(downstream).module
    f_state, p_state = folded.state_dict(), plain.state_dict()
    assert f_state.keys() == p_state.keys()
    d = 192
    for key, value in p_state.items():
        if key.endswith("attn.qkv.weight"):
            assert torch.equal(f_state[key][d:2 * d], value[d:2 * d])  # k untouched
            assert not torch.equal(f_state[key][:d], value[:d]) and not torch.equal(f_state[key][2 * d:], value[2 * d:])
        else:
            assert torch.equal(f_state[key], value), key
    with torch.no_grad():
        assert torch.allclose(folded(x), compensated, atol=1e-5)
    # the combined model is an ordinary artifact: both deltas, self-contained
    model.save(tmp_path / "combined")
    again = peftc.load(tmp_path / "combined")
    set_compression(again, r_tgt=8)
    with torch.no_grad():
        assert torch.equal(again(x), compensated)


def test_attach_from_the_command_line(artifacts, tmp_path: Path) -> None:
    from peftc.cli import app

    down_dir, plugin_dir = artifacts
    out = tmp_path / "cli"
    result = CliRunner().invoke(app, ["compile", "tocom", "--backbone", DEIT, "--base", str(down_dir), "--delta",
                                      str(plugin_dir), "--set", "r_src=4", "-o", str(out), "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["spec"] == "downstream+tocom" and report["params"]["r_src"] == 4
    assert (out / "peftc.json").is_file()
    wrong = CliRunner().invoke(app, ["compile", "tocom", "--backbone", "timm:vit_tiny_patch16_224", "--base",
                                     str(down_dir)])
    assert wrong.exit_code == 1 and "attach to the same backbone" in wrong.output
    alone = CliRunner().invoke(app, ["compile", "tocom", "--backbone", DEIT, "--delta", str(plugin_dir)])
    assert alone.exit_code == 1 and "--delta needs --base" in alone.output
