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
    """Missing, not an image, truncated or corrupt, or too large for Pillow.

    Held in parts (``name``: the file, ``problem``, ``fix``) so that a stage which knows better what
    the user should do can say so instead (:meth:`sentence`): ``eval`` asks for the edit to be re-run.
    """

    def __init__(self, name: str, problem: str, fix: str = ""):
        super().__init__(name, problem, fix)  # the parts as args: the error survives pickling (align's workers)
        self.name, self.problem, self.fix = name, problem, fix

    def __str__(self) -> str:
        return self.sentence(self.fix)

    def sentence(self, fix: str) -> str:
        """The message, with ``fix`` as its advice."""
        return f"{self.name}: {self.problem}; {fix}." if fix else f"{self.name}: {self.problem}."


class NoFaceError(FaceError):
    """No face passed detection and the landmark sanity check."""


class FaceTooSmallError(FaceError):
    """Faces were found, but all are below the minimum eye distance."""
