"""Exclusive locks on output folders for the lifetime of the command that writes them.

Two ``selfage train --run NAME`` at once on one project would mix two runs in one folder, and two
``edit`` calls on one photo would overwrite each other's files without ``--force``. A command that
writes such a folder first takes :func:`hold` on a lock file beside it (``runs/.NAME.lock``,
``edits/.ID.lock``): ``fcntl.flock`` without waiting, held until the command ends (the kernel drops it
when the process dies, even by SIGKILL). A second command finds it taken and stops with one sentence
(exit 2) before writing anything. The lock file holds the owner's process id (for that sentence) and
is removed by its holder on the way out (while still locked: a process that opened the old file
sees that it is gone and locks a new one), so a finished command leaves nothing behind.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Iterator
from pathlib import Path

from selfage_cli.errors import SelfageError


class FolderBusy(SelfageError):
    """Another process holds the folder's lock."""


def lock_file_for(folder: Path) -> Path:
    """The lock file of an output folder: ``.NAME.lock`` beside it."""
    return folder.parent / f".{folder.name}.lock"


@contextlib.contextmanager
def hold(folder: Path, busy: str) -> Iterator[None]:
    """Hold the exclusive lock of ``folder`` for the ``with`` block; :class:`FolderBusy` if another process has it.

    ``busy``: the sentence's end, after "FOLDER is in use by another selfage process (pid N); ", e.g.
    "wait for it to finish or choose another --run name".
    """
    path = lock_file_for(folder)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = _locked(path, folder, busy)
    try:
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        yield
    finally:
        with contextlib.suppress(OSError):  # removed while held: a process that opened it before retries
            path.unlink()
        os.close(fd)  # releases the lock


def _locked(path: Path, folder: Path, busy: str) -> int:
    """An open descriptor of ``path`` holding its exclusive lock (the file still in place), or FolderBusy."""
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            owner = _owner(fd)
            os.close(fd)
            raise FolderBusy(
                f"{folder} is in use by another selfage process{f' (pid {owner})' if owner else ''}; {busy}."
            ) from None
        except BaseException:
            os.close(fd)
            raise
        try:
            if os.stat(path).st_ino == os.fstat(fd).st_ino:
                return fd
        except FileNotFoundError:
            pass
        os.close(fd)  # the holder removed it as we opened it: lock the new one


def _owner(fd: int) -> str:
    """The process id the holder wrote into the lock file ('' when unreadable)."""
    with contextlib.suppress(OSError, ValueError):
        text = os.pread(fd, 32, 0).decode("ascii").strip()
        if text.isdigit():
            return text
    return ""
