"""The ``linear`` block: a classification head built in place of the backbone's own.

A head is a Linear, or a 1×1 convolution where the backbone classifies with one (timm's ``resnetv2``,
SqueezeNet): the new head keeps the kind of layer it replaces, so the code around it (a flatten after the
conv) still fits.
"""

from __future__ import annotations

import torch
from torch import nn

from peftc.blocks.args import LinearHeadArgs
from peftc.blocks.registry import Site, block_factory
from peftc.errors import PeftcError

__all__ = ["head_widths", "make_head"]

_CONVS: dict[int, type[nn.Module]] = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}


def head_widths(module: nn.Module | None) -> tuple[int, int] | None:
    """``(features, classes)`` of a Linear or 1×1 ungrouped conv classifier; None for any other module."""
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    if isinstance(module, nn.modules.conv._ConvNd) and all(k == 1 for k in module.kernel_size) and module.groups == 1:
        return module.in_channels, module.out_channels
    return None


def make_head(in_features: int, classes: int, *, bias: bool | None, init: str, like: nn.Module | None) -> nn.Module:
    """A new head of ``like``'s kind (Linear unless ``like`` is a 1×1 conv); ``init='backbone'`` copies ``like``
    when the shapes match, else default init. ``bias=None`` follows ``like`` (a bias when there is no ``like``)."""
    if bias is None:
        bias = like is None or like.bias is not None
    conv = like if isinstance(like, nn.modules.conv._ConvNd) else None
    head = (_CONVS[len(conv.kernel_size)](in_features, classes, 1, bias=bias) if conv is not None
            else nn.Linear(in_features, classes, bias=bias))
    if like is not None:
        head.to(device=like.weight.device, dtype=like.weight.dtype)
    with torch.no_grad():
        if init == "zeros":
            head.weight.zero_()
            if head.bias is not None:
                head.bias.zero_()
        elif init == "backbone" and like is not None and like.weight.shape == head.weight.shape:
            head.weight.copy_(like.weight)
            if head.bias is not None and like.bias is not None:
                head.bias.copy_(like.bias)
    return head


@block_factory("linear")
def linear(site: Site, args: LinearHeadArgs) -> nn.Module:
    """A linear classifier over the features the original head reads."""
    old = site.module
    widths = head_widths(old)
    if widths is None:
        raise PeftcError(f"{site.name!r} is a {type(old).__name__}, not a Linear or 1×1 conv head")
    classes = args.classes or widths[1]
    if classes == widths[1] and args.init == "backbone" and args.bias in (None, old.bias is not None):
        return old  # same shape: the backbone's head itself, no copy
    return make_head(widths[0], classes, bias=args.bias, init=args.init, like=old)
