"""Exceptions that the CLI turns into one-sentence messages and exit codes.

Exit codes: 0 everything done, 1 some items failed (the rest done), 2 usage or input error,
3 internal error (a bug: rerun with --debug and report it), 130 interrupted (a checkpoint was written
where one applies).
"""

from __future__ import annotations

EXIT_OK = 0
EXIT_PARTIAL = 1
EXIT_USAGE = 2
EXIT_INTERNAL = 3
EXIT_INTERRUPTED = 130


class SelfageError(Exception):
    """A problem the user can fix: the message names the file or option and the fix."""

    exit_code = EXIT_USAGE
    # Set on the other processes of a multi-process command when the main process reports the same error.
    reported_by_main = False


class ManifestError(SelfageError):
    """The project's manifest is malformed, of an unknown version, or names a path outside the project."""


class ModelNotFoundError(SelfageError):
    """A base model, LoRA or checkpoint could not be found or loaded."""


class InterruptedRun(SelfageError):
    """A long run was interrupted (Ctrl-C) after saving what it could."""

    exit_code = EXIT_INTERRUPTED


def is_out_of_memory(exc: BaseException) -> bool:
    """Whether an exception is a CUDA/MPS/CPU out-of-memory error (torch raises several kinds)."""
    import torch

    return isinstance(exc, torch.OutOfMemoryError) or "out of memory" in str(exc).lower()
