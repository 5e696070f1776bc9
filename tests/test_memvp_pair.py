"""MemVP on a real vision-language pair: a tiny timm CLIP ViT and HF decoders (LLaMA, Qwen2) compiled as one model
by ``peftc.pair`` — identity at init without images, equality with MemVP written by hand, the trainable count
(small, and 7B-shaped on the meta device through the same compile path), clear errors, the vision side's ONNX
export, and a short training run whose loss falls below what the captions' template alone allows."""

from __future__ import annotations

import math
from functools import cache
from pathlib import Path

import pytest
import torch
from torch import nn

import peftc
from peftc.errors import PeftcError, SpecError

pytestmark = pytest.mark.usefixtures("one_thread")

VIT, DEPTH, LM, LAYERS, TOKENS, HIDDEN, DIM = 48, 3, 64, 2, 20, 16, 12
PARAMS = {"features": VIT, "tokens": TOKENS, "hidden": HIDDEN}
VOCAB = 50


@cache
def vit() -> nn.Module:
    import timm

    torch.manual_seed(0)
    return timm.create_model("vit_base_patch16_clip_224", pretrained=False, depth=DEPTH, embed_dim=VIT, num_heads=4,
                             patch_size=8, img_size=32, num_classes=0).eval()


@cache
def language(family: str) -> nn.Module:
    import transformers

    torch.manual_seed(1)
    config = getattr(transformers, f"{family}Config")(
        hidden_size=LM, intermediate_size=2 * LM, num_hidden_layers=LAYERS, num_attention_heads=4,
        num_key_value_heads=2, head_dim=LM // 4, vocab_size=VOCAB)
    return getattr(transformers, f"{family}ForCausalLM")(config).eval()


@cache
def compiled(family: str = "Llama") -> nn.Module:
    return peftc.compile("memvp", peftc.pair(vit(), language(family)), **PARAMS)


def images(batch: int = 2) -> torch.Tensor:
    return torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(2))


def ids(batch: int = 2, length: int = 7) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(3))


def perturb(params: list[nn.Parameter]) -> None:
    gen = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for p in params:
            p.add_(0.3 * torch.randn(p.shape, generator=gen))


@pytest.mark.parametrize("family", ["Llama", "Qwen2", "Gemma"])
def test_identity_at_init_without_images(family: str) -> None:
    """E2 = 0 and Z = 0 without an image: logits and loss equal the plain LM's (also with a padding mask, and for
    the sample of a batch whose image is masked out). With images, the official init already writes Z into the
    memory values (E2 + Z = Z ≠ 0): a small change, as the formula says."""
    model, plain, tokens = compiled(family), language(family), ids()
    padding = torch.ones_like(tokens)
    padding[1, :3] = 0
    with torch.no_grad():
        ref = plain(input_ids=tokens, labels=tokens)
        got = model(None, tokens, labels=tokens)
        padded = model(None, tokens, attention_mask=padding).logits
        masked = model(images(), tokens, image_mask=torch.tensor([True, False])).logits
        with_images = model(images(), tokens).logits
        ref_padded = plain(input_ids=tokens, attention_mask=padding).logits
    assert (got.logits - ref.logits).abs().max().item() <= 1e-5
    assert (padded - ref_padded).abs().max().item() <= 1e-5
    assert (masked[1] - ref.logits[1]).abs().max().item() <= 1e-5 < (masked[0] - ref.logits[0]).abs().max().item()
    assert abs(got.loss.item() - ref.loss.item()) <= 1e-5
    assert 0 < (with_images - ref.logits).abs().max().item() < 0.1 * ref.logits.abs().max().item()


def test_the_pair_is_memvp_written_by_hand() -> None:
    """Features = timm's own penultimate-block tokens with the final norm and no CLS; every decoder layer's MLP
    output gains s·Dropout(SiLU(u (Z+E1)ᵀ))(Z+E2), u its normed input — checked with trained-looking values."""
    model = peftc.compile("memvp", peftc.pair(vit(), language("Llama")), **PARAMS)
    perturb([p for n, p in model.named_trainable_parameters() if not n.startswith("vision.")])
    x, tokens = images(), ids()
    memory = model.language.model.layers[0].mlp.down_proj.memvp
    plain = language("Llama")
    with torch.no_grad():
        (feats,) = vit().forward_intermediates(x, indices=[DEPTH - 2], norm=True, output_fmt="NLC",
                                               intermediates_only=True)
        z = model.prelude.memory_projector(feats)
        hooks = [layer.mlp.register_forward_hook(lambda _m, inp, out: out + 0.1 * memory(inp[0], z))
                 for layer in plain.model.layers]
        try:
            want = plain(input_ids=tokens).logits
        finally:
            for h in hooks:
                h.remove()
        got = model(x, tokens).logits
    assert feats.shape == (2, 16, VIT)  # 4x4 patches, CLS dropped
    assert (got - want).abs().max().item() <= 1e-5


def test_trainable_count_is_the_formula() -> None:
    model = compiled()
    projector = VIT * HIDDEN + HIDDEN + HIDDEN * LM + LM
    adapters = DEPTH * 2 * VIT * DIM  # every CLIP block, the skipped last one too (as the official code)
    assert model.trainable_params == 2 * TOKENS * LM + projector + adapters
    added = model.added_params()
    assert (added["memvp"], added["memory"], added["vision_adapter"]) == (2 * TOKENS * LM, projector, adapters)
    tables = {id(layer.mlp.down_proj.memvp.table) for layer in model.language.model.layers}
    assert len(tables) == 1  # E1/E2 shared by every decoder layer
    frozen = {n for n, p in model.language.named_parameters() if not p.requires_grad}
    assert {"lm_head.weight", "model.embed_tokens.weight", "model.layers.1.mlp.up_proj.weight"} <= frozen


def test_llama_7b_and_clip_l14_counts_on_the_meta_device() -> None:
    """The real compile path on a LLaMA-7B-shaped LM (d 4096, 32 layers, M' 320) and CLIP-L/14, no weights:
    E1+E2 2,621,440 + projector 659,584 = 3,281,024; adapters 589,824; 3,870,848 in all (the official code's
    unused 8,192-parameter modality embedding left out)."""
    import timm
    from transformers import LlamaConfig, LlamaForCausalLM

    with torch.device("meta"):
        lm = LlamaForCausalLM(LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                                          num_attention_heads=32, vocab_size=32000))
        encoder = timm.create_model("vit_large_patch14_clip_224", pretrained=False, num_classes=0)
        model = peftc.compile("memvp", peftc.pair(encoder, lm))
    added = model.added_params()
    assert added["memvp"] == 2_621_440 and added["memory"] == 659_584
    assert added["memvp"] + added["memory"] == 3_281_024
    assert added["vision_adapter"] == 589_824
    assert model.trainable_params == 3_870_848


def test_rules_see_the_decoder_layers_as_one_stack() -> None:
    """Selectors work on the language model as on a ViT: ``blocks: "-1"`` puts the memory in the last layer only,
    and the layers' modules keep the model's own paths."""
    doc = peftc.load_spec("memvp", PARAMS).to_document()
    rule = next(r for r in doc["rules"] if r.get("label") == "memvp")
    rule["parallel"]["to"] = {"role": "mlp_out", "blocks": "-1"}
    model = peftc.compile(doc, peftc.pair(vit(), language("Llama")))
    layers = model.language.model.layers
    assert not hasattr(layers[0].mlp.down_proj, "memvp") and hasattr(layers[1].mlp.down_proj, "memvp")
    assert next(r for r in model.reports["language"].rules if r.label == "memvp").nodes == 1
    assert "model.layers.1.mlp.down_proj.memvp.table.keys" in dict(model.language.named_parameters())


@pytest.mark.parametrize(("call", "words"), [
    (lambda m: m(torch.randn(2, 3, 64, 64), ids()), "images must be (batch, 3, 32, 32)"),
    (lambda m: m(images(3), ids()), "3 images for 2 token sequences"),
    (lambda m: m(images(), ids() + VOCAB), "outside the vocabulary [0, 50)"),
    (lambda m: m(images(), ids(), labels=torch.full((2, 7), -5)), "labels holds token ids outside"),
    (lambda m: m(images(), ids().float()), "input_ids must be integer token ids"),
    (lambda m: m.language(input_ids=ids()), "only the compiled pair's forward provides"),
])
def test_bad_inputs_are_one_clear_message(call: object, words: str) -> None:
    with pytest.raises(PeftcError) as err:
        call(compiled())  # type: ignore[operator]
    assert words in str(err.value)


def test_what_cannot_pair_is_one_clear_message() -> None:
    with pytest.raises(PeftcError, match="has no pair: section"):
        peftc.compile("lora", peftc.pair(vit(), language("Llama")))
    with pytest.raises(PeftcError, match=r"tokens are 48 wide but stream 'memory' takes 1024 features.*features=48"):
        peftc.compile("memvp", peftc.pair(vit(), language("Llama")), tokens=TOKENS)
    with pytest.raises(PeftcError, match=r"gives 16 tokens but stream 'memory' holds at most 8.*tokens=16"):
        peftc.compile("memvp", peftc.pair(vit(), language("Llama")), **{**PARAMS, "tokens": 8})
    with pytest.raises(PeftcError, match="must be a causal LM module with token embeddings"):
        peftc.pair(vit(), nn.Linear(2, 2))

    class NoLayers(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = nn.Embedding(VOCAB, LM)

        def get_input_embeddings(self) -> nn.Module:
            return self.embed

    with pytest.raises(PeftcError, match="has no run of repeated layers"):
        peftc.compile("memvp", peftc.pair(vit(), NoLayers()), **PARAMS)
    with pytest.raises(SpecError, match=r"rules\[0\]\.part.*part names a part of a vision-language pair"):
        peftc.load_spec({"peftc": 1, "name": "x", "rules": [{"freeze": {}, "part": "audio"}]})


def test_save_holds_only_the_trainables_and_loads_equal(tmp_path: Path) -> None:
    from safetensors.torch import load_file

    from peftc.errors import ArtifactError

    model = peftc.compile("memvp", peftc.pair(vit(), language("Llama")), **PARAMS)
    perturb(list(model.trainable_parameters()))
    model.save(tmp_path / "a")
    stored = load_file(str(tmp_path / "a" / "delta.safetensors"))
    assert set(stored) == {n for n, _ in model.named_trainable_parameters()}
    assert sum(t.numel() for t in stored.values()) == model.trainable_params
    again = peftc.load(tmp_path / "a", backbone=peftc.pair(vit(), language("Llama")))
    with torch.no_grad():
        assert torch.equal(again(images(), ids()).logits, model(images(), ids()).logits)
    with pytest.raises(ArtifactError, match="pass both models"):
        peftc.load(tmp_path / "a")
    with pytest.raises(ArtifactError, match="made for a language model with weights"):
        peftc.load(tmp_path / "a", backbone=peftc.pair(vit(), language("Qwen2")))


def test_the_vision_side_exports_to_onnx(tmp_path: Path) -> None:
    model = compiled()
    result = peftc.export_onnx(model.vision, tmp_path / "vision.onnx")
    assert result.input_names == ["image"] and result.parity is not None and result.parity.ok
    with torch.no_grad():
        assert model.vision(images()).shape == (2, 16, VIT)


def test_training_the_pair_on_captions_lowers_the_loss_below_the_template() -> None:
    """Colour and shape words can only come from the image: the caption template alone allows (ln 4 + ln 3)/4."""
    from peftc.methods.memvp.captions import COLOURS, SHAPES, tiny_pair, train

    encoder, lm = tiny_pair("llama")
    model = peftc.compile("memvp", peftc.pair(encoder, lm), features=48, tokens=32, hidden=32, dropout=0.0)
    losses = train(model, 120, batch=16, lr=3e-2, precision="fp32")
    first, last = sum(losses[:5]) / 5, sum(losses[-10:]) / 10
    template = (math.log(len(COLOURS)) + math.log(len(SHAPES))) / 4
    assert last < template < first


def test_the_recipe_asks_for_amp_and_the_command_line_overrides_it() -> None:
    from peftc.train.recipe import resolve

    train = peftc.load_spec("memvp").train
    assert train is not None and train.precision == "fp16"
    assert resolve(train, {"precision": "bf16"}).precision == "bf16"
