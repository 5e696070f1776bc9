"""The ``peftc`` command's entry point. It imports nothing itself, so a Ctrl-C at any moment — while the CLI
and torch are still importing, too — ends with one line and exit status 130, never a traceback."""

import sys


def main() -> None:
    try:
        from peftc.cli import main as cli_main

        cli_main()
    except KeyboardInterrupt as exc:
        sys.stderr.write("interrupted" + (f" ({exc})" if str(exc) else "") + "\n")
        raise SystemExit(130) from None
