"""What every CLI command shares: consoles, error handling (exit 1, no traceback), JSON output."""

from __future__ import annotations

import functools
import json
import sys
from collections.abc import Callable
from typing import Any, TypeVar

import typer
from rich.console import Console

from peftc.errors import PeftcError

# Ranges of the numeric options (checked by the parser: exit 2 with the option's name). Beyond them a run only
# exhausts memory or means nothing.
MAX_BATCH = 4096
MAX_IMAGE_SIZE = 4096
MAX_THREADS = 1024
MAX_SEED = 2**63 - 1
_SIZE_OPTIONS = {"batch": "--batch", "batch_size": "--batch-size", "image_size": "--image-size", "size": "--size",
                 "max_batch": "--max-batch", "set_": "--set"}

console = Console(highlight=False)
err_console = Console(stderr=True, highlight=False)

F = TypeVar("F", bound=Callable[..., Any])


def handle_errors(fn: F) -> F:
    """User errors become one red line on stderr and exit status 1; bugs still show their traceback."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except PeftcError as exc:
            for i, line in enumerate(str(exc).splitlines()):
                err_console.print(f"[bold red]error:[/] {line}" if i == 0 else f"       {line}", markup=True,
                                  soft_wrap=True)
            raise typer.Exit(1) from None
        except KeyboardInterrupt as exc:
            err_console.print("[red]interrupted[/]" + (f" ({exc})" if str(exc) else ""), soft_wrap=True)
            raise typer.Exit(130) from None
        except (MemoryError, RuntimeError) as exc:
            if not isinstance(exc, MemoryError) and not _out_of_memory(str(exc)):
                raise
            given = [f"{flag} {value}" for key, flag in _SIZE_OPTIONS.items() if kwargs.get(key)
                     for value in (kwargs[key] if isinstance(kwargs[key], list) else [kwargs[key]])]
            err_console.print("[bold red]error:[/] out of memory" + (f" with {', '.join(given)}; try smaller values"
                                                                     if given else ""), soft_wrap=True)
            raise typer.Exit(1) from None

    return wrapper  # type: ignore[return-value]


def _out_of_memory(message: str) -> bool:
    return "out of memory" in message.lower() or "can't allocate memory" in message.lower()


def print_json(data: Any) -> None:
    sys.stdout.write(json.dumps(data, indent=2, default=str) + "\n")


def load_plugins(plugins: list[str] | None) -> None:
    from peftc.blocks import load_plugin

    for module in plugins or []:
        load_plugin(module)


def fmt_int(n: int) -> str:
    return f"{n:,}"
