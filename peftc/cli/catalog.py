"""``peftc specs`` and ``peftc backbones``: what can be compiled."""

from __future__ import annotations

from typing import Annotated, Optional

import typer
from rich.table import Table

from peftc.cli.app import app
from peftc.cli.common import console, handle_errors, print_json


@app.command("specs")
@handle_errors
def specs_cmd(json_: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False) -> None:
    """List the built-in method specs with one-line summaries."""
    from peftc.language import builtin_specs, iter_builtin_summaries

    rows = list(iter_builtin_summaries())
    if json_:
        files = builtin_specs()
        print_json([{"name": n, "summary": s, "file": str(files[n])} for n, s in rows])
        return
    table = Table(header_style="bold")
    table.add_column("spec")
    table.add_column("summary")
    for name, summary in rows:
        table.add_row(name, summary)
    console.print(table)


@app.command("backbones")
@handle_errors
def backbones_cmd(
    pattern: Annotated[str, typer.Argument(help="Glob or substring, e.g. 'vit*' or 'resnet'.")] = "",
    library: Annotated[Optional[str], typer.Option("--library", help="torchvision or timm.")] = None,
    limit: Annotated[int, typer.Option("--limit", min=0, help="Show at most this many (0 = all).")] = 50,
    json_: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """List backbone ids (torchvision names and timm:NAME) matching a pattern."""
    from peftc.analysis.backbones import list_backbones
    from peftc.errors import PeftcError

    if library not in (None, "torchvision", "timm"):
        raise PeftcError(f"--library must be torchvision or timm, got {library!r}")
    names = list_backbones(pattern, library)
    if json_:
        print_json(names if not limit else names[:limit])
        return
    for name in names[: limit or None]:
        console.print(name)
    if limit and len(names) > limit:
        console.print(f"[dim]… {len(names) - limit} more (use --limit 0)[/]")
