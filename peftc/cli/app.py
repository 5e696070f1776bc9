"""The typer application every command module registers on."""

import typer

app = typer.Typer(
    name="peftc",
    help="Rewrite vision backbones for parameter-efficient fine-tuning with declarative specs.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
