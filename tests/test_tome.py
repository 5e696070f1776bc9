"""ToMe as a graph pass: the METHODS card's numbers, exactness at r=0, and an independent reference merge."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import peftc
from peftc.analysis.backbones import build_backbone
from peftc.errors import PeftcError, SpecError
from peftc.methods.tome.tome import TokenMerge, get_r, merge_schedule, set_prop_attn, set_r, token_merges

VIT = "timm:vit_tiny_patch16_224"


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def vit() -> torch.nn.Module:
    """One randomly initialised vit_tiny (197 tokens, 12 blocks); compile() works on copies of it."""
    return build_backbone(VIT).module


@pytest.fixture(scope="module")
def tome_vit(vit) -> peftc.runtime.model.Compiled:
    return peftc.compile("tome", vit, r=13)


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(1))


def record(model: torch.nn.Module) -> tuple[list, object]:
    """Hook every TokenMerge: a list of (x_in, size_in, x_out, size_out) per call."""
    calls: list = []
    hooks = [m.register_forward_hook(lambda mod, args, out: calls.append((args[0], args[1], out[0], out[1])))
             for m in token_merges(model)]

    class _Remove:
        def remove(self) -> None:
            for h in hooks:
                h.remove()

    return calls, _Remove()


# -- schedules ---------------------------------------------------------------------------------------------
def test_schedule_card_values() -> None:
    assert merge_schedule(12, 16, -1) == [32, 29, 26, 23, 20, 17, 14, 11, 8, 5, 2, 0]
    assert merge_schedule(12, 13) == [13] * 12
    assert merge_schedule(4, [3, 2]) == [3, 2, 0, 0]  # ToMe pads short lists with zeros
    with pytest.raises(PeftcError):
        merge_schedule(2, [1, 2, 3])
    with pytest.raises(PeftcError):
        merge_schedule(3, [1, 2], inflection=0.5)


def test_schedule_from_spec(vit) -> None:
    model = peftc.compile("tome", vit, r=16, inflection=-1.0)
    assert get_r(model) == [32, 29, 26, 23, 20, 17, 14, 11, 8, 5, 2, 0]


# -- token counts, protected tokens, sizes -----------------------------------------------------------------
@pytest.mark.parametrize(("r", "tokens"), [(16, 11), (13, 41), (8, 101)])
def test_token_counts_after_12_blocks(tome_vit, images, r: int, tokens: int) -> None:
    set_r(tome_vit, r)  # run time: no recompilation
    calls, hooks = record(tome_vit)
    with torch.no_grad():
        tome_vit(images[:1])
    hooks.remove()
    assert len(calls) == 12
    assert calls[0][0].shape[1] == 197
    assert calls[-1][2].shape[1] == tokens
    for x_in, size_in, x_out, size_out in calls:
        assert torch.equal(size_out.sum(dim=1), torch.full((1, 1), 197.0))  # sizes always sum to 197
        assert torch.equal(x_out[:, 0], x_in[:, 0]) and torch.equal(size_out[:, 0], size_in[:, 0])  # cls at 0
        assert size_out[0, 0, 0].item() == 1.0


def test_r_zero_is_the_backbone(vit, images) -> None:
    model = peftc.compile("tome", vit, r=0)
    with torch.no_grad():
        assert torch.equal(model(images), vit(images))
    assert model.report.trainable_params == 0 and model.report.added_params == 0


def test_distilled_deit_keeps_cls_and_distillation_tokens() -> None:
    model = peftc.compile("tome", "timm:deit_tiny_distilled_patch16_224", r=16)
    assert {m.protected for m in token_merges(model)} == {2}
    calls, hooks = record(model)
    with torch.no_grad():
        out = model(torch.randn(1, 3, 224, 224))
    hooks.remove()
    assert out.shape == (1, 1000)
    assert calls[0][0].shape[1] == 198 and calls[-1][2].shape[1] == 12  # 198 - 11*16 = 22, then capped at 10
    for x_in, _, x_out, size_out in calls:
        assert torch.equal(x_out[:, :2], x_in[:, :2])
        assert torch.equal(size_out[:, :2], torch.ones(1, 2, 1))
        assert size_out.sum().item() == 198


def test_torchvision_vit() -> None:
    """torchvision's VisionTransformer (vit_b_16's class, at vit_tiny width to stay cheap): MHA canonicalised."""
    from torchvision.models import VisionTransformer

    torch.manual_seed(0)
    tv = VisionTransformer(image_size=224, patch_size=16, num_layers=12, num_heads=3, hidden_dim=192, mlp_dim=768)
    model = peftc.compile("tome", tv, r=13)
    merges = token_merges(model)
    assert len(merges) == 12 and merges[0].protected == 1
    calls, hooks = record(model)
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        out = model(x)
        set_r(model, 0)
        assert torch.equal(model(x), tv.eval()(x))
    hooks.remove()
    assert out.shape == (1, 1000)
    assert calls[11][2].shape[1] == 41
    assert "encoder.layers.encoder_layer_0.tome" in dict(model.net.named_modules())


def test_graph_shows_one_merge_node_per_block(tome_vit, vit) -> None:
    names = [n.meta.get("peftc_name") for n in tome_vit.net.graph.nodes]
    assert [n for n in names if n and n.endswith(".tome")] == [f"blocks.{i}.tome" for i in range(12)]
    sdpa = [n for n in tome_vit.net.graph.nodes if n.target is F.scaled_dot_product_attention]
    # block 0 sees no bias (nothing merged yet); every later attention gets the size bias as its float mask
    assert sdpa[0].kwargs["attn_mask"] is None
    assert all(n.kwargs["attn_mask"].meta["peftc_name"].endswith(".tome_mask") for n in sdpa[1:])
    assert not any(isinstance(m, TokenMerge) for m in vit.modules())  # the backbone passed in is untouched


# -- an independent reference, written from the METHODS card -----------------------------------------------
def reference_merge(x: torch.Tensor, size: torch.Tensor, keys: torch.Tensor, r: int):
    """Card: metric = keys averaged over heads, L2-normalised; A even, B odd; cls (A[0]) never a source; the r
    A tokens with the highest best-score merge into their best B (size-weighted); order = unmerged A
    ascending, then B."""
    out_x, out_s = [], []
    for b in range(x.shape[0]):
        metric = keys[b].mean(0)
        metric = metric / metric.norm(dim=-1, keepdim=True)
        n = x.shape[1]
        a_idx, b_idx = list(range(0, n, 2)), list(range(1, n, 2))
        scores = metric[a_idx] @ metric[b_idx].T
        best = {}
        for i, a in enumerate(a_idx[1:], start=1):
            best[a] = (scores[i].max().item(), b_idx[int(scores[i].argmax())])
        ranked = sorted(best, key=lambda a: (-best[a][0], a_idx.index(a)))
        merged = set(ranked[:r])
        total = {j: x[b, j] * size[b, j] for j in b_idx}
        weight = {j: size[b, j].clone() for j in b_idx}
        for a in merged:
            j = best[a][1]
            total[j] = total[j] + x[b, a] * size[b, a]
            weight[j] = weight[j] + size[b, a]
        keep = [a for a in a_idx if a not in merged]
        out_x.append(torch.stack([x[b, a] for a in keep] + [total[j] / weight[j] for j in b_idx]))
        out_s.append(torch.stack([size[b, a] for a in keep] + [weight[j] for j in b_idx]))
    return torch.stack(out_x), torch.stack(out_s)


def reference_forward(vit: torch.nn.Module, images: torch.Tensor, r: int, prop_attn: bool):
    """timm ViT forward with ToMe done by hand: attention computed explicitly with log-size logits."""
    x = vit.norm_pre(vit._pos_embed(vit.patch_embed(images)))
    size = torch.ones(x.shape[0], x.shape[1], 1)
    merged_yet = False
    trace = []
    for blk in vit.blocks:
        h = blk.norm1(x)
        B, N, C = h.shape
        heads = blk.attn.num_heads
        q, k, v = blk.attn.qkv(h).reshape(B, N, 3, heads, C // heads).permute(2, 0, 3, 1, 4)
        logits = (q @ k.transpose(-2, -1)) * (C // heads) ** -0.5
        if prop_attn and merged_yet:
            logits = logits + size.log()[:, None, None, :, 0]
        attn = (logits.softmax(dim=-1) @ v).transpose(1, 2).reshape(B, N, C)
        x = x + blk.attn.proj(attn)
        rr = min(r, (x.shape[1] - 1) // 2)
        if rr > 0:
            x, size = reference_merge(x, size, k, rr)
            merged_yet = True
        trace.append((x, size))
        x = x + blk.mlp(blk.norm2(x))
    return vit.forward_head(vit.norm(x)), trace


@pytest.mark.parametrize("prop_attn", [True, False])
def test_matches_reference_implementation(tome_vit, vit, images, prop_attn: bool) -> None:
    set_r(tome_vit, 13)
    set_prop_attn(tome_vit, prop_attn)
    try:
        calls, hooks = record(tome_vit)
        with torch.no_grad():
            out = tome_vit(images)
            expected, trace = reference_forward(vit, images, 13, prop_attn)
        hooks.remove()
    finally:
        set_prop_attn(tome_vit, True)
    assert len(calls) == len(trace) == 12
    for (_, _, x, size), (ref_x, ref_size) in zip(calls, trace):
        assert x.shape == ref_x.shape
        assert torch.equal(size, ref_size)  # same tokens merged, same sizes
        assert torch.allclose(x, ref_x, atol=1e-5, rtol=0)
    assert torch.allclose(out, expected, atol=1e-5, rtol=0)
    assert out.shape == (2, 1000)


def test_non_fused_attention_path(tome_vit, vit, images) -> None:
    """timm models built with fused_attn=False compute softmax(q·kᵀ) themselves: the bias goes before it."""
    import copy

    plain = copy.deepcopy(vit)
    for m in plain.modules():
        if hasattr(m, "fused_attn"):
            m.fused_attn = False
    model = peftc.compile("tome", plain, r=13)
    records = [r for r in model.ledger.rewrites if r.action == "merge_tokens"]
    assert {r.detail["attention"] for r in records} == {"softmax"}
    set_r(tome_vit, 13)
    with torch.no_grad():
        assert torch.allclose(model(images), tome_vit(images), atol=1e-5, rtol=0)


# -- selection and errors ----------------------------------------------------------------------------------
def _spec(**merge) -> dict:
    return {"peftc": 1, "name": "t", "rules": [{"merge_tokens": merge}]}


def test_per_layer_list_and_block_selection(vit) -> None:
    model = peftc.compile(_spec(r=[4, 3, 2], target={"role": "attn_residual", "blocks": "0:3"}), vit)
    assert get_r(model) == [4, 3, 2]
    calls, hooks = record(model)
    with torch.no_grad():
        model(torch.randn(1, 3, 224, 224))
    hooks.remove()
    assert [c[2].shape[1] for c in calls] == [193, 190, 188]


def test_errors_point_at_the_rule(vit, tome_vit) -> None:
    with pytest.raises(SpecError, match=r"rules\[0\].merge_tokens.r"):
        peftc.compile(_spec(r=[1] * 13), vit)
    with pytest.raises(SpecError, match="r must be >= 0"):
        peftc.load_spec(_spec(r=-1))
    with pytest.raises(SpecError, match="not the residual add"):
        peftc.compile(_spec(r=2, target={"role": "qkv"}), vit)
    twice = {"peftc": 1, "name": "t", "rules": [{"merge_tokens": {"r": 1}}, {"merge_tokens": {"r": 1}}]}
    with pytest.raises(SpecError, match="already merges tokens"):
        peftc.compile(twice, vit)
    with pytest.raises(PeftcError, match="merges no tokens"):
        set_r(vit, 3)
    with pytest.raises(PeftcError, match="r must be an int"):
        token_merges(tome_vit)[0].r = -2


def test_effective_r_is_capped() -> None:
    merge = TokenMerge(100, protected=1)
    assert merge.effective_r(197) == 98 and merge.effective_r(2) == 0
    assert math.isclose(sum(merge_schedule(12, 8, 0.5)) / 12, 8, abs_tol=1)
