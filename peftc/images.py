"""Decoding any image a user hands peftc (training data, ``peftc run --input``) to 8-bit RGB, correctly.

PIL's ``convert("RGB")`` clips 16-bit and 32-bit integer and float images instead of scaling them, so a 16-bit
PNG or a float TIFF would arrive almost all white — silently wrong data. One function does it right for both.
"""

from __future__ import annotations

from typing import Any

__all__ = ["to_rgb"]


def to_rgb(image: Any) -> Any:
    """RGB at 8 bits. 16-bit and 32-bit integer images are scaled from their full range and float images from
    [0, 1] (PIL's own ``convert("RGB")`` clips them, turning most pixels white)."""
    from PIL import Image

    if image.mode not in ("I", "F") and not image.mode.startswith("I;16"):
        return image.convert("RGB")
    import numpy as np

    values = np.asarray(image, dtype=np.float64)
    if image.mode == "F":
        scaled = values * 255.0 if values.size and np.nanmax(values) <= 1.0 else values
    else:
        scaled = values / 257.0 if values.size and values.max() <= 65535 else values / 16843009.0
    gray = np.clip(np.nan_to_num(scaled), 0, 255).round().astype(np.uint8)
    return Image.fromarray(gray).convert("RGB")
