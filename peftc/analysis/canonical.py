"""Canonicalisation: rewrite library-specific layers into forms every spec can see, before tracing.

Today this means attention. torchvision's ``nn.MultiheadAttention`` hides q, k and v inside
``in_proj_weight``, so ``role: qkv`` would find nothing on ``vit_b_16`` while it finds ``attn.qkv`` on every
timm ViT. Each convertible ``nn.MultiheadAttention`` becomes :class:`peftc.analysis.attention.SelfAttention`,
which holds the very same Parameter objects as ``qkv``/``proj`` Linears, computes the same function, and is
traced through.

It runs on peftc's private copy of the backbone, after its weight hash is taken (the hash identifies the
backbone as the library builds it) and before tracing.
"""

from __future__ import annotations

from torch import nn

from peftc.analysis.attention import SelfAttention, can_convert

__all__ = ["canonicalize"]


def canonicalize(module: nn.Module) -> list[str]:
    """Replace every convertible ``nn.MultiheadAttention`` in ``module`` in place; returns their paths.

    Attention that cannot be reproduced exactly (not batch-first, different key/value dims, ``bias_k``,
    ``add_zero_attn``) is left as it is: it stays one opaque node, which is correct, only less selectable.
    """
    targets = [(path, m) for path, m in module.named_modules() if path and can_convert(m)]
    for path, mha in targets:
        module.set_submodule(path, SelfAttention.from_multihead(mha))
    return [path for path, _ in targets]
