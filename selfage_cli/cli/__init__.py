"""The ``selfage`` command line: a thin Typer layer over the library (one module per stage)."""

from __future__ import annotations

import inspect

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


def help_text(doc: str) -> str:
    """A command's docstring as its help: each prose paragraph on one line, for the terminal to wrap
    at its width (Typer keeps the source's line breaks, which breaks every line twice on an 80-column
    terminal); indented paragraphs (the examples) kept line by line."""
    paragraphs = inspect.cleandoc(doc).split("\n\n")
    return "\n\n".join(
        paragraph if paragraph.startswith(" ") else " ".join(line.strip() for line in paragraph.splitlines())
        for paragraph in paragraphs
    )


def _register() -> None:
    from selfage_cli.cli import ages, align, edit, evaluate, tools, train

    for module in (align, ages, train, edit, evaluate, tools):
        module.register(app)
    for command in app.registered_commands:
        if command.help is None and command.callback is not None and command.callback.__doc__:
            command.help = help_text(command.callback.__doc__)


_register()


def main() -> None:
    app()
