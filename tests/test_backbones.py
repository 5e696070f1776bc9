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


def test_compile_shares_frozen_weights_and_never_writes_the_callers_module(tmp_path) -> None:
    """No weight is copied at compile time, yet training, task switches, saving, loading and folding leave the
    module the user passed exactly as it was; the artifact's hash is that of the weights as passed."""
    import torchvision

    import peftc
    from peftc.export.fold import fold

    module = torchvision.models.resnet18(num_classes=5)
    before = {k: v.clone() for k, v in module.state_dict().items()}
    model = peftc.compile("clr", module, num_classes=5)  # CLR trains BatchNorm (affine and statistics) and head
    theirs = {n: t for n, t in (*module.named_parameters(), *module.named_buffers())}
    ours = {n: t for n, t in (*model.net.named_parameters(), *model.net.named_buffers()) if n in theirs}
    frozen = [n for n, p in model.net.named_parameters() if n in theirs and not p.requires_grad]
    assert "layer1.0.conv1.weight" in frozen
    assert all(ours[n].data_ptr() == theirs[n].data_ptr() for n in frozen), "frozen weights must not be copied"
    assert all(ours[n].data_ptr() != theirs[n].data_ptr() for n in ours if n not in frozen), "trained ones must be"

    model.train()
    opt = torch.optim.SGD(model.trainable_parameters(), lr=0.1)
    for _ in range(2):
        opt.zero_grad()
        model(torch.randn(4, 3, 32, 32)).logsumexp(1).mean().backward()
        opt.step()
    model.add_task("b", num_classes=3)
    model.set_task("b")
    model.save(tmp_path / "art")
    again = peftc.load(tmp_path / "art", backbone=module)
    fold(again.eval(), task="b")
    assert all(torch.equal(before[k], v) for k, v in module.state_dict().items()), "the caller's module changed"
    assert model.backbone.hash == weights_hash(module) == again.backbone.hash
