"""Backbones by name: seeded random init, library listing, offline pretrained requests."""

from __future__ import annotations

import pytest
import torch

from peftc.analysis.backbones import _reachable, build_backbone, list_backbones, weights_hash
from peftc.errors import BackboneError


def test_random_init_is_seeded_and_hashed() -> None:
    a, b, c = build_backbone("resnet18"), build_backbone("resnet18"), build_backbone("resnet18", seed=1)
    assert a.hash == b.hash != c.hash
    assert all(torch.equal(x, y) for x, y in zip(a.module.state_dict().values(), b.module.state_dict().values()))
    assert a.hash == weights_hash(a.module) and a.source == "random" and a.input_size == (3, 224, 224)
    rng = torch.get_rng_state()
    build_backbone("resnet18")
    assert torch.equal(rng, torch.get_rng_state()), "building a backbone must not consume the global RNG"


def test_timm_and_torchvision_names() -> None:
    assert build_backbone("timm:vit_tiny_patch16_224").input_size == (3, 224, 224)
    assert "resnet50" in list_backbones("resnet5")
    assert list_backbones("deit_tiny_patch16_2*", library="timm") == ["timm:deit_tiny_patch16_224"]
    with pytest.raises(BackboneError, match="did you mean 'resnet50'"):
        build_backbone("resnet05")


@pytest.mark.skipif(_reachable("download.pytorch.org"), reason="online: would really download weights")
def test_pretrained_offline_is_a_clear_error() -> None:
    with pytest.raises(BackboneError, match="could not download pretrained weights for resnet18.*--weights FILE"):
        build_backbone("resnet18", pretrained=True)


def test_pretrained_and_weights_are_exclusive(tmp_path) -> None:
    with pytest.raises(BackboneError, match="either --pretrained or --weights"):
        build_backbone("resnet18", pretrained=True, weights=tmp_path / "w.pt")
