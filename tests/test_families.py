"""Transformer roles on every family: fused qkv read through ``F.linear`` (BEiT, EVA), hierarchical models with
channels-last token grids and one width per stage (Swin, MaxViT), and why a method does not apply, in terms of
the model's structure. Tiny configurations; the full-size matrix is ``python -m benchmarks coverage``."""

from __future__ import annotations

import pytest
import timm
import torch
import torchvision
from torch import nn

import peftc
from peftc.analysis.index import NodeIndex, block_positions
from peftc.analysis.roles import get_role
from peftc.analysis.trace import trace
from peftc.errors import SpecError
from peftc.methods.fact.fact import FactFactors

X = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
EXACT = 1e-5


def _timm(name: str, **kwargs: object) -> nn.Module:
    torch.manual_seed(0)
    return timm.create_model(name, num_classes=5, **kwargs).eval()


def _beit() -> nn.Module:
    return _timm("beit_base_patch16_224", img_size=32, depth=2, embed_dim=32, num_heads=2)


def _eva() -> nn.Module:
    return _timm("eva02_tiny_patch14_224", img_size=28, patch_size=14, depth=2, embed_dim=32, num_heads=2)


def _swin() -> nn.Module:
    return _timm("swin_tiny_patch4_window7_224", img_size=32, window_size=4, depths=(1, 1), embed_dim=16,
                 num_heads=(1, 2))


def _maxvit() -> nn.Module:
    torch.manual_seed(0)
    # built for 224 (what peftc assumes of a torchvision module), narrow so that one forward stays cheap
    return torchvision.models.MaxVit(input_size=(224, 224), stem_channels=4, partition_size=7, block_channels=[4, 8],
                                     block_layers=[1, 1], head_dim=4, stochastic_depth_prob=0.0, num_classes=5).eval()


def _role(module: nn.Module, role: str) -> list[str]:
    fn = get_role(role)
    assert fn is not None
    return [c.name for c in fn(NodeIndex(trace(module), block_positions(module)))]


@pytest.mark.parametrize("build", [_beit, _eva], ids=["beit", "eva02"])
def test_fused_qkv_read_through_f_linear_is_the_qkv_role(build) -> None:
    """BEiT/EVA call F.linear(x, qkv.weight, cat(q_bias, 0, v_bias)): traced as qkv(x) + bias, it is role qkv."""
    module = build()
    assert _role(module, "qkv") == ["blocks.0.attn.qkv", "blocks.1.attn.qkv"]
    assert _role(module, "attn_proj") == ["blocks.0.attn.proj", "blocks.1.attn.proj"]
    x = X[:, :, :28, :28] if module.patch_embed.img_size[0] == 28 else X
    assert (trace(module)(x) - module(x)).abs().max() < EXACT
    for spec in ("vera", "lora"):
        model = peftc.compile(spec, module)
        assert (model(x) - module(x)).abs().max() < EXACT, spec
    if build is _eva:  # SwiGLU: fc1 is 32 -> 2 x 85
        with pytest.raises(SpecError, match=r"an MLP ratio of 5.31 \(a gated MLP such as SwiGLU\)"):
            peftc.compile("fact", module)
    else:
        assert (peftc.compile("fact", module)(x) - module(x)).abs().max() < EXACT


@pytest.mark.parametrize("build", [_beit, _eva], ids=["relative-position bias", "rotary"])
@pytest.mark.parametrize("spec", ["tome", "tocom"])
def test_token_merging_refuses_positional_terms_at_compile_time(build, spec: str) -> None:
    """A term tied to token positions inside the attention cannot follow merged tokens: one message, no
    failure at forward time (it was a RuntimeError in the forward)."""
    with pytest.raises(SpecError, match=r"attention of 'blocks.0' adds a term tied to token positions"):
        peftc.compile(spec, build(), r=0)


@pytest.mark.parametrize("spec", ["adaptformer", "convpass", "fact", "lora", "vera"])
def test_swin_stages_take_every_transformer_method(spec: str) -> None:
    """timm's Swin: an nn.Softmax marks attention; B×H×W×C grids; two stages, two widths."""
    module = _swin()
    model = peftc.compile(spec, module, targets=["qkv", "fc1", "fc2"]) if spec == "lora" else peftc.compile(
        spec, module)
    assert (model(X) - module(X)).abs().max() < EXACT
    assert model.report.added_params > 0
    if spec == "fact":  # one factor group per width
        widths = {m.features for m in model.net.modules() if isinstance(m, FactFactors)}
        assert widths == {16, 32}


def test_maxvit_adapters_and_window_partitions() -> None:
    module = _maxvit()
    model = peftc.compile("adaptformer", module)  # crashed in quant.py: the adapter read the width from dim 1
    x = torch.randn(1, 3, 224, 224)
    assert (model(x) - module(x)).abs().max() < EXACT
    with pytest.raises(SpecError, match=r"window partitions, as in MaxViT, not a spatial grid"):
        peftc.compile("convpass", module)


def test_messages_name_the_structure() -> None:
    swin_t = torchvision.models.SwinTransformer(patch_size=[4, 4], embed_dim=8, depths=[1, 1], num_heads=[1, 1],
                                                window_size=[2, 2], num_classes=5).eval()
    with pytest.raises(SpecError, match=r"calls shifted_window_attention.*opaque to tracing"):
        peftc.compile("fact", swin_t)
    resnet = torchvision.models.resnet18(num_classes=5).eval()
    with pytest.raises(SpecError, match=r"residual branches starts with a normalisation layer, e.g. 'layer1.0.conv1'"):
        peftc.compile("fact", resnet)
    plain = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.LazyLinear(5))
    plain(X)
    with pytest.raises(SpecError, match=r"no residual adds at all"):
        peftc.compile("vera", plain.eval())


def test_token_merging_on_a_windowed_hierarchy_says_why() -> None:
    with pytest.raises(SpecError, match=r"attention over windows of a token grid, as in Swin"):
        peftc.compile("tome", _swin(), r=0)


@pytest.mark.parametrize("variant", ["tt", "tk"])
def test_fact_on_split_q_k_v_projections(variant: str) -> None:
    """EVA with qkv_fused=False: q_proj, k_proj, v_proj each get their part's core; the fold merges each."""
    from peftc.export.fold import fold

    module = _timm("eva02_tiny_patch14_224", img_size=28, patch_size=14, depth=2, embed_dim=32, num_heads=2,
                   qkv_fused=False, use_rot_pos_emb=False, swiglu_mlp=False, mlp_ratio=4.0)
    assert _role(module, "qkv")[:3] == ["blocks.0.attn.q_proj", "blocks.0.attn.k_proj", "blocks.0.attn.v_proj"]
    model = peftc.compile("fact", module, variant=variant).eval()
    x = X[:, :, :28, :28]
    assert (model(x) - module(x)).abs().max() < EXACT
    with torch.no_grad():
        for p in model.trainable_parameters():
            p.add_(0.05 * torch.randn_like(p))
        folded = fold(model).module(x)
        assert (folded - model(x)).abs().max() < 1e-4
    slots = [m.slot for m in model.net.modules() if getattr(m, "part", None) == "qkv"]
    assert slots == [0, 1, 2, 0, 1, 2]


def test_f_linear_on_a_layers_weight_keeps_the_bias_it_was_given() -> None:
    """Only the bias the call passes is added: a call without bias on a Linear with one stays as it was."""

    class Tied(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.proj = nn.Linear(4, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.nn.functional.linear(x, self.proj.weight) + self.proj(x)

    module = Tied().eval()
    gm = trace(module)
    x = torch.randn(2, 4)
    assert torch.allclose(gm(x), module(x)) and sum(n.op == "call_module" for n in gm.graph.nodes) == 1
