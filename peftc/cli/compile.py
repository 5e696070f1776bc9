"""``peftc compile`` and ``peftc validate``."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Optional

import typer
from rich.markup import escape
from rich.table import Table

from peftc.cli.app import app
from peftc.cli.common import MAX_SEED, console, fmt_int, handle_errors, load_plugins, print_json

if TYPE_CHECKING:
    from peftc.runtime.report import Report

SetOpt = Annotated[
    Optional[list[str]], typer.Option("--set", "-s", help="Override a spec param: name=value (repeatable).")
]
PluginOpt = Annotated[Optional[list[str]], typer.Option("--plugin", help="Import a module that registers blocks.")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print machine-readable JSON.")]


def render_report(report: Report, title: str) -> None:
    table = Table(title=title, title_justify="left", show_header=True, header_style="bold")
    table.add_column("")
    table.add_column("params", justify="right")
    table.add_column("% of backbone", justify="right")
    rows = [
        ("backbone", report.backbone_params),
        ("  of which head", report.backbone_head_params),
        ("added", report.added_params),
        ("removed", report.removed_params),
        ("trainable", report.trainable_params),
        ("per-task state (params + stats)", report.task_params + report.task_buffers),
        ("  without head", report.task_state_without_head),
    ]
    for name, value in rows:
        pct = "" if name == "backbone" else f"{report.percent(value, 'all'):.4f}%"
        table.add_row(name, fmt_int(value), pct)
    table.add_row("", "", f"body: {report.percent(report.task_state_without_head):.4f}%")
    console.print(table)
    rules = Table(title="by rule", title_justify="left", header_style="bold")
    for col in ("rule", "op", "nodes", "added", "removed", "task params", "task stats"):
        rules.add_column(col, justify="left" if col in ("rule", "op") else "right")
    for r in report.rules:
        rules.add_row(r.label, r.op, str(r.nodes), fmt_int(r.added_params), fmt_int(r.removed_params),
                      fmt_int(r.task_params), fmt_int(r.task_buffers))
    console.print(rules)
    for line in report.tracing:
        console.print(f"[dim]{escape(line)}[/]")


@app.command("compile")
@handle_errors
def compile_cmd(
    spec: Annotated[str, typer.Argument(help="Spec file or built-in spec name (see `peftc specs`).")],
    backbone: Annotated[str, typer.Option("--backbone", "-b", help="torchvision name, timm:NAME or hf:NAME.")],
    output: Annotated[Optional[Path], typer.Option("--output", "-o", help="Write the artifact here.")] = None,
    set_: SetOpt = None,
    pretrained: Annotated[bool, typer.Option("--pretrained", help="Download the library's weights.")] = False,
    weights: Annotated[Optional[Path], typer.Option("--weights", help="Local .safetensors/.pt/.pth file.")] = None,
    seed: Annotated[int, typer.Option(
        "--seed", min=0, max=MAX_SEED,
        help="Seed of the random init: the backbone's (when not pretrained) and the inserted blocks'.")] = 0,
    base: Annotated[Optional[Path], typer.Option(
        "--base", help="Attach the spec to this downstream artifact (same backbone): its rules and delta first.")
    ] = None,
    delta: Annotated[Optional[Path], typer.Option(
        "--delta", help="With --base: load the spec's trained tensors from this artifact (e.g. a distilled plugin).")
    ] = None,
    plugin: PluginOpt = None,
    json_: JsonOpt = False,
) -> None:
    """Rewrite a backbone with a spec, report what changed, and optionally save the artifact."""
    import peftc
    from peftc.language import parse_overrides

    load_plugins(plugin)
    if base is not None:
        from peftc.compose import attach

        model = attach(spec, base, delta=delta, backbone=backbone, params=parse_overrides(set_))
    elif delta is not None:
        raise peftc.PeftcError("--delta needs --base (to use an artifact on its own: peftc.load(DIR))")
    else:
        model = peftc.compile(spec, backbone, params=parse_overrides(set_), pretrained=pretrained,
                              weights=weights, seed=seed)
    if output is not None:
        model.save(output)
    if json_:
        out = model.report.to_dict()
        out["params"] = dict(model.spec.values)
        out["artifact"] = str(output) if output else None
        print_json(out)
        return
    render_report(model.report, f"{model.spec.name} on {backbone}")
    if output is not None:
        console.print(f"saved [bold]{output}[/] (peftc.json + delta.safetensors)")


@app.command("validate")
@handle_errors
def validate_cmd(
    spec: Annotated[str, typer.Argument(help="Spec file or built-in spec name.")],
    backbone: Annotated[Optional[str], typer.Option("--backbone", "-b", help="Also compile on this backbone.")] = None,
    set_: SetOpt = None,
    plugin: PluginOpt = None,
    json_: JsonOpt = False,
) -> None:
    """Check a spec (and, with --backbone, that every selector matches) without writing anything."""
    import peftc
    from peftc.language import parse_overrides

    load_plugins(plugin)
    overrides = parse_overrides(set_)
    method = peftc.load_spec(spec, overrides)
    report = peftc.compile(method, backbone).report if backbone else None
    if json_:
        print_json({"spec": method.name, "valid": True, "params": dict(method.values),
                    "rules": [r.label for r in method.rules], "report": report.to_dict() if report else None})
        return
    console.print(f"[green]ok[/] {method.name}: {len(method.rules)} rules, params {dict(method.values)}")
    if report is not None:
        console.print(f"   compiles on {backbone}: {fmt_int(report.trainable_params)} trainable params")
