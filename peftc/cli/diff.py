"""``peftc diff``, ``peftc inspect`` and ``peftc select``: see what a spec does before training with it."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from rich.markup import escape
from rich.table import Table
from rich.tree import Tree

from peftc.cli.app import app
from peftc.cli.common import (
    MAX_IMAGE_SIZE,
    MAX_SEED,
    console,
    err_console,
    fmt_int,
    handle_errors,
    load_plugins,
    print_json,
)
from peftc.errors import PeftcError, did_you_mean

FORMATS = ("text", "json", "dot", "html")
_BY_SUFFIX = {".txt": "text", ".json": "json", ".dot": "dot", ".gv": "dot", ".html": "html", ".htm": "html"}

BackboneOpt = Annotated[Optional[str], typer.Option("--backbone", "-b", help="torchvision name or timm:NAME.")]
SetOpt = Annotated[
    Optional[list[str]], typer.Option("--set", "-s", help="Override a param of the (first) spec: name=value.")
]
ImageOpt = Annotated[
    Optional[int],
    typer.Option("--image-size", min=8, max=MAX_IMAGE_SIZE,
                 help="Example image size for shapes and FLOPs (default: the backbone's)."),
]
SeedOpt = Annotated[int, typer.Option("--seed", min=0, max=MAX_SEED,
                                      help="Seed of the random init (backbone and inserted blocks).")]
PluginOpt = Annotated[Optional[list[str]], typer.Option("--plugin", help="Import a module that registers blocks.")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print machine-readable JSON.")]


def _format(fmt: str | None, output: Path | None, json_: bool) -> str:
    if json_:
        if fmt not in (None, "json"):
            raise PeftcError(f"--json and --format {fmt} contradict each other")
        return "json"
    if fmt is not None:
        if fmt not in FORMATS:
            hint = did_you_mean(fmt, FORMATS)
            raise PeftcError(f"unknown format {fmt!r}{hint}; formats: {', '.join(FORMATS)}")
        return fmt
    if output is not None and output.suffix.lower() in _BY_SUFFIX:
        return _BY_SUFFIX[output.suffix.lower()]
    return "text"


def _check_writable(path: Path) -> None:
    """Fail before the (slow) compile when the output cannot be written."""
    if path.is_dir():
        raise PeftcError(f"cannot write {path}: it is a directory")
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir():
        raise PeftcError(f"cannot write {path}: directory {parent} does not exist")
    if not os.access(parent, os.W_OK) or (path.exists() and not os.access(path, os.W_OK)):
        raise PeftcError(f"cannot write {path}: permission denied")


def _write(path: Path, text: str) -> None:
    from peftc.storage.atomic import write_file

    try:
        write_file(path, text)
    except OSError as exc:
        raise PeftcError(f"cannot write {path}: {exc.strerror or exc}") from None


@app.command("diff")
@handle_errors
def diff_cmd(
    sources: Annotated[
        Optional[list[str]],
        typer.Argument(
            help="SPEC (the backbone against SPEC compiled on it), SPEC_A SPEC_B (two specs on one backbone), "
            "or ARTIFACT_A ARTIFACT_B (two artifact directories; one alone is diffed against its backbone).",
            show_default=False,
        ),
    ] = None,
    backbone: BackboneOpt = None,
    set_: SetOpt = None,
    set_b: Annotated[
        Optional[list[str]], typer.Option("--set-b", help="Override a param of the second spec: name=value.")
    ] = None,
    artifacts: Annotated[
        bool, typer.Option("--artifacts", help="The sources are artifact directories (peftc compile -o).")
    ] = False,
    fmt: Annotated[Optional[str], typer.Option("--format", "-f", help="text, json, dot or html.")] = None,
    output: Annotated[
        Optional[Path], typer.Option("--output", "-o", help="Write to this file (format from its suffix).")
    ] = None,
    image_size: ImageOpt = None,
    graph: Annotated[bool, typer.Option("--graph", help="JSON: also list every node of both graphs.")] = False,
    seed: SeedOpt = 0,
    plugin: PluginOpt = None,
    json_: JsonOpt = False,
) -> None:
    """Show what a spec changes in a backbone: added, removed, replaced and rewired nodes, tensor ownership."""
    import peftc
    from peftc.language import parse_overrides
    from peftc.storage.artifact import MANIFEST

    items = list(sources or [])
    if not items or len(items) > 2:
        raise PeftcError(
            f"diff takes one or two sources, got {len(items)}: SPEC --backbone B, SPEC_A SPEC_B --backbone B, "
            "or --artifacts DIR_A DIR_B"
        )
    kind = _format(fmt, output, json_)
    if output is not None:
        _check_writable(output)
    is_artifact = [Path(s).is_dir() and (Path(s) / MANIFEST).is_file() for s in items]
    if artifacts:
        bad = [s for s, ok in zip(items, is_artifact) if not ok]
        if bad:
            raise PeftcError(f"{bad[0]} is not an artifact directory (no {MANIFEST})")
        if set_ or set_b:
            raise PeftcError("--set/--set-b apply to specs, not to artifacts")
    else:
        for s, ok in zip(items, is_artifact):
            if not ok and Path(s).is_dir():
                raise PeftcError(f"{s} is a directory, not a spec file (and not an artifact: no {MANIFEST})")
        if not all(is_artifact) and backbone is None:
            raise PeftcError("diffing a spec needs --backbone (e.g. --backbone resnet50)")
    if set_b and len(items) < 2:
        raise PeftcError("--set-b applies to the second spec; give two specs")
    load_plugins(plugin)
    result = peftc.diff(
        items[0],
        items[1] if len(items) > 1 else None,
        backbone=backbone,
        params=parse_overrides(set_) if not is_artifact[0] else None,
        params_b=parse_overrides(set_b) if len(items) > 1 and not is_artifact[1] else None,
        image_size=image_size,
        seed=seed,
    )
    if kind == "json":
        text = result.json(include_graph=graph)
    elif kind == "text" and output is None:
        from peftc.tools.render.text import build_tree

        console.print(build_tree(result))
        return
    else:
        text = result.render(kind)
    if output is None:
        typer.echo(text, nl=not text.endswith("\n"))
        return
    _write(output, text)
    counts = ", ".join(f"{len(v)} {k}" for k, v in result.changes.items() if v) or "no changes"
    err_console.print(f"wrote [bold]{escape(str(output))}[/] ({kind}: {counts})")


# -- inspect ----------------------------------------------------------------------------------------------------


def _shape_text(shape: Any) -> str:
    from peftc.analysis.propagation import format_shape

    return format_shape(tuple(shape) if isinstance(shape, list) and shape and isinstance(shape[0], int) else shape)


@app.command("inspect")
@handle_errors
def inspect_cmd(
    backbone: Annotated[str, typer.Argument(help="torchvision name or timm:NAME.")],
    filter_: Annotated[
        Optional[str],
        typer.Option("--filter", help="A selector in YAML flow form: 'type: Linear', '{role: qkv, blocks: \"::2\"}'."),
    ] = None,
    spec: Annotated[
        Optional[str], typer.Option("--spec", help="Inspect the graph after this spec rewrote the backbone.")
    ] = None,
    set_: SetOpt = None,
    image_size: ImageOpt = None,
    seed: SeedOpt = 0,
    plugin: PluginOpt = None,
    json_: JsonOpt = False,
) -> None:
    """List a backbone's selectable nodes: qualified names, types, shapes, parameters, FLOPs, roles."""
    from peftc.language import parse_overrides
    from peftc.tools.inspect import inspect_nodes, parse_selector
    from peftc.tools.view import format_flops

    if set_ and spec is None:
        raise PeftcError("--set applies to --spec; give a spec")
    load_plugins(plugin)
    selector = parse_selector(filter_) if filter_ is not None else None
    rows = inspect_nodes(backbone, selector, spec=spec, params=parse_overrides(set_), image_size=image_size,
                         seed=seed)
    if json_:
        print_json({"backbone": backbone, "spec": spec, "filter": filter_, "count": len(rows),
                    "nodes": [r.to_json() for r in rows]})
        return
    title = f"{backbone}" + (f" rewritten by {spec}" if spec else "") + (f" · filter {filter_}" if filter_ else "")
    table = Table(title=escape(title), title_justify="left", header_style="bold")
    for col, justify in (("name", "left"), ("type", "left"), ("output shape", "left"), ("params", "right"),
                         ("FLOPs", "right"), ("roles", "left")):
        table.add_column(col, justify=justify, no_wrap=col in ("name", "output shape", "params"))  # type: ignore[arg-type]
    for r in rows:
        table.add_row(escape(r.name), escape(r.type), _shape_text(r.shape), fmt_int(r.params) if r.params else "",
                      format_flops(r.flops) if r.flops else "", ", ".join(r.roles))
    console.print(table)
    console.print(f"{len(rows)} node{'s' if len(rows) != 1 else ''} · {fmt_int(sum(r.params for r in rows))} params"
                  f" · {format_flops(sum(r.flops for r in rows))} FLOPs")


# -- select -----------------------------------------------------------------------------------------------------


@app.command("select")
@handle_errors
def select_cmd(
    spec: Annotated[str, typer.Argument(help="Spec file or built-in spec name.")],
    backbone: Annotated[str, typer.Option("--backbone", "-b", help="torchvision name or timm:NAME.")],
    set_: SetOpt = None,
    strict: Annotated[
        bool, typer.Option("--strict", help="Exit 1 when a non-optional selector matches nothing.")
    ] = False,
    seed: SeedOpt = 0,
    plugin: PluginOpt = None,
    json_: JsonOpt = False,
) -> None:
    """Dry run: which nodes each rule's selectors match on the backbone, without rewriting anything.

    Selectors run on the backbone as built, so one that targets nodes an earlier rule inserts matches nothing
    here (it is shown, not fatal, unless --strict).
    """
    from peftc.language import parse_overrides
    from peftc.tools.collapse import collapse
    from peftc.tools.inspect import dry_run

    load_plugins(plugin)
    matches = dry_run(spec, backbone, params=parse_overrides(set_), seed=seed)
    failed = [m for m in matches if m.error and not m.optional]
    if json_:
        print_json({"spec": spec, "backbone": backbone, "rules": [m.to_json() for m in matches],
                    "ok": not failed})
    else:
        root = Tree(f"[bold]{escape(spec)}[/] on [bold]{escape(backbone)}[/] [dim](dry run: nothing rewritten)[/]",
                    guide_style="dim")
        for m in matches:
            key = f"{m.key}: " if m.key else ""
            head = f"[bold]{escape(m.rule)}[/] [dim]({m.op})[/] {escape(key)}{escape(m.selector)}"
            if m.error:
                colour = "yellow" if m.optional else "red"
                note = " (optional)" if m.optional else ""
                root.add(f"{head} → [{colour}]no match{note}[/]: {escape(m.error)}")
                continue
            branch = root.add(f"{head} → [green]{len(m.matches)} node{'s' if len(m.matches) != 1 else ''}[/]")
            if m.selector == "all":
                continue  # every node: listing them says nothing
            pairs = list(zip(m.matches, m.types))
            for f in collapse(pairs, lambda p: p[0], lambda p: p[1])[:40]:
                times = f" ({f.count}×)" if f.count > 1 else ""
                branch.add(f"{escape(f.pattern)} [dim]{escape(f.first[1])}{times}[/]")
            hidden = len(collapse(pairs, lambda p: p[0], lambda p: p[1])) - 40
            if hidden > 0:
                branch.add(f"[dim]… {hidden} more lines (use --json)[/]")
        console.print(root)
    if failed and strict:
        raise typer.Exit(1)
