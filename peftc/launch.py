"""The ``peftc`` command's entry point: a Ctrl-C at any moment ends with one line and exit status 130.

It imports nothing heavy itself. A Ctrl-C that lands while a module is being imported (torch and numpy load for
seconds) does not raise KeyboardInterrupt there: some libraries catch it during their import and leave a
half-initialised module behind, which then fails later with an unrelated error. The process exits at once
instead; whatever it was writing is staged and swept later (:mod:`peftc.storage.atomic`). Everywhere else
Ctrl-C is the usual KeyboardInterrupt, which the commands turn into the same one line.
"""

import os
import signal
import sys
from types import FrameType


def _importing(frame: FrameType | None) -> bool:
    while frame is not None:
        if frame.f_code.co_filename.startswith("<frozen importlib"):
            return True
        frame = frame.f_back
    return False


def _on_interrupt(signum: int, frame: FrameType | None) -> None:
    if _importing(frame):
        sys.stderr.write("interrupted\n")
        sys.stderr.flush()
        os._exit(130)
    raise KeyboardInterrupt


def install_interrupt_handler() -> None:
    """Route Ctrl-C through :func:`_on_interrupt` (unless it is ignored, as for background jobs)."""
    if signal.getsignal(signal.SIGINT) is signal.default_int_handler:
        signal.signal(signal.SIGINT, _on_interrupt)


def main() -> None:
    try:
        install_interrupt_handler()
        from peftc.cli import main as cli_main

        cli_main()
    except KeyboardInterrupt as exc:
        sys.stderr.write("interrupted" + (f" ({exc})" if str(exc) else "") + "\n")
        raise SystemExit(130) from None
