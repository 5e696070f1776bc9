"""peftc: a declarative graph compiler that rewrites vision backbones for parameter-efficient fine-tuning.

    import peftc
    model = peftc.compile("clr", "resnet50")          # a built-in spec on a torchvision backbone
    model.add_task("birds", num_classes=200); model.set_task("birds")
    ...train model.trainable_parameters() in any loop...
    model.save("out/clr-birds")
    again = peftc.load("out/clr-birds")
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"

# importing the function binds ``peftc.tools.diff`` to it, not to the module of the same name
from peftc.errors import PeftcError
from peftc.language import load_spec
from peftc.tools.diff import diff


def compile(*args: Any, **kwargs: Any) -> Any:
    """Rewrite a backbone with a spec; see :func:`peftc.compiler.compile`."""
    from peftc.compiler import compile as _compile

    return _compile(*args, **kwargs)


def load(*args: Any, **kwargs: Any) -> Any:
    """Rebuild a compiled model from an artifact directory; see :func:`peftc.storage.artifact.load`."""
    from peftc.storage.artifact import load as _load

    return _load(*args, **kwargs)


def export_onnx(*args: Any, **kwargs: Any) -> Any:
    """Export a compiled model or artifact to ONNX, verified by ONNX Runtime; see :func:`peftc.export.export_onnx`."""
    from peftc.export import export_onnx as _export_onnx

    return _export_onnx(*args, **kwargs)


__all__ = ["PeftcError", "__version__", "compile", "diff", "export_onnx", "load", "load_spec"]
