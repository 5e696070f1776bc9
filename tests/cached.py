"""Backbones shared by the tests, built once per test session.

Building a randomly initialised ViT-B costs seconds on a small CPU (timm's truncated-normal init of 86M
weights), and many tests need the same few backbones. ``peftc.compile`` works on a private deep copy of a module
and never modifies the module it is given, so one build serves every test as compile input and as the untouched
reference. Pass ``backbone(name).module`` (or :func:`module`), never the :class:`Backbone` itself: a Backbone is
rewritten in place.
"""

from __future__ import annotations

from functools import cache

import torch
from torch import nn

from peftc.analysis.backbones import Backbone, build_backbone


@cache
def backbone(name: str, **kwargs: object) -> Backbone:
    return build_backbone(name, **kwargs)


def module(name: str, img_size: int | None = None, **kwargs: object) -> nn.Module:
    """The cached backbone's module (timm ViTs optionally built for ``img_size`` inputs, other builder arguments
    in ``kwargs``), in eval mode."""
    return backbone(name, **({"img_size": img_size} if img_size is not None else {}), **kwargs).module


@cache
def image(size: int = 224, batch: int = 1) -> torch.Tensor:
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(123))


@cache
def reference_output(name: str) -> torch.Tensor:
    """The untouched backbone's output on :func:`image`."""
    with torch.no_grad():
        return backbone(name).module.eval()(image())


def vit_b_skeleton() -> Backbone:
    """A fresh timm ViT-B/16 with all-zero weights, for counts and sizes that need construction only.

    Built on the meta device and materialised as zeros: no random init, no copy — a few times
    cheaper than a real build. Passed to ``peftc.compile`` as a Backbone, it is rewritten in place, so every
    call returns a new one.
    """
    import timm

    with torch.device("meta"):
        module = timm.create_model("vit_base_patch16_224")
    module = module.to_empty(device="cpu").eval()
    with torch.no_grad():
        for tensor in (*module.parameters(), *module.buffers()):
            tensor.zero_()
    return Backbone("timm:vit_base_patch16_224", module, "module", None, None, (3, 224, 224))  # hashed only if saved


def small_vit(name: str = "timm:vit_tiny_patch16_224", size: int = 64) -> Backbone:
    """A timm ViT built for ``size``×``size`` inputs (a 4×4 patch grid at 64): cheap to train in tests."""
    return backbone(name, img_size=size)
