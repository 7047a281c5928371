"""Align faces in one image or file: detect → landmarks → sanity check → choose → FFHQ warp.

:func:`align_image` works in memory (``make-reg`` aligns generated images, ``edit`` its inputs);
:func:`align_file` reads a photo robustly first. Both return one :class:`AlignedFace` per aligned face
and raise a :class:`~selfage_cli.faces.engine.errors.FaceError` subclass (one sentence naming the file) when
the image cannot be aligned. Warnings (several faces, faces skipped as too small) go to
:func:`selfage_cli.console.warn`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from selfage_cli.errors import SelfageError
from selfage_cli.faces.engine.detect import MIN_EYE_DISTANCE, check_detector, choose_faces, find_faces
from selfage_cli.faces.engine.errors import FaceError, FaceTooSmallError, NoFaceError, UnreadableImageError
from selfage_cli.faces.engine.ffhq import FFHQQuad, ffhq_align, source_to_aligned
from selfage_cli.faces.engine.loading import load_image, to_rgb

__all__ = [
    "AlignedFace",
    "FaceError",
    "FaceTooSmallError",
    "NoFaceError",
    "UnreadableImageError",
    "align_file",
    "align_image",
    "align_loaded",
    "check_size",
]

MIN_SIZE, MAX_SIZE = 64, 4096


@dataclass
class AlignedFace:
    """One FFHQ-aligned face and where it came from (source pixels, EXIF orientation applied)."""

    image: Image.Image  # RGB, size × size
    box: tuple[int, int, int, int]  # detector box: left, top, right, bottom
    score: float  # detector confidence
    landmarks: np.ndarray  # (68, 2) in the source
    face_index: int  # 0 = most confident face of the photo
    faces_found: int  # faces that passed the landmark sanity check
    quad: FFHQQuad
    size: int
    detector: str = "hog"

    @property
    def aligned_landmarks(self) -> np.ndarray:
        """The 68 landmarks mapped into the aligned image (where the FFHQ recipe puts them)."""
        return source_to_aligned(self.landmarks, self.quad, self.size)

    @property
    def eye_distance(self) -> float:
        """Distance between the eye centres in source pixels."""
        left, right = self.landmarks[36:42].mean(0), self.landmarks[42:48].mean(0)
        return float(np.hypot(*(right - left)))

    def to_entry(self) -> dict:
        """The manifest fields this face contributes to an ImageEntry (docs/manifest.md)."""
        return {
            "size": self.size,
            "detector": self.detector,
            "box": [int(v) for v in self.box],
            "score": round(float(self.score), 4),
            "landmarks": [[round(float(x), 2), round(float(y), 2)] for x, y in self.landmarks],
            "face_index": self.face_index,
            "faces_found": self.faces_found,
        }


def check_size(size: int) -> int:
    """Validate ``--size``."""
    if not isinstance(size, int | np.integer) or not MIN_SIZE <= int(size) <= MAX_SIZE:
        raise SelfageError(f"--size {size!r} must be an integer from {MIN_SIZE} to {MAX_SIZE} (e.g. 512).")
    return int(size)


def align_loaded(
    image: Image.Image,
    *,
    name: str = "image",
    size: int = 512,
    detector: str = "hog",
    all_faces: bool = False,
    min_eye_distance: float = MIN_EYE_DISTANCE,
) -> tuple[list[AlignedFace], list[str]]:
    """Align an RGB Pillow image; returns the faces and the warnings (not yet reported)."""
    size = check_size(size)
    detector = check_detector(detector)
    candidates = find_faces(image, detector)
    chosen, found, warnings = choose_faces(
        candidates, name=name, all_faces=all_faces, detector=detector, min_eye_distance=min_eye_distance
    )
    sane = [c for c in candidates if c.sane]
    faces = []
    for candidate in chosen:
        aligned, quad = ffhq_align(image, candidate.landmarks, size)
        faces.append(
            AlignedFace(
                image=aligned,
                box=candidate.box,
                score=candidate.score,
                landmarks=candidate.landmarks,
                face_index=sane.index(candidate),
                faces_found=found,
                quad=quad,
                size=size,
                detector=detector,
            )
        )
    return faces, warnings


def _report(warnings: list[str]) -> None:
    from selfage_cli import console

    for message in warnings:
        console.warn(message)


def align_image(
    image: Image.Image | np.ndarray,
    size: int = 512,
    detector: str = "hog",
    all_faces: bool = False,
    *,
    name: str = "image",
) -> list[AlignedFace]:
    """FFHQ-align the face(s) of an in-memory image (Pillow image, or an RGB/grey/RGBA uint8 array).

    Without ``all_faces`` the list holds the most confident face only. Raises :class:`NoFaceError`,
    :class:`FaceTooSmallError` (messages name ``name``).
    """
    faces, warnings = align_loaded(to_rgb(image), name=name, size=size, detector=detector, all_faces=all_faces)
    _report(warnings)
    return faces


def align_file(path: str | Path, size: int = 512, detector: str = "hog", all_faces: bool = False) -> list[AlignedFace]:
    """FFHQ-align the face(s) of a photo file (EXIF orientation applied, any pixel mode).

    Raises :class:`UnreadableImageError`, :class:`NoFaceError` or :class:`FaceTooSmallError`, each
    with a one-sentence message naming the file.
    """
    path = Path(path)
    image = load_image(path)
    faces, warnings = align_loaded(image, name=path.name, size=size, detector=detector, all_faces=all_faces)
    _report(warnings)
    return faces
