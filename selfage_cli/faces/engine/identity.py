"""Identity descriptors (dlib's 128-d ResNet face embedding) and the references' distance table.

dlib's model puts two photos of the same person less than 0.6 apart (euclidean distance), which is
the threshold its authors use (99.38 % on LFW). On the packaged portraits: astronaut vs Grace Hopper
≈ 0.68, the astronaut against her own mirror image ≈ 0.2.
"""

from __future__ import annotations

import statistics

import numpy as np
from PIL import Image

from selfage_cli.faces.engine import dlib_models
from selfage_cli.faces.engine.loading import to_rgb

SAME_PERSON_THRESHOLD = 0.6
DESCRIPTOR_SIZE = 128


def face_descriptor(image: Image.Image | np.ndarray, landmarks: np.ndarray | None = None) -> np.ndarray | None:
    """The 128-d descriptor of the face in ``image`` (e.g. an aligned face), or None when none is found.

    ``landmarks`` (68×2, in ``image``'s pixels) skip detection; without them the most confident face
    whose landmarks pass the sanity check is used.
    """
    import dlib

    rgb = np.ascontiguousarray(np.asarray(to_rgb(image), dtype=np.uint8))
    if landmarks is None:
        from selfage_cli.faces.engine.detect import find_faces

        faces = [c for c in find_faces(Image.fromarray(rgb)) if c.sane]
        if not faces:
            return None
        landmarks = faces[0].landmarks
    points = np.asarray(landmarks, dtype=np.float64).reshape(68, 2)
    left, top = np.floor(points.min(axis=0)).astype(int)
    right, bottom = np.ceil(points.max(axis=0)).astype(int)
    shape = dlib.full_object_detection(
        dlib.rectangle(int(left), int(top), int(right), int(bottom)),
        [dlib.point(int(round(x)), int(round(y))) for x, y in points],
    )
    descriptor = dlib_models.face_recognizer().compute_face_descriptor(rgb, shape)
    return np.asarray(descriptor, dtype=np.float64)


def descriptor_distance(a: np.ndarray | list[float], b: np.ndarray | list[float]) -> float:
    """Euclidean distance between two descriptors (< 0.6: same person for dlib)."""
    return float(np.linalg.norm(np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)))


def distance_table(descriptors: dict[str, np.ndarray]) -> dict[str, dict[str, float]]:
    """Pairwise distances ``{id: {other_id: distance}}`` (the diagonal omitted)."""
    ids = list(descriptors)
    return {a: {b: round(descriptor_distance(descriptors[a], descriptors[b]), 4) for b in ids if b != a} for a in ids}


def median_distances(table: dict[str, dict[str, float]]) -> dict[str, float]:
    """Each reference's median distance to the others."""
    return {key: float(statistics.median(row.values())) for key, row in table.items() if row}


def suspects(table: dict[str, dict[str, float]], threshold: float = SAME_PERSON_THRESHOLD) -> list[str]:
    """References whose median distance to the others exceeds ``threshold``."""
    return [key for key, median in median_distances(table).items() if median > threshold]


def format_table(table: dict[str, dict[str, float]], width: int = 8) -> list[str]:
    """The distance table as aligned text lines (ids truncated to ``width`` characters in the header)."""
    ids = list(table)
    if not ids:
        return []
    label = max(len(i) for i in ids)
    header = " " * label + "  " + " ".join(f"{i[:width]:>{width}}" for i in ids)
    lines = [header]
    for a in ids:
        cells = " ".join(f"{'—':>{width}}" if a == b else f"{table[a][b]:>{width}.3f}" for b in ids)
        lines.append(f"{a:<{label}}  {cells}")
    return lines
