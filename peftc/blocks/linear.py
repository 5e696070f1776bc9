"""The ``linear`` block: a classification head built in place of the backbone's own."""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn

from peftc.blocks.registry import BlockArgs, Site, register_block
from peftc.errors import PeftcError


class LinearHeadArgs(BlockArgs):
    classes: int | None = None
    bias: bool = True
    init: Literal["backbone", "default", "zeros"] = "backbone"


def make_head(in_features: int, classes: int, *, bias: bool, init: str, like: nn.Module | None) -> nn.Linear:
    """A new ``nn.Linear`` head; ``init='backbone'`` copies ``like`` when its shape matches, else default init."""
    head = nn.Linear(in_features, classes, bias=bias)
    if like is not None:
        head.to(device=like.weight.device, dtype=like.weight.dtype)
    with torch.no_grad():
        if init == "zeros":
            head.weight.zero_()
            if head.bias is not None:
                head.bias.zero_()
        elif init == "backbone" and isinstance(like, nn.Linear) and like.weight.shape == head.weight.shape:
            head.weight.copy_(like.weight)
            if head.bias is not None and like.bias is not None:
                head.bias.copy_(like.bias)
    return head


@register_block("linear", args=LinearHeadArgs, suffix="head")
def linear(site: Site, args: LinearHeadArgs) -> nn.Linear:
    """A linear classifier over the features the original head reads."""
    old = site.module
    if not isinstance(old, nn.Linear):
        raise PeftcError(f"{site.name!r} is a {type(old).__name__}, not a Linear head")
    classes = args.classes or old.out_features
    if classes == old.out_features and args.init == "backbone" and args.bias == (old.bias is not None):
        return old  # same shape: the backbone's head itself, no copy
    return make_head(old.in_features, classes, bias=args.bias, init=args.init, like=old)
