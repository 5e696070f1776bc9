"""Convpass: the METHODS card counts, the patch grid read from the model, placement, identity, training."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import peftc
from peftc.methods.convpass.convpass import Convpass

from .cached import image, small_vit, vit_b_skeleton
from .conftest import synthetic_task, train_steps


@pytest.mark.parametrize(("variant", "modules", "total"), [("both", 24, 327_552), ("attn", 12, 163_776)])
def test_vit_b_counts(variant: str, modules: int, total: int) -> None:
    model = peftc.compile("convpass", vit_b_skeleton(), variant=variant)
    blocks = [m for m in model.modules() if isinstance(m, Convpass)]
    assert len(blocks) == modules
    assert all(sum(p.numel() for p in b.parameters()) == 13_648 for b in blocks)
    assert all(b.grid == (14, 14) and b.prefix == 1 for b in blocks)
    assert model.report.added_params == total
    assert model.report.trainable_params == total + 768 * 1000 + 1000


def test_grid_and_prefix_tokens_come_from_the_model() -> None:
    """64x64 inputs make a 4x4 grid; distilled DeiT has two prefix tokens (class and distillation)."""
    plain = peftc.compile("convpass", small_vit().module, variant="attn")
    assert {(b.grid, b.prefix) for b in plain.modules() if isinstance(b, Convpass)} == {((4, 4), 1)}
    bb = small_vit("timm:deit_tiny_distilled_patch16_224")
    distilled = peftc.compile("convpass", bb.module, variant="attn")
    assert {(b.grid, b.prefix) for b in distilled.modules() if isinstance(b, Convpass)} == {((4, 4), 2)}
    x = image(64, 2)
    with torch.no_grad():
        assert torch.allclose(distilled(x), bb.module.eval()(x), atol=1e-5)


def _reference_convpass(block: Convpass, x: torch.Tensor) -> torch.Tensor:
    """The reference forward (cls through the conv as a 1x1 image), generalised to the block's grid/prefix."""
    b = x.shape[0]
    h, w = block.grid
    p = block.prefix
    act = lambda t: t * torch.sigmoid(1.702 * t)  # noqa: E731
    down = act(block.down(x))
    patch = down[:, p:].reshape(b, h, w, block.dim).permute(0, 3, 1, 2)
    patch = block.conv(patch).permute(0, 2, 3, 1).reshape(b, h * w, block.dim)
    cls = down[:, :p].reshape(b * p, 1, 1, block.dim).permute(0, 3, 1, 2)
    cls = F.conv2d(cls, block.conv.weight, block.conv.bias, padding=1).reshape(b, p, block.dim)
    return block.up(act(torch.cat([cls, patch], dim=1)))


def test_block_matches_the_reference_forward() -> None:
    torch.manual_seed(3)
    block = Convpass(32, (3, 5), prefix=2, dim=8, conv_init="xavier").eval()
    with torch.no_grad():
        block.up.weight.normal_()
        block.up.bias.normal_()
    x = torch.randn(2, 2 + 15, 32)
    assert torch.allclose(block(x), _reference_convpass(block, x), atol=1e-5)
    # identity init: the conv is the identity at its centre tap
    ident = Convpass(32, (3, 5), prefix=1, dim=8)
    patches = torch.randn(1, 8, 3, 5)
    assert torch.equal(ident.conv(patches), patches)


def test_bypasses_read_the_layer_norm_output_beside_each_sublayer() -> None:
    """x = x + attn(LN1 x) + s C_attn(LN1 x); x = x + mlp(LN2 x) + s C_mlp(LN2 x), by hand from timm blocks."""
    bb = small_vit()
    model = peftc.compile("convpass", bb.module, scale=0.3)
    blocks = [m for m in model.modules() if isinstance(m, Convpass)]
    with torch.no_grad():
        for b in blocks:
            b.up.weight.normal_(0, 0.05)
    ref = bb.module.eval()
    x_img = image(64, 2)
    with torch.no_grad():
        x = ref.norm_pre(ref._pos_embed(ref.patch_embed(x_img)))
        for i, blk in enumerate(ref.blocks):
            c_attn, c_mlp = blocks[2 * i], blocks[2 * i + 1]
            h = blk.norm1(x)
            x = x + blk.ls1(blk.attn(h)) + 0.3 * c_attn(h)
            h = blk.norm2(x)
            x = x + blk.ls2(blk.mlp(h)) + 0.3 * c_mlp(h)
        expected = ref.forward_head(ref.norm(x))
        assert torch.allclose(model(x_img), expected, atol=1e-5)


def test_training_lowers_the_loss_and_keeps_frozen_tensors() -> None:
    model = peftc.compile("convpass", small_vit().module, num_classes=3)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    images, labels = synthetic_task(n=6, size=64)
    losses = train_steps(model, images, labels, steps=4, lr=1e-3)  # the reference's learning rate
    assert losses[-1] < losses[0]
    assert all(b.up.weight.abs().sum() > 0 for b in model.modules() if isinstance(b, Convpass))
    for name, p in model.named_parameters():
        if name in frozen:
            assert torch.equal(p, frozen[name]), name


def test_shapes_propagated_on_meta_equal_a_real_run(monkeypatch: pytest.MonkeyPatch) -> None:
    """Blocks read example shapes from a propagation on the meta device; it must agree with a real forward,
    including the tensors Convpass's blocks share (aliases under several names)."""
    from torch.fx.passes.shape_prop import ShapeProp

    from peftc.analysis.propagation import propagate_shapes
    from peftc.analysis.trace import example_input

    def shapes(meta: object) -> object:
        return meta.shape if hasattr(meta, "shape") else tuple(shapes(m) for m in meta)  # multi-output nodes

    gm = peftc.compile("convpass", small_vit().module).net
    x = example_input((3, 64, 64))

    class MetaOnly(ShapeProp):
        def propagate(self, *args: torch.Tensor) -> object:
            assert args[0].device.type == "meta", "fell back to a real run"
            return super().propagate(*args)

    monkeypatch.setattr("peftc.analysis.propagation.ShapeProp", MetaOnly)
    propagate_shapes(gm, x)
    monkeypatch.undo()
    on_meta = {n.name: shapes(n.meta["tensor_meta"]) for n in gm.graph.nodes if "tensor_meta" in n.meta}
    with torch.no_grad():
        ShapeProp(gm).propagate(x)
    real = {n.name: shapes(n.meta["tensor_meta"]) for n in gm.graph.nodes if "tensor_meta" in n.meta}
    assert on_meta == real and len(real) > 100
    assert all(p.device.type == "cpu" for p in gm.parameters()), "the model's own tensors stay where they were"
