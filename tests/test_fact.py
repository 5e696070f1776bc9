"""FacT-TT and FacT-TK: the METHODS card counts, U/V shared by all layers, the reference forward, folding."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import peftc
from peftc.methods.fact.fact import Fact, FactFactors

from .cached import image, small_vit, vit_b_skeleton
from .conftest import synthetic_task, train_steps


@pytest.mark.parametrize(
    ("variant", "rank", "added"),
    [("tt", 4, 8_448), ("tt", 8, 21_504), ("tt", 16, 61_440), ("tk", 16, 30_976), ("tk", 32, 86_528)],
)
def test_vit_b_counts(variant: str, rank: int, added: int) -> None:
    model = peftc.compile("fact", vit_b_skeleton(), variant=variant, rank=rank)
    r = model.report
    formula = 1536 * rank + (144 * rank**2 if variant == "tt" else 144 * rank + rank**3)
    assert r.added_params == added == formula
    assert r.trainable_params == added + 768 * 1000 + 1000
    assert sum(x.added_params for x in r.rules if x.label.startswith("fact_")) == added
    facts = [m for m in model.modules() if isinstance(m, Fact)]
    assert len(facts) == 48 and len({id(f.factors) for f in facts}) == 1


def _reference_tt(f: FactFactors, cores: dict[str, nn.Linear], part: str, x: torch.Tensor) -> torch.Tensor:
    """FacT/fact_tt.py's bypasses (dropout off), written out for one block."""
    U, V, r, d = f.U, f.V, f.rank, f.features
    if part == "qkv":
        return torch.cat([V(cores[k](U(x))) for k in "qkv"], dim=-1)
    if part == "proj":
        return V(cores["o"](U(x)))
    if part == "fc1":
        return V(cores["fc1"](U(x)).reshape(*x.shape[:-1], 4, r)).reshape(*x.shape[:-1], 4 * d)
    return V(cores["fc2"](U(x.reshape(*x.shape[:-1], 4, d)).reshape(*x.shape[:-1], 4 * r)))


def _reference_tk(f: FactFactors, idx: int, part: str, x: torch.Tensor) -> torch.Tensor:
    """FacT/fact_tk.py's bypasses (dropout off), written out for the block whose P columns start at ``idx``."""
    U, V, r, d = f.U, f.V, f.rank, f.features
    lead = x.shape[:-1]
    if part in ("qkv", "proj"):
        c = f.C @ f.P[:, idx:idx + 4]
        cores = [c[:, :, i] for i in range(4)]
        if part == "qkv":
            return torch.cat([V(U(x) @ cores[i]) for i in range(3)], dim=-1)
        return V(U(x) @ cores[3])
    c = f.C @ f.P[:, idx + 4:idx + 12]
    fc1, fc2 = c[:, :, :4].reshape(r, 4 * r), c[:, :, 4:].reshape(r, 4 * r)
    if part == "fc1":
        return V((U(x) @ fc1).reshape(*lead, 4, r)).reshape(*lead, 4 * d)
    return V(U(x.reshape(*lead, 4, d)).reshape(*lead, 4 * r) @ fc2.t())


@pytest.mark.parametrize("variant", ["tt", "tk"])
def test_bypasses_match_the_reference_and_fold_exactly(variant: str) -> None:
    torch.manual_seed(4)
    d, r, layer = 16, 4, 1
    factors = FactFactors(d, r, variant, depth=3)
    with torch.no_grad():
        factors.V.weight.normal_()
    bases = {"qkv": nn.Linear(d, 3 * d), "proj": nn.Linear(d, d), "fc1": nn.Linear(d, 4 * d),
             "fc2": nn.Linear(4 * d, d)}
    blocks = {part: Fact(factors, part, layer=layer, dropout=0.1).eval() for part in bases}
    if variant == "tt":
        q, k, v = blocks["qkv"].cores
        cores = {"q": q, "k": k, "v": v, "o": blocks["proj"].cores[0], "fc1": blocks["fc1"].cores[0],
                 "fc2": blocks["fc2"].cores[0]}
    for part, base in bases.items():
        x = torch.randn(2, 5, base.in_features)
        with torch.no_grad():
            ours = blocks[part](x)
            if variant == "tt":
                ref = _reference_tt(factors, cores, part, x)
            else:
                ref = _reference_tk(factors, 12 * layer, part, x)
            assert torch.allclose(ours, ref, atol=1e-5), part
            d_weight, d_bias = blocks[part].delta_weight(base)
            assert d_bias is None and d_weight.shape == base.weight.shape
            assert torch.allclose(nn.functional.linear(x, d_weight), ours, atol=1e-5), part


def test_u_and_v_are_shared_trained_and_saved_once(tmp_path) -> None:
    bb = small_vit()
    model = peftc.compile("fact", bb.module, rank=4, scale=0.5, num_classes=3)
    facts = [m for m in model.modules() if isinstance(m, Fact)]
    factors = facts[0].factors
    assert all(f.factors is factors for f in facts) and len(facts) == 48
    shared = model.shared_state()
    assert sum(k.endswith((".U.weight", ".V.weight")) for k in shared) == 2
    assert model.report.added_params == 2 * 192 * 4 + 12 * 12 * 16 + (192 * 3 + 3)  # U, V, cores, new head

    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    images, labels = synthetic_task(n=6, size=64)
    losses = train_steps(model, images, labels, steps=4)
    assert losses[-1] < losses[0]
    assert factors.V.weight.abs().sum() > 0
    for name, p in model.named_parameters():
        if name in frozen:
            assert torch.equal(p, frozen[name]), name

    x = image(64, 2)
    with torch.no_grad():
        before = model(x)
    model.save(tmp_path / "fact")
    again = peftc.load(tmp_path / "fact", backbone=bb.module)
    with torch.no_grad():
        assert torch.equal(again(x), before)
    again_facts = [m for m in again.modules() if isinstance(m, Fact)]
    assert len({id(f.factors) for f in again_facts}) == 1


def test_folding_the_deltas_into_the_weights_gives_the_same_model() -> None:
    """W += s * delta_weight for every bypassed Linear reproduces the compiled model (eval, dropout off)."""
    bb = small_vit()
    model = peftc.compile("fact", bb.module, variant="tk", rank=4, scale=0.7)
    facts = [m for m in model.modules() if isinstance(m, Fact)]
    with torch.no_grad():
        facts[0].factors.V.weight.normal_(0, 0.02)
    folded = copy.deepcopy(bb.module).eval()
    layers = {"qkv": "attn.qkv", "proj": "attn.proj", "fc1": "mlp.fc1", "fc2": "mlp.fc2"}
    with torch.no_grad():
        for f in facts:
            base = folded.blocks[f.layer].get_submodule(layers[f.part])
            d_weight, _ = f.delta_weight(base)
            base.weight += 0.7 * d_weight
        x = image(64, 2)
        assert torch.allclose(model(x), folded(x), atol=1e-4)


def test_mismatched_groups_are_a_clear_error() -> None:
    spec = {
        "name": "two_facts",
        "rules": [
            {"freeze": {}},
            {"parallel": {"to": {"role": "qkv"}, "block": "fact", "args": {"part": "qkv", "rank": 4}}},
            {"parallel": {"to": {"role": "attn_proj"}, "block": "fact", "args": {"part": "proj", "rank": 8}}},
        ],
    }
    with pytest.raises(peftc.PeftcError, match="already has"):
        peftc.compile(spec, small_vit().module)
