"""Exceptions that the CLI turns into one-sentence messages and exit codes.

A full disk, a read-only folder or a denied write is the user's environment, not a bug:
:func:`environment_error` turns it into one sentence naming the folder and the fix (exit 2).

Exit codes: 0 everything done, 1 some items failed (the rest done), 2 usage or input error,
3 internal error (a bug: rerun with --debug and report it), 130 interrupted (a checkpoint was written
where one applies).
"""

from __future__ import annotations

import errno
import os
from collections.abc import Iterator
from typing import Any

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


# ---- the user's environment: a full disk, a read-only folder, no permission --------------------------
_FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
_READ_ONLY = (errno.EROFS,)
_DENIED = (errno.EACCES, errno.EPERM)
# The same conditions as worded by libraries that report them without an OSError (Rust's safetensors, C++).
_TEXT_ERRNO = (
    ("no space left on device", errno.ENOSPC),
    ("os error 28", errno.ENOSPC),
    ("disk quota exceeded", errno.EDQUOT),
    ("read-only file system", errno.EROFS),
    ("os error 30", errno.EROFS),
)


def environment_error(exc: BaseException, folder: Any = None) -> SelfageError | None:
    """The one-sentence exit-2 error for a full disk, a read-only folder or a denied write, found anywhere in
    ``exc``'s chain (``__cause__``/``__context__``); ``None`` for any other error.

    ``folder``: named when the error carries no file name (a write to an open file), e.g. the project folder.
    """
    for current in exception_chain(exc):
        code, filename = _errno_of(current)
        if code is not None:
            return SelfageError(_environment_sentence(code, filename or folder))
    return None


def exception_chain(exc: BaseException) -> Iterator[BaseException]:
    """``exc`` and the exceptions it was raised from or during (``__cause__``, else ``__context__``), each once."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        current = current.__cause__ or current.__context__


def _errno_of(exc: BaseException) -> tuple[int | None, Any]:
    if isinstance(exc, OSError) and exc.errno in (*_FULL, *_READ_ONLY, *_DENIED):
        return exc.errno, exc.filename
    if isinstance(exc, OSError) and exc.errno is not None:
        return None, None
    text = str(exc).lower()
    for phrase, code in _TEXT_ERRNO:
        if phrase in text:
            return code, None
    return None, None


def _environment_sentence(code: int, where: Any) -> str:
    from pathlib import Path

    path = Path(where) if where else None
    folder = path
    while folder is not None and not folder.is_dir() and folder != folder.parent:  # the nearest that exists now
        folder = folder.parent  # (a temporary folder that failed was removed on the way out)
    place = str(folder) if folder is not None else "the output folder"
    if code in _FULL:
        return (
            f"no space left on the disk of {place} ({os.strerror(code)}); free some space there (or use a project "
            "folder on a disk with room) and run the command again."
        )
    if code in _READ_ONLY:
        return (
            f"{place} is on a read-only file system; use a writable project folder (copy the project, or "
            "remount the disk writable) and run the command again."
        )
    return (
        f"{path or place}: permission denied; make it writable (and readable) for you, or work in a copy of the "
        "project you own, and run the command again."
    )
