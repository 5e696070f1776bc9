"""The ``peftc`` command line: one module per command group, all registered on :data:`app`."""

from . import catalog, compile, diff, export, train  # noqa: F401  (command registration)
from .app import app


def main() -> None:
    app()


__all__ = ["app", "main"]
