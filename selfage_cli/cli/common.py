"""Options shared by every command and the one place that turns results and errors into output.

Each command function builds a :class:`Common` from its shared options and hands the library call
to :func:`run`, which prints the summary (text or ``--json``), maps errors to exit codes and hides
tracebacks unless ``--debug``.
"""

from __future__ import annotations

import json
import sys
import traceback
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

import typer

from selfage_cli import console
from selfage_cli.errors import (
    EXIT_INTERNAL,
    EXIT_INTERRUPTED,
    EXIT_USAGE,
    SelfageError,
    environment_error,
    is_out_of_memory,
)
from selfage_cli.project import Project, resolve_project
from selfage_cli.summary import StageSummary

ProjectOpt = Annotated[
    Path | None,
    typer.Option(
        "--project",
        "-p",
        envvar="SELFAGE_PROJECT",
        help="Project folder (default: current folder).",
        show_default=False,
    ),
]
BaseModelOpt = Annotated[
    str | None,
    typer.Option(
        "--base-model",
        help="SD 1.x/2.x Hub id or local diffusers folder "
        "(default: the project's, else stable-diffusion-v1-5/stable-diffusion-v1-5).",
        show_default=False,
    ),
]
EditBaseModelOpt = Annotated[
    str | None,
    typer.Option(
        "--base-model",
        help="SD 1.x/2.x Hub id or local diffusers folder (default: the one the LoRA was trained on, "
        "else the project's, else stable-diffusion-v1-5/stable-diffusion-v1-5).",
        show_default=False,
    ),
]
DeviceOpt = Annotated[str, typer.Option("--device", help="auto, cpu, cuda, cuda:N or mps.")]
DtypeOpt = Annotated[str, typer.Option("--dtype", help="auto (bf16/fp16 on GPU, fp32 on CPU), fp32, fp16 or bf16.")]
EditDtypeOpt = Annotated[
    str,
    typer.Option(
        "--dtype",
        help="How the weights and the LoRA are held: auto (fp32, the fastest setting that keeps the LoRA's "
        "effect in the lora_effect measurement, docs/benchmarks.md), fp32 (LoRA fused), tf32 (CUDA), bf16 "
        "(LoRA branch in bf16), bf16-lora32 (LoRA as an fp32 branch), bf16-fused (fused in fp32, then cast), "
        "fp16, fp16-vae32 (fp32 VAE). See docs/editing.md.",
    ),
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON summary object on stdout.")]
QuietOpt = Annotated[
    bool, typer.Option("--quiet", "-q", help="Print only errors and a one-line summary (with --json: the JSON).")
]
DebugOpt = Annotated[bool, typer.Option("--debug", help="Show tracebacks on errors.")]


@dataclass
class Common:
    """The shared options of one command invocation."""

    command: str  # its name, e.g. "train"
    project: Path | None = None
    base_model: str | None = None
    device: str = "auto"
    dtype: str = "auto"
    json: bool = False
    quiet: bool = False
    debug: bool = False

    @classmethod
    def of(cls, ctx: typer.Context) -> Common:
        """The shared options of the command ``ctx`` runs, read from its parameters (those it has)."""
        params = ctx.params
        return cls(
            command=str(ctx.info_name),
            project=params.get("project"),
            base_model=params.get("base_model"),
            device=params.get("device", "auto"),
            dtype=params.get("dtype", "auto"),
            json=bool(params.get("json_out", False)),
            quiet=bool(params.get("quiet", False)),
            debug=bool(params.get("debug", False)),
        )

    def open_project(self) -> Project:
        return resolve_project(self.project)

    def resolved_base_model(self, project: Project | None = None) -> str:
        """--base-model (a local folder made absolute), else the project's recorded base model, else SD 1.5
        (:func:`selfage_cli.base_model.choose_base_model`: warns when --base-model is not the project's)."""
        from selfage_cli.base_model import choose_base_model

        return choose_base_model(project, self.base_model)

    def given_base_model(self, project: Project | None = None) -> str | None:
        """--base-model as given (a local folder made absolute; with ``project``, a warning when it is not
        the project's base model), or ``None`` when it was left out."""
        from selfage_cli.base_model import choose_base_model

        return choose_base_model(project, self.base_model) if self.base_model else None


def options_given(ctx: typer.Context, names: Iterable[str], *, environment: bool = True) -> list[str]:
    """Of the parameters ``names``, those given on the command line (or, with ``environment``, through an
    environment variable such as ``SELFAGE_DEX_WEIGHTS``) rather than left at their default, in the order asked."""
    given = {"COMMANDLINE", "ENVIRONMENT"} if environment else {"COMMANDLINE"}  # by name: click may be vendored
    return [name for name in names if getattr(ctx.get_parameter_source(name), "name", None) in given]


def run(common: Common, action: Callable[[], StageSummary | None], *, several_processes: bool = False) -> None:
    """Run a library call, print its summary, and exit with 0, 1, 2 or 130.

    ``several_processes``: the call shares its work when started as several processes (accelerate
    launch); other commands refuse to be started that way.
    """
    from selfage_cli.processes import refuse_several

    console.configure(quiet=common.quiet or common.json, hide_warnings=common.quiet)
    try:
        if not several_processes:
            refuse_several(common.command)
        summary = action()
    except SelfageError as exc:
        _fail(common, str(exc), exc.exit_code, exc)
    except KeyboardInterrupt as exc:
        _fail(common, "interrupted.", EXIT_INTERRUPTED, exc)
    except Exception as exc:  # noqa: BLE001 - last resort: one line unless --debug
        environment = environment_error(exc, _project_folder(common))
        if environment is not None:  # a full disk, a read-only folder: the user's environment, not a bug
            _fail(common, str(environment), EXIT_USAGE, exc)
        if is_out_of_memory(exc):
            _fail(
                common,
                f"out of memory ({str(exc).splitlines()[0][:160]}); see the command's --help for "
                "options that use less memory (smaller batches, --max-batch, --gradient-checkpointing).",
                EXIT_USAGE,
                exc,
            )
        _fail(
            common,
            f"internal error ({type(exc).__name__}: {exc}); rerun with --debug for the traceback and report it.",
            EXIT_INTERNAL,
            exc,
        )
    if summary is None or console.muted():  # a muted process: the main process reports
        raise typer.Exit(0 if summary is None else summary.exit_code)
    summary.warnings = list(dict.fromkeys(summary.warnings + console.WARNINGS))
    if common.json:
        sys.stdout.write(json.dumps(summary.to_json(), default=str) + "\n")
    elif common.quiet:
        _print_one_line(summary)
    else:
        _print_summary(summary)
    raise typer.Exit(summary.exit_code)


def _project_folder(common: Common) -> Path | None:
    """The project folder of the command (for messages), or None when it cannot be told."""
    try:
        return common.open_project().root
    except Exception:  # noqa: BLE001 - only for a message
        return None


def _fail(common: Common, message: str, code: int, exc: BaseException) -> None:
    if console.muted() and getattr(exc, "reported_by_main", False):  # the main process prints it
        raise typer.Exit(code)
    if common.debug:
        traceback.print_exception(exc)
    if common.json:
        sys.stdout.write(json.dumps({"ok": False, "exit_code": code, "error": message}) + "\n")
    console.error(message)
    raise typer.Exit(code)


def _print_summary(summary: StageSummary) -> None:
    out = console.stdout
    for line in summary.lines:
        out.print(line)
    for failure in summary.failures:
        out.print(f"[red]failed:[/red] {failure.item}: {failure.reason}")
    if summary.failures:
        out.print(f"[red]{len(summary.failures)} item(s) failed[/red], {len(summary.done)} done.")


def _print_one_line(summary: StageSummary) -> None:
    """--quiet: the failures (errors) and one line counting what was done, skipped, failed and warned."""
    out = console.stdout
    for failure in summary.failures:
        out.print(f"[red]failed:[/red] {failure.item}: {failure.reason}")
    counts = [f"{len(summary.done)} done"]
    if summary.skipped:
        counts.append(f"{len(summary.skipped)} skipped")
    if summary.failures:
        counts.append(f"{len(summary.failures)} failed")
    if summary.warnings:
        counts.append(f"{len(summary.warnings)} warning(s), shown without --quiet")
    out.print(f"{summary.command}: {', '.join(counts)}.")
