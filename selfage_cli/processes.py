"""Several processes of one command (``accelerate launch`` / ``torchrun``, ``WORLD_SIZE`` > 1).

A stage asks :func:`process_state` once; ``None`` means a single process and every helper here then
does the plain thing. With several processes the main one decides and writes (run names, the manifest,
files), the others follow: :func:`decided_by_main` hands the main process's decision (or its error) to
all, :func:`main_first` lets the main process do shared work before the others look at it, and
:func:`share` gives each process its part of a list and :func:`gathered` brings their summaries
together on the main process, which reports for all (:func:`speak_only_from_main` mutes the others).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

from selfage_cli import console
from selfage_cli.errors import SelfageError
from selfage_cli.summary import StageSummary

T = TypeVar("T")


def launched_processes() -> int:
    """How many processes the launcher started (``WORLD_SIZE``; 1 without a launcher)."""
    return int(os.environ.get("WORLD_SIZE", "1") or 1)


def process_state(device: str | None) -> Any:
    """accelerate's ``PartialState`` when this command runs as several processes, else ``None``.

    Each process then uses its own GPU (``state.device``, ``cuda:LOCAL_RANK``); without CUDA (or with
    ``--device cpu``) the processes share the CPU through gloo, which only makes sense for testing.
    """
    if launched_processes() <= 1:
        return None
    import torch
    from accelerate import PartialState

    return PartialState(cpu=device == "cpu" or not torch.cuda.is_available())


def refuse_several(command: str) -> None:
    """Exit 2 when ``command``, which runs in one process, was started as several (only ``train`` and
    ``edit`` share their work); the other processes stay silent, so the sentence is printed once."""
    if launched_processes() <= 1:
        return
    rank = int(os.environ.get("RANK", "0") or 0)
    if rank != 0:
        console.mute(f"process {rank}")
    raise met_by_all(
        SelfageError(
            f"`selfage {command}` runs in one process, but it was started as {launched_processes()} (accelerate "
            "launch / torchrun); run it without the launcher (only train and edit use several)."
        ),
        main=rank == 0,
    )


def is_main(state: Any) -> bool:
    """Whether this is the process that decides and writes (always, for a single process)."""
    return state is None or bool(state.is_main_process)


def speak_only_from_main(state: Any) -> None:
    """Mute every process but the main one (which reports for all); their own errors still show."""
    if not is_main(state):
        console.mute(f"process {state.process_index}")


def met_by_all(error: SelfageError, *, main: bool) -> SelfageError:
    """``error``, which every process meets alike, marked so that only the main process prints it."""
    error.reported_by_main = not main
    return error


@contextlib.contextmanager
def main_first(state: Any) -> Iterator[None]:
    """The main process runs the block first; the others wait for it, then run it themselves."""
    if state is None:
        yield
        return
    with state.main_process_first():
        yield


def decided_by_main(state: Any, decide: Callable[[], T]) -> T:
    """``decide()`` run on the main process only; every process gets its result or raises its
    :class:`SelfageError` (same type and message), so all of them act on one decision."""
    if state is None:
        return decide()
    from accelerate.utils import broadcast_object_list

    box: list[Any] = [None]
    if state.is_main_process:
        try:
            box = [("value", decide())]
        except SelfageError as exc:
            box = [("error", (type(exc), str(exc)))]
    broadcast_object_list(box, from_process=0)
    kind, value = box[0]
    if kind == "error":
        state.wait_for_everyone()  # every process has it before the main one leaves
        error_type, message = value
        raise met_by_all(error_type(message), main=state.is_main_process)
    return value


def share(items: list[T], state: Any) -> list[T]:
    """This process's part of ``items`` (all of them for a single process)."""
    if state is None or state.num_processes <= 1:
        return items
    with state.split_between_processes(items) as mine:
        return list(mine)


def gathered(summary: StageSummary, state: Any) -> StageSummary | None:
    """On the main process, one summary of what every process did (its own first); ``None`` on the
    others. Each process's warnings travel with its summary."""
    if state is None:
        return summary
    from accelerate.utils import gather_object

    summary.warnings = list(dict.fromkeys(summary.warnings + console.WARNINGS))
    summaries = gather_object([summary])
    if not state.is_main_process:
        return None
    merged = summaries[0]
    for other in summaries[1:]:
        merged.merge(other)
    return merged
