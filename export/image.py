"""Reading an image for classification: pillow, the backbone's own eval transform (resize, centre crop, normalise)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from peftc.export.errors import ExportError
from peftc.images import to_rgb

__all__ = ["load_image", "normalisation", "top_k"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def normalisation(backbone: str) -> tuple[tuple[float, ...], tuple[float, ...], float]:
    """(mean, std, crop fraction) the backbone was trained with: timm's pretrained config, else ImageNet's."""
    if backbone.startswith("timm:"):
        try:
            import timm

            cfg = timm.get_pretrained_cfg(backbone[5:])
        except Exception:
            cfg = None
        if cfg is not None:
            return tuple(cfg.mean), tuple(cfg.std), float(cfg.crop_pct or 0.875)
    return IMAGENET_MEAN, IMAGENET_STD, 0.875


def load_image(path: str | Path, size: tuple[int, int], backbone: str = "") -> torch.Tensor:
    """A ``1×3×H×W`` float tensor: shorter side resized to size/crop, centre crop to ``size``, normalised."""
    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    if not path.is_file():
        raise ExportError(f"image not found: {path}")
    try:
        with Image.open(path) as img:
            image = to_rgb(img)
    except (UnidentifiedImageError, OSError) as exc:
        raise ExportError(f"cannot read image {path}: {exc}") from None
    mean, std, crop = normalisation(backbone)
    height, width = size
    scale = max(height, width) / crop / min(image.size)
    resized = image.resize((max(width, round(image.size[0] * scale)), max(height, round(image.size[1] * scale))),
                           Image.Resampling.BICUBIC)
    left = (resized.size[0] - width) // 2
    top = (resized.size[1] - height) // 2
    cropped = resized.crop((left, top, left + width, top + height))
    array = np.asarray(cropped, dtype=np.float32) / 255.0
    array = (array - np.asarray(mean, dtype=np.float32)) / np.asarray(std, dtype=np.float32)
    return torch.from_numpy(array.transpose(2, 0, 1).copy()).unsqueeze(0)


def top_k(logits: torch.Tensor | np.ndarray, k: int = 5) -> list[tuple[int, float]]:
    """(class index, probability) of the ``k`` most likely classes of one sample."""
    row = torch.as_tensor(np.asarray(logits)).reshape(-1).float()
    probs = torch.softmax(row, dim=0)
    values, indices = probs.topk(min(k, probs.numel()))
    return [(int(i), float(v)) for v, i in zip(values, indices, strict=True)]
