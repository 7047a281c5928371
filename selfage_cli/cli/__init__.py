"""The ``selfage`` command line: a thin Typer layer over the library (one module per stage)."""

from __future__ import annotations

import typer

from selfage_cli import __version__

app = typer.Typer(
    name="selfage",
    help=(
        "Personalised facial age transformation (SelfAge): align your photos, label their ages, "
        "fine-tune Stable Diffusion with LoRA on them, then edit any photo of you to any age.\n\n"
        "Typical use:  selfage train --refs ./me -p proj  then  selfage edit photo.jpg --ages 0,20,80 "
        "--side-by-side -p proj"
    ),
    no_args_is_help=True,
    rich_markup_mode="rich",
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"selfage {__version__}")
        raise typer.Exit(0)


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version."),
) -> None:
    """selfage: personalised facial age transformation."""


def _register() -> None:
    from selfage_cli.cli import ages, align, edit, evaluate, tools, train

    for module in (align, ages, train, edit, evaluate, tools):
        module.register(app)


_register()


def main() -> None:
    app()
