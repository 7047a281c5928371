"""Terminal output shared by all stages: messages on stderr, progress bars, the JSON summary on stdout.

Library code reports through :func:`info`, :func:`warn` and :func:`progress`; the CLI decides
(``--quiet``, ``--json``) what is shown. Stdout is reserved for the ``--json`` summary, so a
Makefile or script can parse it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import warnings
from collections.abc import Iterator

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    SpinnerColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

stderr = Console(stderr=True, highlight=False, soft_wrap=True)
stdout = Console(highlight=False, soft_wrap=True)
_state: dict[str, bool | str] = {"quiet": False, "muted": False, "hide_warnings": False}
WARNINGS: list[str] = []


def configure(quiet: bool = False, hide_warnings: bool = False) -> None:
    """Set verbosity for this process and silence the libraries' own chatter.

    ``quiet``: no messages or progress; ``hide_warnings`` (``--quiet``): warnings are collected for the
    summary (which counts them) but not printed."""
    _state["quiet"] = quiet
    _state["hide_warnings"] = hide_warnings
    _state["muted"] = False
    WARNINGS.clear()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    for name in ("diffusers", "transformers", "accelerate", "peft", "huggingface_hub"):
        logging.getLogger(name).setLevel(logging.ERROR)
    with contextlib.suppress(Exception):
        import diffusers.utils.logging as dlog

        dlog.set_verbosity_error()
        dlog.disable_progress_bar()
    with contextlib.suppress(Exception):
        import transformers.utils.logging as tlog

        tlog.set_verbosity_error()
        tlog.disable_progress_bar()
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", message=".*torchvision.*")


def quiet() -> bool:
    return bool(_state["quiet"] or _state["muted"])


def mute(label: str) -> None:
    """Print no more messages, warnings, progress or summary from this process: one of several
    processes of a command whose main process reports for all of them. Its errors still show,
    prefixed with ``label`` (e.g. ``process 1``), unless the main process reports the same one."""
    _state["muted"] = label


def muted() -> bool:
    return bool(_state["muted"])


def info(message: str) -> None:
    """A progress message (suppressed by --quiet)."""
    if not quiet():
        stderr.print(message)


def warn(message: str) -> None:
    """A warning: shown (but under --quiet, where the final line counts them), and collected for --json."""
    WARNINGS.append(message)
    if not _state["muted"] and not _state["hide_warnings"]:
        stderr.print(f"[yellow]warning:[/yellow] {message}")


def error(message: str) -> None:
    if _state["muted"]:
        message = f"{_state['muted']}: {message}"
    stderr.print(f"[red]error:[/red] {message}")


@contextlib.contextmanager
def progress(transient: bool = False) -> Iterator[Progress]:
    """A rich progress bar on stderr (disabled under --quiet). Use ``add_task``/``advance``."""
    bar = Progress(
        SpinnerColumn(),
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[status]}"),
        TimeElapsedColumn(),
        TextColumn("eta"),
        TimeRemainingColumn(),
        console=stderr,
        disable=quiet(),
        transient=transient,
    )
    with bar:
        yield bar


def new_task(bar: Progress, description: str, total: float | None) -> int:
    """A task on a progress bar with an empty status field (the columns above expect it)."""
    return bar.add_task(description, total=total, status="")
