"""Deployment backends: fold, ONNX export checked by ONNX Runtime, ONNX Runtime runner, torch.compile, Triton.

    from peftc.export import fold, export_onnx
    folded = fold(model)                      # plain graph + FoldReport (parameter counts, what merged)
    export_onnx(model, "model.onnx")          # folded, dynamic batch, onnx.checker + ORT parity verified
"""

from peftc.export.errors import BackendUnavailable, ExportError, ParityError
from peftc.export.fold import FoldReport, FoldResult, fold
from peftc.export.onnx import ExportResult, export_onnx

__all__ = ["BackendUnavailable", "ExportError", "ExportResult", "FoldReport", "FoldResult", "ParityError",
           "export_onnx", "fold"]
