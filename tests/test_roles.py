"""Structural roles on torchvision and timm ViTs; attention canonicalisation (MHA → qkv/proj Linears)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import peftc
from peftc.analysis.attention import SelfAttention
from peftc.analysis.canonical import canonicalize
from peftc.analysis.index import NodeIndex, block_positions
from peftc.analysis.roles import role_names
from peftc.analysis.select import select
from peftc.analysis.trace import trace
from peftc.language import Selector

from .cached import module as cached

NOOP = {"name": "noop", "rules": []}
PER_BLOCK = ["qkv", "attn_proj", "mlp_fc1", "mlp_fc2", "attn_norm", "mlp_norm", "attn_out", "mlp_out",
             "attn_residual", "mlp_residual"]

EXPECTED = {
    "vit_b_16": {
        "qkv": "encoder.layers.encoder_layer_{}.self_attention.qkv",
        "attn_proj": "encoder.layers.encoder_layer_{}.self_attention.proj",
        "mlp_fc1": "encoder.layers.encoder_layer_{}.mlp.0",
        "mlp_fc2": "encoder.layers.encoder_layer_{}.mlp.3",
        "attn_norm": "encoder.layers.encoder_layer_{}.ln_1",
        "mlp_norm": "encoder.layers.encoder_layer_{}.ln_2",
        "attn_out": "encoder.layers.encoder_layer_{}.dropout",
        "mlp_out": "encoder.layers.encoder_layer_{}.mlp.4",
        "attn_residual": "encoder.layers.encoder_layer_{}.add",
        "mlp_residual": "encoder.layers.encoder_layer_{}.add_1",
        "final_norm": "encoder.ln",
        "stem": "conv_proj",
        "head": "heads.head",
    },
    "timm:vit_tiny_patch16_224": {
        "qkv": "blocks.{}.attn.qkv",
        "attn_proj": "blocks.{}.attn.proj",
        "mlp_fc1": "blocks.{}.mlp.fc1",
        "mlp_fc2": "blocks.{}.mlp.fc2",
        "attn_norm": "blocks.{}.norm1",
        "mlp_norm": "blocks.{}.norm2",
        "attn_out": "blocks.{}.drop_path1",
        "mlp_out": "blocks.{}.drop_path2",
        "attn_residual": "blocks.{}.add",
        "mlp_residual": "blocks.{}.add_1",
        "final_norm": "norm",
        "stem": "patch_embed.proj",
        "head": "head",
    },
}


def _names(model: peftc.runtime.model.Compiled, role: str) -> list[str]:
    index = NodeIndex(model.net, block_positions(model.net))
    return [c.name for c in select(Selector(role=role, optional=True), index)]


@pytest.fixture(scope="module")
def compiled() -> dict[str, peftc.runtime.model.Compiled]:
    return {bb: peftc.compile(NOOP, cached(bb)) for bb in EXPECTED}


@pytest.mark.parametrize("backbone", list(EXPECTED))
def test_roles_resolve_structurally(compiled: dict, backbone: str) -> None:
    model = compiled[backbone]
    for role, pattern in EXPECTED[backbone].items():
        names = _names(model, role)
        if role in PER_BLOCK:
            assert names == [pattern.format(i) for i in range(12)], role
        else:
            assert names == [pattern], role


@pytest.mark.parametrize("backbone", list(EXPECTED))
def test_role_nodes_have_the_expected_shapes(compiled: dict, backbone: str) -> None:
    model = compiled[backbone]
    index = NodeIndex(model.net, block_positions(model.net))
    dim = 768 if backbone == "vit_b_16" else 192
    for role, (fin, fout) in {"qkv": (dim, 3 * dim), "attn_proj": (dim, dim), "mlp_fc1": (dim, 4 * dim),
                              "mlp_fc2": (4 * dim, dim)}.items():
        for cand in select(Selector(role=role), index):
            assert isinstance(cand.module, nn.Linear)
            assert (cand.module.in_features, cand.module.out_features) == (fin, fout), (role, cand.name)
    for role in ("attn_norm", "mlp_norm", "final_norm"):
        assert all(isinstance(c.module, nn.LayerNorm) for c in select(Selector(role=role), index))


def test_aliases_and_role_list() -> None:
    assert {*PER_BLOCK, "final_norm", "stem", "head", "proj", "fc1", "fc2"} <= set(role_names())
    model = peftc.compile(NOOP, cached("timm:vit_tiny_patch16_224"))
    assert _names(model, "proj") == _names(model, "attn_proj")
    assert _names(model, "fc1") == _names(model, "mlp_fc1")
    assert _names(model, "fc2") == _names(model, "mlp_fc2")


def test_distilled_deit_roles() -> None:
    model = peftc.compile(NOOP, cached("timm:deit_tiny_distilled_patch16_224"))
    assert len(_names(model, "qkv")) == 12
    assert _names(model, "final_norm") == ["norm"]
    assert _names(model, "head") == ["head", "head_dist"]


def test_cnn_plays_no_transformer_role() -> None:
    model = peftc.compile(NOOP, cached("resnet18"))
    for role in [*PER_BLOCK, "final_norm", "stem"]:
        assert _names(model, role) == [], role
    with pytest.raises(peftc.PeftcError, match="no node plays role 'qkv'"):
        peftc.compile({"name": "x", "rules": [{"train": {"role": "qkv"}}]}, cached("resnet18"))


def test_roles_look_through_peftc_bypasses() -> None:
    spec = {"name": "x", "rules": [
        {"freeze": {}},
        {"parallel": {"to": {"role": "qkv"}, "block": "lora", "args": {"rank": 2}}},
        {"parallel": {"to": {"role": "attn_out"}, "from": {"role": "attn_proj"}, "block": "lora",
                      "args": {"rank": 2}, "scale": 0.5}},
    ]}
    model = peftc.compile(spec, cached("timm:vit_tiny_patch16_224"))
    assert _names(model, "qkv") == [f"blocks.{i}.attn.qkv" for i in range(12)]
    assert _names(model, "attn_out") == [f"blocks.{i}.drop_path1" for i in range(12)]
    assert _names(model, "attn_residual") == [f"blocks.{i}.add" for i in range(12)]
    assert _names(model, "attn_proj") == [f"blocks.{i}.attn.proj" for i in range(12)]
    assert _names(model, "mlp_norm") == [f"blocks.{i}.norm2" for i in range(12)]


def test_unknown_role_is_a_spec_error() -> None:
    with pytest.raises(peftc.PeftcError, match=r"unknown role 'qvk'.*did you mean 'qkv'"):
        peftc.compile({"name": "x", "rules": [{"train": {"role": "qvk"}}]},
                      cached("timm:vit_tiny_patch16_224"))


# -- canonicalisation -----------------------------------------------------------------------------------


def test_vit_b_16_noop_compile_equals_original(compiled: dict) -> None:
    model = compiled["vit_b_16"]
    reference = cached("vit_b_16")
    assert not any(isinstance(m, nn.MultiheadAttention) for m in model.modules())
    qkv = [n for n, m in model.net.named_modules() if n.endswith("self_attention.qkv")]
    assert len(qkv) == 12 and all(isinstance(model.net.get_submodule(n), nn.Linear) for n in qkv)
    assert model.report.added_params == 0 and model.report.removed_params == 0
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        assert (model(x) - reference(x)).abs().max().item() <= 1e-5


def test_canonical_attention_is_traced_through_like_timm(compiled: dict) -> None:
    gm = compiled["vit_b_16"].net
    kinds = {type(gm.get_submodule(n.target)).__name__ for n in gm.graph.nodes if n.op == "call_module"}
    assert "SelfAttention" not in kinds and "MultiheadAttention" not in kinds
    sdpa = [n for n in gm.graph.nodes if n.target is torch.nn.functional.scaled_dot_product_attention]
    assert len(sdpa) == 12
    # q, k, v reach SDPA from the fused qkv Linear through reshape/permute/unbind, as in timm
    k = sdpa[0].args[1]
    assert k.op == "call_module" and k.target.endswith("self_attention.k_norm")


def test_canonicalize_shares_tensors() -> None:
    mha = nn.MultiheadAttention(32, 4, batch_first=True)
    holder = nn.Sequential(mha)
    ids = {id(p) for p in holder.parameters()}
    assert canonicalize(holder) == ["0"]
    assert isinstance(holder[0], SelfAttention)
    assert {id(p) for p in holder.parameters()} == ids
    assert holder[0].qkv.weight is mha.in_proj_weight and holder[0].proj.bias is mha.out_proj.bias


def test_canonicalize_leaves_what_it_cannot_reproduce() -> None:
    holder = nn.Sequential(nn.MultiheadAttention(32, 4),
                           nn.MultiheadAttention(32, 4, batch_first=True, kdim=16),
                           nn.MultiheadAttention(32, 4, batch_first=True, add_bias_kv=True))
    assert canonicalize(holder) == []


@pytest.mark.parametrize("call", ["self", "self_no_weights", "cross", "masks", "per_head_mask", "causal",
                                  "per_head_weights"])
def test_self_attention_matches_multihead(call: str) -> None:
    mha = nn.MultiheadAttention(32, 4, batch_first=True).eval()
    sa = SelfAttention.from_multihead(mha).eval()
    q, kv = torch.randn(2, 5, 32), torch.randn(2, 7, 32)
    pad = torch.zeros(2, 7, dtype=torch.bool)
    pad[0, -2:] = True
    args, kwargs = {
        "self": ((q, q, q), {}),
        "self_no_weights": ((q, q, q), {"need_weights": False}),
        "cross": ((q, kv, kv), {}),
        "masks": ((q, kv, kv), {"key_padding_mask": pad, "attn_mask": torch.randn(5, 7) > 1}),
        "per_head_mask": ((q, kv, kv), {"attn_mask": torch.randn(8, 5, 7), "need_weights": False}),
        "causal": ((q, q, q), {"is_causal": True,
                               "attn_mask": nn.Transformer.generate_square_subsequent_mask(5)}),
        "per_head_weights": ((q, q, q), {"average_attn_weights": False}),
    }[call]
    with torch.no_grad():
        out_a, w_a = mha(*args, **kwargs)
        out_b, w_b = sa(*args, **kwargs)
    assert (out_a - out_b).abs().max().item() <= 1e-5
    assert (w_a is None) == (w_b is None)
    if w_a is not None:
        assert (w_a - w_b).abs().max().item() <= 1e-5


def test_self_attention_layout_matches_timm() -> None:
    from timm.models.vision_transformer import Attention

    ours = SelfAttention(64, 4)
    theirs = Attention(64, 4, qkv_bias=True)
    for name in ("qkv", "proj", "q_norm", "k_norm", "attn_drop"):
        assert type(getattr(ours, name)) is type(getattr(theirs, name)), name
    assert (ours.num_heads, ours.head_dim, ours.scale) == (theirs.num_heads, theirs.head_dim, theirs.scale)
    theirs.load_state_dict(ours.state_dict(), strict=False)
    x = torch.randn(2, 9, 64)
    with torch.no_grad():
        assert (ours(x, x, x, need_weights=False)[0] - theirs(x)).abs().max().item() <= 1e-5


def test_trace_of_canonical_attention_names_qkv() -> None:
    class Wrap(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.attn = SelfAttention(32, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.attn(x, x, x, need_weights=False)[0]

    gm = trace(Wrap())
    modules = [n.target for n in gm.graph.nodes if n.op == "call_module"]
    assert modules == ["attn.qkv", "attn.q_norm", "attn.k_norm", "attn.proj"]
