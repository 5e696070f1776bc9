"""MemVP: the memory branch against its formula, and two-stream graphs (a ``memory`` input) end to end on a tiny
CLIP-style ViT: identity at init, counts, clear input errors, artifact, diff, ONNX with two inputs. On a single
model every rule applies (``part:`` routes rules on a vision-language pair only: tests/test_memvp_pair.py, which
also has the 7B-shaped counts)."""

from __future__ import annotations

from functools import cache
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import peftc
from peftc.errors import PeftcError
from peftc.export.runtime import open_backend
from peftc.methods.memvp.memory import MemoryProjector, MemoryTable, VisualMemory

pytestmark = pytest.mark.usefixtures("one_thread")

D, DEPTH, FEATURES, TOKENS, HIDDEN, DIM = 64, 2, 48, 8, 16, 12
PARAMS = {"features": FEATURES, "tokens": TOKENS, "hidden": HIDDEN}


@cache
def clip_vit() -> nn.Module:
    """A CLIP-style timm ViT (pre-norm, QuickGELU-free ``vit_base_patch16_clip_224`` family), tiny, random init."""
    import timm

    torch.manual_seed(0)
    return timm.create_model("vit_base_patch16_clip_224", pretrained=False, depth=DEPTH, embed_dim=D, num_heads=4,
                             img_size=32, num_classes=0).eval()


@cache
def compiled() -> peftc.runtime.model.Compiled:
    return peftc.compile("memvp", clip_vit(), **PARAMS)


def images(batch: int = 2) -> torch.Tensor:
    return torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(1))


def features(batch: int = 2, tokens: int = 5) -> torch.Tensor:
    return torch.randn(batch, tokens, FEATURES, generator=torch.Generator().manual_seed(2))


def perturbed(model: nn.Module) -> nn.Module:
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.1 * torch.randn(p.shape, generator=gen))
    return model


def test_memory_branch_equals_the_formula() -> None:
    """out = s·SiLU(u (Z+E1)ᵀ)(Z+E2), Z = pad_M'(0.01·fc2(SiLU(fc1 x))) with Z = 0 for a sample without an image."""
    torch.manual_seed(0)
    projector, table = MemoryProjector(FEATURES, HIDDEN, D, TOKENS), MemoryTable(TOKENS, D)
    memory = VisualMemory(table, dropout=0.1).eval()
    perturbed(projector), perturbed(table)  # non-zero biases and E2: a forgotten mask or offset would show
    x = features(3, 5)
    x[1] = 0  # the second sample has no image
    u = torch.randn(3, 7, D)
    with torch.no_grad():
        got = 0.1 * memory(u, projector(x))
        h = F.silu(x @ projector.fc1.weight.T + projector.fc1.bias) @ projector.fc2.weight.T + projector.fc2.bias
        z = torch.cat([0.01 * h * torch.tensor([1.0, 0.0, 1.0])[:, None, None], torch.zeros(3, TOKENS - 5, D)], 1)
        want = 0.1 * F.silu(u @ (z + table.keys).transpose(1, 2)) @ (z + table.values)
    assert (got - want).abs().max().item() <= 1e-6
    assert got[1].abs().max() > 0  # without an image, the learned memory alone still acts
    zero = torch.zeros(1, TOKENS, D)
    assert torch.allclose(got[1], 0.1 * F.silu(u[1] @ (zero + table.keys)[0].T) @ (zero + table.values)[0],
                          atol=1e-6)


def test_identity_at_init_without_images_and_a_small_prompt_with_them() -> None:
    """E2 = 0 and Z = 0 (no image: all-zero features, or no tokens at all) make the branch vanish at init. With an
    image the official init (xavier projector, Z = 0.01·proj) already writes Z into the values: a small change."""
    model, x = compiled(), images()
    with torch.no_grad():
        ref = clip_vit()(x)
        for memory in (torch.zeros(2, 5, FEATURES), torch.zeros(2, 0, FEATURES)):
            assert (model(x, memory=memory) - ref).abs().max().item() <= 1e-5
        with_images = (model(x, memory=features()) - ref).abs().max().item()
        assert 0 < with_images < 1e-2 * ref.abs().max().item()
        changed = perturbed(peftc.compile("memvp", clip_vit(), **PARAMS))
        assert (changed(x, memory=torch.zeros(2, 5, FEATURES)) - ref).abs().max().item() > 1e-3


def test_trainable_count_is_the_formula() -> None:
    projector = FEATURES * HIDDEN + HIDDEN + HIDDEN * D + D
    adapters = DEPTH * 2 * D * DIM
    report = compiled().report
    assert report.trainable_params == 2 * TOKENS * D + projector + adapters
    rules = {r.label: r.added_params for r in report.rules}
    assert rules["memory"] == projector and rules["memvp"] == 2 * TOKENS * D
    assert rules["vision_adapter"] == adapters


@pytest.mark.parametrize(("memory", "words"), [
    (None, "takes a second input 'memory'"),
    (torch.zeros(2, 5, FEATURES - 1), "got shape (2, 5, 47)"),
    (torch.zeros(3, 5, FEATURES), "for a batch of 2"),
    (torch.zeros(2, TOKENS + 1, FEATURES), f"at most {TOKENS}"),
    (torch.zeros(2, 5), "got shape (2, 5)"),
])
def test_a_missing_or_misshaped_memory_is_one_clear_message(memory: torch.Tensor | None, words: str) -> None:
    with pytest.raises(PeftcError) as err:
        compiled()(images(), **({} if memory is None else {"memory": memory}))
    assert words in str(err.value) and "memory" in str(err.value)


def test_artifact_holds_only_trainables_and_loads_equal(tmp_path: Path) -> None:
    from safetensors.torch import load_file

    model = perturbed(peftc.compile("memvp", clip_vit(), **PARAMS))
    model.save(tmp_path / "a")
    stored = load_file(str(tmp_path / "a" / "delta.safetensors"))
    names = {n.split("/", 1)[-1] for n in stored}
    assert names == {n for n, _ in model.named_trainable_parameters()}
    again = peftc.load(tmp_path / "a", backbone=clip_vit())
    x, memory = images(), features()
    with torch.no_grad():
        assert torch.equal(again(x, memory=memory), model(x, memory=memory))


def test_the_diff_shows_the_new_input() -> None:
    added = {n["name"]: n for n in peftc.diff("memvp", backbone=clip_vit(), params=PARAMS).to_json()["added"]}
    assert added["memory"]["op"] == "placeholder" and added["memory"]["shape"] == [1, 2, FEATURES]
    assert added["memory_projector"]["params"] == FEATURES * HIDDEN + HIDDEN + HIDDEN * D + D


def test_onnx_export_takes_image_and_memory(tmp_path: Path) -> None:
    from peftc.export.ort import OrtRunner

    model = perturbed(peftc.compile("memvp", clip_vit(), **PARAMS))
    result = peftc.export_onnx(model, tmp_path / "m.onnx")
    assert result.input_names == ["image", "memory"] and result.parity is not None and result.parity.ok
    x, memory = images(4), features(4, 7)  # another batch and token count than export and its check
    memory[2] = 0
    got = OrtRunner(str(tmp_path / "m.onnx"), "cpu")(x, memory)
    with torch.no_grad():
        want = model(x, memory=memory).numpy()
    assert np.abs(got - want).max() <= 1e-4 * max(1.0, float(np.abs(want).max()))
    backend = open_backend(tmp_path / "m.onnx", "ort", provider="cpu")  # peftc run: images only, memory zeros
    assert not backend.all_tasks and "zeros" in backend.info["streams"]["memory"]
    with torch.no_grad():
        no_image = model(x, memory=torch.zeros(4, 1, FEATURES)).numpy()
    assert np.abs(backend(x) - no_image).max() <= 1e-4 * max(1.0, float(np.abs(no_image).max()))


def test_peftc_run_backends_feed_an_all_zero_memory() -> None:
    model, x = perturbed(peftc.compile("memvp", clip_vit(), **PARAMS)), images()
    backend = open_backend(model, "eager")
    assert backend.info["streams"] == {"memory": f"zeros (batch, {TOKENS}, {FEATURES}): no second input given"}
    with torch.no_grad():
        assert torch.allclose(torch.from_numpy(backend(x)), model(x, memory=torch.zeros(2, TOKENS, FEATURES)),
                              atol=1e-5)


def test_the_recipe_is_the_official_scripts() -> None:
    train = peftc.load_spec("memvp").train
    assert (train.optimizer.name, tuple(train.optimizer.betas), train.weight_decay) == ("adamw", (0.9, 0.95), 0.02)
    assert (train.epochs, train.scheduler.name, train.scheduler.warmup_epochs) == (20, "cosine", 2)
    assert train.effective_lr() == pytest.approx(9e-3 * 32 / 256)


def test_reading_a_stream_no_rule_adds_points_into_the_spec() -> None:
    spec = {"peftc": 1, "name": "s", "rules": [
        {"freeze": {}},
        {"parallel": {"to": {"role": "mlp_out"}, "from": {"role": "mlp_norm"}, "read": "output",
                      "block": "memvp_memory", "stream": "memory"}}]}
    with pytest.raises(PeftcError, match=r"rules\[1\]\.parallel\.stream: no earlier 'stream' rule adds an input "
                                         r"named 'memory'"):
        peftc.compile(spec, clip_vit())
