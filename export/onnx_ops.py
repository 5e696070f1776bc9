"""ONNX translations for ATen ops the dynamo exporter's built-in table lacks.

``aten.sort.stable`` (``torch.sort(..., stable=True)`` / ``torch.argsort(..., stable=True)``, which ToMe's
bipartite matching uses) maps to ONNX ``TopK`` over the whole axis: ONNX specifies that TopK breaks ties by the
lower index first, which is exactly a stable sort in either direction.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

__all__ = ["custom_translations"]


def _aten_sort_stable(self: Any, stable: bool | None = None, dim: int = -1, descending: bool = False) -> Any:
    from onnxscript import opset18 as op

    size = op.Shape(self, start=dim) if dim == -1 else op.Shape(self, start=dim, end=dim + 1)
    values, indices = op.TopK(self, size, axis=dim, largest=1 if descending else 0, sorted=1)
    return values, indices


def custom_translations() -> dict[Any, Callable[..., Any]]:
    """The table to pass as ``torch.onnx.export(..., custom_translation_table=...)``."""
    return {torch.ops.aten.sort.stable: _aten_sort_stable}
