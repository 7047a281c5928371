"""Per-photo alignment failures. Each message is one sentence naming the file, the reason and the fix.

They subclass :class:`~selfage_cli.errors.SelfageError`; ``selfage align`` catches them per file and
lists them in its summary (exit 1, the other photos still processed); other stages that align one
image (``make-reg``, ``edit``) catch them too.
"""

from __future__ import annotations

from selfage_cli.errors import SelfageError


class FaceError(SelfageError):
    """A photo that cannot be aligned."""


class UnreadableImageError(FaceError):
    """Missing, not an image, truncated or corrupt, or too large for Pillow."""


class NoFaceError(FaceError):
    """No face passed detection and the landmark sanity check."""


class FaceTooSmallError(FaceError):
    """Faces were found, but all are below the minimum eye distance."""
