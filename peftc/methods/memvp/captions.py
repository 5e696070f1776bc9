"""A runnable MemVP example: synthetic image–caption pairs, and the compiled pair trained on them.

    python -m peftc.methods.memvp.captions [--steps 300] [--batch 16] [--lm llama|qwen2] [--precision bf16]

Each image is a coloured shape on a noisy dark background; its caption names both ("a red disc"), so the
language model can only predict the colour and shape words from the image, through MemVP's FFN memory: the
caption's template alone ("<bos> a ? ? <eos>") gets the loss down to (ln 4 + ln 3) / 4 = 0.62, the images below. A tiny
CLIP-style timm ViT (random init) and a tiny HF decoder (``LlamaForCausalLM`` or ``Qwen2ForCausalLM``, random
init, frozen) are paired with :func:`peftc.pair` and compiled with the ``memvp`` spec; training follows the spec's
``train:`` recipe (AdamW β (0.9, 0.95), wd 0.02, warm-up then cosine, its ``precision``) at a learning rate
suited to a few hundred steps. On one CPU thread 300 steps take about 5 s; the loss falls from ~2.5 to ~0.3.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable

import torch
from torch import nn

WORDS = ("<pad>", "<bos>", "<eos>", "a")
COLOURS = {"red": (1.0, 0.1, 0.1), "green": (0.1, 1.0, 0.1), "blue": (0.2, 0.3, 1.0), "yellow": (1.0, 1.0, 0.1)}
SHAPES = ("square", "disc", "bar")
VOCAB = (*WORDS, *COLOURS, *SHAPES)
IMAGE = 32

__all__ = ["VOCAB", "captions", "tiny_pair", "train"]


def _mask(shape: str, size: int, cy: int, cx: int, r: int) -> torch.Tensor:
    y, x = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    if shape == "square":
        return ((y - cy).abs() <= r) & ((x - cx).abs() <= r)
    if shape == "disc":
        return (y - cy) ** 2 + (x - cx) ** 2 <= r * r
    return ((y - cy).abs() <= r // 3) & ((x - cx).abs() <= r + 3)  # a horizontal bar


def captions(n: int, *, seed: int = 0, size: int = IMAGE) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` images ``(n, 3, size, size)`` and their captions as token ids ``(n, 5)``: <bos> a COLOUR SHAPE <eos>."""
    gen = torch.Generator().manual_seed(seed)
    images = 0.1 * torch.rand(n, 3, size, size, generator=gen)
    ids = torch.empty(n, 5, dtype=torch.long)
    colours = list(COLOURS)
    for i in range(n):
        colour = colours[int(torch.randint(len(colours), (1,), generator=gen))]
        shape = SHAPES[int(torch.randint(len(SHAPES), (1,), generator=gen))]
        r = int(torch.randint(size // 6, size // 4, (1,), generator=gen))
        cy, cx = (int(v) for v in torch.randint(r + 1, size - r - 1, (2,), generator=gen))
        images[i][:, _mask(shape, size, cy, cx, r)] = torch.tensor(COLOURS[colour])[:, None]
        ids[i] = torch.tensor([VOCAB.index(w) for w in ("<bos>", "a", colour, shape, "<eos>")])
    return (images - 0.5) / 0.5, ids


def tiny_pair(lm: str = "llama", *, seed: int = 0, width: int = 64, layers: int = 2,
              init: float = 0.1) -> tuple[nn.Module, nn.Module]:
    """A tiny CLIP-style timm ViT and a tiny HF decoder LM (random init, eval mode).

    The LM's weights are drawn with std ``init`` (transformers' ``initializer_range``, 0.02 by default): its frozen
    head then has the scale a pretrained one has, so it can be confident; at 0.02 the logits of a random head
    span too little for the loss to fall far, whatever the memory writes."""
    import timm
    import transformers

    torch.manual_seed(seed)
    vit = timm.create_model("vit_base_patch16_clip_224", pretrained=False, depth=3, embed_dim=48, num_heads=4,
                            patch_size=8, img_size=IMAGE, num_classes=0)
    family = {"llama": ("LlamaConfig", "LlamaForCausalLM"), "qwen2": ("Qwen2Config", "Qwen2ForCausalLM")}[lm]
    config = getattr(transformers, family[0])(hidden_size=width, intermediate_size=2 * width, num_hidden_layers=layers,
                                              num_attention_heads=4, num_key_value_heads=2, vocab_size=len(VOCAB),
                                              initializer_range=init)
    return vit.eval(), getattr(transformers, family[1])(config).eval()


def train(model: nn.Module, steps: int, *, batch: int = 16, lr: float = 3e-2, precision: str | None = None,
          seed: int = 0, log: Callable[[int, float], None] | None = None) -> list[float]:
    """Train ``model`` (a compiled pair, on its device) on fresh caption batches with its spec's recipe (its
    ``precision`` unless ``precision`` overrides it: fp16 autocast with loss scaling needs CUDA); every step's loss."""
    from peftc.train.precision import Precision
    from peftc.train.recipe import LRSchedule, build_optimizer, resolve

    device = next(model.language.parameters()).device
    recipe = resolve(model.spec.train, {"batch_size": batch, **({"precision": precision} if precision else {})})
    numerics = Precision(recipe.precision, device)
    optimizer = build_optimizer(model.trainable_parameters(), recipe, lr)
    warmup = recipe.scheduler.warmup_epochs / recipe.epochs  # the recipe's share of warm-up, over `steps`
    schedule = LRSchedule(optimizer, recipe.scheduler.model_copy(update={"warmup_epochs": warmup * steps}), 1, steps)
    model.train()
    losses = []
    for step in range(steps):
        images, ids = (t.to(device) for t in captions(batch, seed=seed * 100_003 + step))
        with numerics.autocast():
            loss = model(images, ids, labels=ids).loss
        numerics.backward(loss)
        numerics.step(optimizer)
        optimizer.zero_grad(set_to_none=True)
        schedule.step()
        losses.append(float(loss.detach()))
        if log is not None:
            log(step, losses[-1])
    model.eval()
    return losses


def main(argv: list[str] | None = None) -> list[float]:
    import peftc

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--lr", type=float, default=3e-2)
    parser.add_argument("--lm", choices=("llama", "qwen2"), default="llama")
    parser.add_argument("--precision", choices=("fp32", "bf16", "fp16"), default=None,
                        help="overrides the recipe's (fp16 needs CUDA; this example runs on CPU: default fp32)")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads (tiny models run fastest on one)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    vit, lm = tiny_pair(args.lm)
    model = peftc.compile("memvp", peftc.pair(vit, lm), features=48, tokens=32, hidden=32, dropout=0.0)
    print(f"{type(lm).__name__} + CLIP ViT, MemVP: {model.trainable_params:,} trainable parameters "
          f"(chance loss ln {len(VOCAB)} = {math.log(len(VOCAB)):.2f})")
    every = max(1, args.steps // 10)
    losses = train(model, args.steps, batch=args.batch, lr=args.lr, precision=args.precision or "fp32",
                   log=lambda s, v: print(f"step {s:4d}  loss {v:.3f}") if s % every == 0 else None)
    print(f"loss {sum(losses[:10]) / 10:.3f} (first 10 steps) -> {sum(losses[-10:]) / 10:.3f} (last 10); the "
          f"caption template alone: {(math.log(len(COLOURS)) + math.log(len(SHAPES))) / 4:.3f}")
    return losses


if __name__ == "__main__":
    main()
