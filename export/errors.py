"""Errors of the deployment backends: user-facing (exit 1 in the CLI), each with one clear message."""

from __future__ import annotations

from peftc.errors import PeftcError

__all__ = ["BackendUnavailable", "ExportError", "ParityError"]


class ExportError(PeftcError):
    """An export cannot be written or checked (bad path, exporter failure, invalid ONNX graph)."""


class ParityError(ExportError):
    """The exported graph does not compute what the eager model computes (beyond the tolerance)."""


class BackendUnavailable(PeftcError):
    """A requested backend (torch.compile/inductor, an ONNX Runtime provider) cannot run on this machine."""
