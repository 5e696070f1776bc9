"""The block contract's ownership and role declarations, with toy blocks a new author would write.

The traps it closes: a replacement block that reuses the layer it replaces must not make the frozen base weight
per task (DoRA keeps W shared and learns a per-task magnitude), and must keep the layer's role visible to later
rules (a LoRA after a DoRA on ``qkv`` still finds ``qkv``); a block's shared random tensors must not be copied
per task (VeRA's projections; see tests/test_vera.py for the real method).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import peftc
from peftc.blocks import Block, BlockArgs, Site, register_block
from peftc.language import RuleArgs, Selector, primitives
from peftc.language.primitives import Primitive
from peftc.passes import PassContext
from tests.cached import module as cached

VIT = "timm:vit_tiny_patch16_224"


class ToyDora(Block):
    """``m ⊙ W / ‖W‖_row`` with the original Linear's W and bias reused (borrowed), a per-task magnitude ``m``."""

    stands_for = nn.Linear

    def __init__(self, base: nn.Linear):
        super().__init__()
        self.base = base  # reused: the very same W and bias objects
        self.in_features, self.out_features = base.in_features, base.out_features
        self.magnitude = nn.Parameter(base.weight.detach().norm(dim=1).clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.base.weight
        return F.linear(x, self.magnitude.unsqueeze(1) * w / w.norm(dim=1, keepdim=True), self.base.bias)


@register_block("test_toy_dora", args=BlockArgs, suffix="dora")
def _toy_dora(site: Site, args: BlockArgs) -> ToyDora:
    """Test-only DoRA-style replacement."""
    assert isinstance(site.module, nn.Linear)
    return ToyDora(site.module)


SPEC = {"peftc": 1, "name": "toy_dora_lora", "rules": [
    {"freeze": {}},
    {"replace": {"target": {"role": ["qkv", "fc1"]}, "block": "test_toy_dora", "task_state": "new"}},
    {"parallel": {"to": {"role": "qkv"}, "block": "lora", "args": {"rank": 2}, "task_state": "new"}},
    {"train": {"type": "Linear", "name": "blocks.0.*", "params": "bias", "optional": True}},
]}


def test_a_dora_style_block_keeps_the_base_shared_and_the_roles_visible() -> None:
    model = peftc.compile(SPEC, cached(VIT))
    slots = set(model.bank.tensor_slots)
    assert "blocks.0.attn.qkv.magnitude" in slots and "blocks.3.mlp.fc1.magnitude" in slots
    assert not any(s.endswith("base.weight") for s in slots)  # the frozen base is borrowed, never per task
    assert not model.net.get_submodule("blocks.0.attn.qkv.base").weight.requires_grad
    # the later rule still found qkv (now a ToyDora standing for a Linear) and bypassed it
    assert sum(r.action == "parallel" for r in model.ledger.rewrites) == 12
    assert isinstance(model.net.get_submodule("blocks.0.attn.qkv.lora").A, nn.Linear)
    # `type: Linear` finds the stand-in too: its borrowed bias trains (shared), and stays one tensor
    assert model.net.get_submodule("blocks.0.attn.qkv.base").bias.requires_grad
    assert "blocks.0.attn.qkv.base.bias" not in slots
    x = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(model(x), cached(VIT)(x), atol=1e-5, rtol=1e-5)  # DoRA at init is W itself


class NoisyBypass(Block):
    """A bypass with a frozen random buffer shared by all its sites, declared as shared state."""

    shared_state = ("noise.*",)

    def __init__(self, noise: nn.Module, features: int):
        super().__init__()
        self.noise = noise
        self.scale = nn.Parameter(torch.zeros(features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.scale * (x @ self.noise.matrix)


class _Noise(nn.Module):
    def __init__(self, features: int):
        super().__init__()
        self.register_buffer("matrix", torch.randn(features, features, generator=torch.Generator().manual_seed(0)))


@register_block("test_noisy_bypass", args=BlockArgs, suffix="noisy")
def _noisy(site: Site, args: BlockArgs) -> NoisyBypass:
    """Test-only bypass with shared frozen state."""
    features = site.channels("input")
    noise = site.shared.setdefault("noise", _Noise(features))
    return NoisyBypass(noise, features)


def test_shared_state_is_one_copy_for_every_task_and_stored_once() -> None:
    spec = {"peftc": 1, "name": "noisy", "rules": [
        {"freeze": {}},
        {"parallel": {"to": {"role": "fc2"}, "block": "test_noisy_bypass", "task_state": "new"}}]}
    model = peftc.compile(spec, cached(VIT))
    slots = set(model.bank.tensor_slots)
    assert "blocks.0.mlp.fc2.noisy.scale" in slots and not any("noise" in s for s in slots)
    assert sorted(model.shared_state()) == ["blocks.0.mlp.fc2.noisy.noise.matrix"]


class _ScaleArgs(RuleArgs):
    """Multiply the selected nodes' outputs by a learnable scalar (a test-only third-party primitive)."""

    target: Selector


def _scale(ctx: PassContext) -> None:
    graph = ctx.gm.graph
    for cand in ctx.select(ctx.args.target, "target"):
        path = ctx.module_path_for(cand, "gain")
        added = ctx.add_block(path, _Gain())
        with graph.inserting_after(cand.node):
            new = graph.call_module(path, (cand.node,))
        cand.node.replace_all_uses_with(new, delete_user_cb=lambda user, new=new: user is not new)
        new.meta.update(peftc_name=path, peftc_rule=ctx.rule.label)
        ctx.record("test_gain", cand.name, module=path, params=added)
    ctx.state.graph_changed()


class _Gain(Block):
    def __init__(self) -> None:
        super().__init__()
        self.gain = nn.Parameter(torch.ones(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gain


def test_a_third_party_primitive_is_one_registration(monkeypatch) -> None:
    monkeypatch.setitem(primitives.PRIMITIVES, "test_gain", Primitive(
        "test_gain", _ScaleArgs, _scale, adds_params=True, reads_shapes=False, once=False, summary=""))
    spec = {"peftc": 1, "name": "gain", "rules": [{"freeze": {}}, {"test_gain": {"target": {"role": "fc2"}}}]}
    model = peftc.compile(spec, cached(VIT))
    assert model.report.added_params == 12  # the report reads adds_params from the registry
    assert [r.label for r in model.report.rules] == ["freeze", "test_gain"]
    with pytest.raises(peftc.PeftcError, match="unknown key 'targte'"):  # the loader validates with its model
        peftc.compile({**spec, "rules": [{"test_gain": {"targte": {"role": "fc2"}}}]}, cached(VIT))
