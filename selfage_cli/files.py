"""Atomic file writes: a reader sees the old file or the new one, never a torn one.

Every function writes a temporary file in the target's folder (``.NAME.XXXX.tmp``), flushes and
fsyncs it, renames it over the target with :func:`os.replace` and fsyncs the folder; on any failure
(Ctrl-C included) the temporary file is removed and the target is left as it was. The folder must
exist. The new file gets the usual permissions (``0o666`` less the umask), not ``mkstemp``'s 0600.

>>> atomic_write_json(folder / "report.json", report)
>>> atomic_save(folder / "sheet.png", lambda tmp: image.save(tmp, format="PNG"))
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

__all__ = [
    "atomic_save",
    "atomic_write_bytes",
    "atomic_write_json",
    "atomic_write_text",
    "resolves_inside",
    "with_filename",
    "write_new",
]


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _fsync_folder(folder: Path) -> None:
    """Make the rename durable (best effort: some file systems refuse to open a folder)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        with contextlib.suppress(OSError):
            os.fsync(fd)
    finally:
        os.close(fd)


def atomic_save(path: str | os.PathLike[str], writer: Callable[[Path], None]) -> Path:
    """Call ``writer(tmp)`` to write a temporary file beside ``path``, then move it over ``path``.

    For writers that need a path (PIL ``Image.save``, safetensors ``save_file``). The temporary name
    ends in ``.tmp``, so a writer that picks the format from the suffix must be told it (``format="PNG"``).
    Returns ``path``.
    """
    path = Path(path)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    tmp = Path(name)
    try:
        os.close(fd)
        os.chmod(tmp, 0o666 & ~_umask())
        writer(tmp)
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise with_filename(exc, path)  # noqa: B904 - the original is its context
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_folder(path.parent)
    return path


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically; returns ``path``."""

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as handle:
            handle.write(data)
            handle.flush()

    return atomic_save(path, write)


def atomic_write_text(path: str | os.PathLike[str], text: str, encoding: str = "utf-8") -> Path:
    """Write ``text`` (encoded with ``encoding``) to ``path`` atomically; returns ``path``."""
    return atomic_write_bytes(path, text.encode(encoding))


def atomic_write_json(path: str | os.PathLike[str], obj: Any, indent: int | None = 2, **dumps_kwargs: Any) -> Path:
    """Write ``obj`` as JSON (``indent`` 2, a final newline) to ``path`` atomically; returns ``path``."""
    return atomic_write_text(path, json.dumps(obj, indent=indent, **dumps_kwargs) + "\n")


def resolves_inside(path: str | os.PathLike[str], folder: str | os.PathLike[str]) -> bool:
    """Whether ``path``, with every symbolic link and ``..`` resolved, lies in ``folder`` (resolved too).

    Checked before writing or deleting anything whose name came from a file (the manifest) or whose
    folders may be links: a write must never land outside the project.
    """
    return Path(path).resolve().is_relative_to(Path(folder).resolve())


def with_filename(exc: OSError, path: str | os.PathLike[str]) -> OSError:
    """``exc`` with ``path`` as its file name when it has none (a failed write to an open file names no file),
    so the message can say where the disk is full or read-only."""
    if exc.filename is not None or exc.errno is None:
        return exc
    return OSError(exc.errno, exc.strerror, os.fspath(path))


def write_new(path: str | os.PathLike[str], data: bytes) -> Path:
    """Write ``data`` to ``path`` (not atomically: for temporary files the caller removes on failure);
    a failed write raises an :class:`OSError` that names ``path``."""
    path = Path(path)
    try:
        path.write_bytes(data)
    except OSError as exc:
        raise with_filename(exc, path)  # noqa: B904 - the original is its context
    return path
