"""peftc: a declarative graph compiler that rewrites vision backbones for parameter-efficient fine-tuning.

    import peftc
    model = peftc.compile("clr", "resnet50")          # a built-in spec on a torchvision backbone
    model.add_task("birds", num_classes=200); model.set_task("birds")
    ...train model.trainable_parameters() in any loop...
    model.save("out/clr-birds")
    again = peftc.load("out/clr-birds")

``import peftc`` is lazy: the public names below import their stage (and torch) on first use.
"""

from __future__ import annotations

import importlib
from typing import Any

from peftc.errors import PeftcError
from peftc.version import __version__

# public name -> (module, attribute); resolved on first access (PEP 562)
_API = {
    "compile": ("peftc.compiler", "compile"),
    "pair": ("peftc.compiler", "pair"),
    "load": ("peftc.compiler", "load"),
    "load_spec": ("peftc.language.loader", "load_spec"),
    "diff": ("peftc.tools.diff", "diff"),
    "export_onnx": ("peftc.export.onnx", "export_onnx"),
}


def __getattr__(name: str) -> Any:
    if name not in _API:
        raise AttributeError(f"module 'peftc' has no attribute {name!r}")
    module, attr = _API[name]
    value = getattr(importlib.import_module(module), attr)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_API})


__all__ = ["PeftcError", "__version__", "compile", "diff", "export_onnx", "load", "load_spec", "pair"]
