"""PyTorch pickle files (``.pt``/``.pth``) read without running code, and written with honest errors.

:func:`load_plain` reads with ``torch.load(weights_only=True)``: a pickle that needs anything beyond
tensors, numbers and plain containers is refused before any of it runs. torch words that refusal
differently from version to version (and in torch ≥ 2.6 advises loading it with ``weights_only=False``,
advice selfage never passes on), so :func:`is_code_refusal` recognises it by the exception type,
:class:`pickle.UnpicklingError`, and the weights-only unpickler's wording of a forbidden global,
call or object; every such file gets the one sentence :data:`CODE_REFUSED`. Any other failure to read
is :class:`UnreadableTorchFile` (truncated, garbled, not a PyTorch file).

:func:`save_plain` serialises in memory and writes the bytes with Python's own file calls, so a full
or read-only disk raises an :class:`OSError` with its errno (torch's own writer reports it as
``RuntimeError: unexpected pos …``) that the CLI turns into one sentence.
"""

from __future__ import annotations

import io
import os
import pickle
import re
import zipfile
from pathlib import Path
from typing import Any

from selfage_cli.errors import SelfageError, exception_chain
from selfage_cli.files import with_filename

# The sentence for a pickle that would run code (docs/troubleshooting.md quotes it; a test checks it).
CODE_REFUSED = "refused: loading it would run code; nothing in it ran"

# Text of the weights-only unpickler (torch 2.0 … 2.13) when a pickle names a global, calls a function or
# builds an object that is not on its allow-list. "Unsupported operand" (a garbled byte) is not one of them.
_WEIGHTS_ONLY_TEXT = re.compile(r"weights[_ ]only|WeightsUnpickler", re.IGNORECASE)
_CODE_TEXT = re.compile(
    r"unsupported global|unsupported class|\bGLOBAL\b|whose module \S+ is blocked|unrecognized function"
    r"|call reduce|create new object|must be imported to load",
    re.IGNORECASE,
)


class CodeRefused(SelfageError):
    """The file is a pickle that would run code to load; it was refused and nothing in it ran."""


class UnreadableTorchFile(SelfageError):
    """The file is not a readable PyTorch file of plain tensors (truncated, garbled, another format)."""

    def __init__(self, message: str, detail: str):
        super().__init__(message)
        self.detail = detail


def is_code_refusal(exc: BaseException) -> bool:
    """Whether ``exc`` is ``torch.load(weights_only=True)`` refusing a pickle that would run code."""
    if not isinstance(exc, pickle.UnpicklingError):
        return False
    text = str(exc)
    return bool(_CODE_TEXT.search(text)) and (bool(_WEIGHTS_ONLY_TEXT.search(text)) or "GLOBAL" in text)


def refused_in(exc: BaseException) -> str | None:
    """When ``exc`` or an exception in its chain is a code refusal (a library loaded a pickle for us, e.g.
    diffusers a ``.bin`` weights file): the sentence for it, naming the file where the chain names one."""
    chain = list(exception_chain(exc))
    if not any(is_code_refusal(current) for current in chain):
        return None
    texts = [str(current) for current in chain]
    named = re.search(r"'([^']+\.(?:bin|pt|pth|ckpt|pkl))'", " ".join(texts))
    return f"{named.group(1)}: {CODE_REFUSED}" if named else CODE_REFUSED


def first_line(exc: BaseException, limit: int = 160) -> str:
    """The first non-empty line of an exception's text (its type's name when it has none)."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return (lines[0] if lines else type(exc).__name__)[:limit]


def load_plain(path: str | os.PathLike[str], map_location: Any = "cpu") -> Any:
    """``torch.load(path, weights_only=True)``; :class:`CodeRefused` / :class:`UnreadableTorchFile` naming the file.

    A missing file raises :class:`FileNotFoundError` (callers say what it is and where it comes from).
    """
    import torch

    path = Path(path)
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except FileNotFoundError:
        raise
    except pickle.UnpicklingError as exc:
        if is_code_refusal(exc):
            raise CodeRefused(f"{path}: {CODE_REFUSED}.") from None
        detail = _unpickling_detail(exc)
        raise UnreadableTorchFile(
            f"{path} is not a readable PyTorch file of plain tensors ({detail})", detail
        ) from None
    except (RuntimeError, EOFError, OSError, ValueError, zipfile.BadZipFile, AttributeError, TypeError) as exc:
        detail = first_line(exc)
        raise UnreadableTorchFile(f"{path} is not a readable PyTorch file ({detail})", detail) from None


def _unpickling_detail(exc: BaseException) -> str:
    """The line of torch's long weights-only message that says what failed (never its advice)."""
    text = str(exc)
    for marker in ("WeightsUnpickler error:",):
        if marker in text:
            text = text.split(marker, 1)[1]
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    useful = [line for line in lines if not _WEIGHTS_ONLY_TEXT.search(line) and "torch.load" not in line]
    return (useful[0] if useful else type(exc).__name__).split(". Please use")[0][:160]


def save_plain(obj: Any, path: str | os.PathLike[str]) -> Path:
    """``torch.save(obj, path)`` through memory, so a write error is an :class:`OSError` with its errno."""
    import torch

    path = Path(path)
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    try:
        with open(path, "wb") as handle:
            handle.write(buffer.getbuffer())
            handle.flush()
            os.fsync(handle.fileno())
    except OSError as exc:
        raise with_filename(exc, path)  # noqa: B904 - the original is its context
    return path
