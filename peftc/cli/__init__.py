"""The ``peftc`` command line: one module per command group, all registered on :data:`app`."""

from peftc.cli import catalog, compile, diff, export, split, train  # noqa: F401  (command registration)
from peftc.cli.app import app


def main() -> None:
    app()


__all__ = ["app", "main"]
