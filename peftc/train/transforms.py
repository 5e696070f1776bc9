"""Standard image transforms at the backbone's input size, normalised with the backbone's own statistics.

``standard`` is the ImageNet recipe (RandomResizedCrop + horizontal flip; evaluation resizes to size/0.875 and
centre-crops). ``light`` keeps the whole image (resize, padded random crop) for small or centred images such as
digits; ``none`` trains on exactly what evaluation sees. Mean and std come from timm's pretrained config for
``timm:`` backbones, else ImageNet's (torchvision's classification models all use them).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "backbone_stats", "eval_transform", "train_transform"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def backbone_stats(backbone_id: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """(mean, std) the backbone's pretrained weights expect."""
    if backbone_id.startswith("timm:"):
        try:
            import timm

            cfg = timm.get_pretrained_cfg(backbone_id[5:])
        except Exception:  # an unknown tag or an older timm: fall back to ImageNet statistics
            cfg = None
        if cfg is not None and getattr(cfg, "mean", None) and getattr(cfg, "std", None):
            return tuple(cfg.mean), tuple(cfg.std)
    return IMAGENET_MEAN, IMAGENET_STD


def _finish(steps: list[Any], mean: tuple[float, ...], std: tuple[float, ...]) -> Callable[[Any], torch.Tensor]:
    from torchvision import transforms as T

    return T.Compose([*steps, T.ToTensor(), T.Normalize(mean, std)])


Stats = tuple[float, ...]


def train_transform(size: int, augment: str, mean: Stats, std: Stats) -> Callable[[Any], torch.Tensor]:
    from torchvision import transforms as T

    if augment == "standard":
        steps = [T.RandomResizedCrop(size, antialias=True), T.RandomHorizontalFlip()]
    elif augment == "light":
        steps = [T.Resize(size, antialias=True), T.CenterCrop(size), T.RandomCrop(size, padding=max(1, size // 8))]
    elif augment == "none":
        steps = [T.Resize(size, antialias=True), T.CenterCrop(size)]
    else:
        raise ValueError(f"unknown augment {augment!r}")
    return _finish(steps, mean, std)


def eval_transform(size: int, augment: str, mean: Stats, std: Stats) -> Callable[[Any], torch.Tensor]:
    from torchvision import transforms as T

    resize = round(size / 0.875) if augment == "standard" else size
    return _finish([T.Resize(resize, antialias=True), T.CenterCrop(size)], mean, std)
