"""Face detection, 68 landmarks, a landmark sanity check, and choosing the face(s) to align.

Detection runs on a copy of the photo downscaled to at most :data:`DETECT_MAX_SIDE` pixels (HOG with
one 2× upsampling finds faces from about 40 px in that copy); the 68 landmarks are then predicted on a
crop of the full-resolution photo around each box, downscaled so the box is at most
:data:`LANDMARK_BOX_SIDE` px wide. Coordinates returned are in full-resolution source pixels (dlib's
convention: integer positions are pixel centres).

**Landmark refinement.** dlib's predictor is a regression cascade started from the detector's box, and
HOG boxes snap to 8-px cells, so the same face shifted, rotated or rescaled gets landmarks a pixel or two
apart (visible as a different crop). Each candidate's landmarks are therefore re-predicted
(:data:`REFINE_ROUNDS` rounds) in a canonical patch where the current landmarks are level, 80 px between
the eyes and centred, with boxes placed the same way relative to them at four scales, on the patch and
its mirror image, and averaged. On the test portraits this makes the crop of the same photo rotated ±20°,
rescaled or moved agree to 1–2 grey levels (astronaut) instead of 3–20.

**Landmark sanity check.** Detectors also fire on things that are not faces (on the astronaut portrait,
HOG scores the round mission patch 0.12 and, rotated, the name badge up to 0.5). A detection counts as a
face when (1) its landmarks are stable under mirroring (mean distance between the landmarks predicted on
the canonical patch and on its mirror image ≤ :data:`MAX_MIRROR_ERROR` eye distances: real faces
0.007–0.033, the patch and badges 0.04–0.11), (2) with HOG, the canonical patch is detected again with a
score ≥ :data:`MIN_REDETECT_SCORE` (real faces 1.07–1.35 once level and well scaled; the badges ≤ 0.51,
the patch −0.28), (3) the eye distance is a plausible share of the box width and the mouth lies below
the eyes in the face's own frame.

**Face too small.** A face whose eye centres are less than :data:`MIN_EYE_DISTANCE` source pixels apart
is refused: an FFHQ crop is about four eye distances wide, so at 32 px a 512² output would be upscaled
about 4× and the personalisation would learn blur. The test portraits have 43 px (astronaut) and 83 px
(Grace Hopper).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from PIL import Image

from selfage_cli.faces.engine import dlib_models
from selfage_cli.faces.engine.errors import FaceTooSmallError, NoFaceError
from selfage_cli.faces.engine.loading import detection_copy

DETECTORS = ("hog", "cnn")
DETECT_MAX_SIDE = {"hog": 1280, "cnn": 1024}
LANDMARK_BOX_SIDE = 320
MIN_EYE_DISTANCE = 32.0
MAX_MIRROR_ERROR = 0.08
MIN_REDETECT_SCORE = 0.6
EYE_TO_BOX_RANGE = (0.2, 0.8)
MOUTH_DROP_RANGE = (0.4, 2.2)
SCORE_THRESHOLD = 0.0
# Landmark refinement: re-predict in a patch where the face is level, CANON_IOD px between the eyes and
# the box placed canonically (HOG boxes are about 2.2 eye distances wide, centred 0.05 above the
# landmarks' mean), averaged with the mirrored prediction. Two rounds.
REFINE_ROUNDS = 2
CANON_IOD = 80.0
CANON_BOX = 2.2
CANON_BOX_DY = -0.05
REFINE_BOX_SCALES = (0.85, 0.95, 1.05, 1.15)

# Index of each landmark's mirror partner (iBUG 300-W 68-point order).
MIRROR = np.array(
    list(range(16, -1, -1))
    + list(range(26, 16, -1))
    + [27, 28, 29, 30]
    + [35, 34, 33, 32, 31]
    + [45, 44, 43, 42, 47, 46]
    + [39, 38, 37, 36, 41, 40]
    + [54, 53, 52, 51, 50, 49, 48]
    + [59, 58, 57, 56, 55]
    + [64, 63, 62, 61, 60]
    + [67, 66, 65]
)


@dataclass
class FaceCandidate:
    """One detection with its landmarks, in source pixels."""

    box: tuple[int, int, int, int]  # left, top, right, bottom
    score: float
    landmarks: np.ndarray  # (68, 2) float x, y
    mirror_error: float = 0.0
    redetect_score: float | None = None
    problems: list[str] = field(default_factory=list)

    @property
    def sane(self) -> bool:
        return not self.problems

    @property
    def eye_centres(self) -> tuple[np.ndarray, np.ndarray]:
        return self.landmarks[36:42].mean(axis=0), self.landmarks[42:48].mean(axis=0)

    @property
    def eye_distance(self) -> float:
        left, right = self.eye_centres
        return float(np.hypot(*(right - left)))


def check_detector(detector: str) -> str:
    """Normalise and validate a ``--detector`` value."""
    from selfage_cli.errors import SelfageError

    name = (detector or "").strip().lower()
    if name not in DETECTORS:
        raise SelfageError(f"--detector {detector!r} is not known; use hog (default) or cnn.")
    return name


def _to_source(index: np.ndarray | float, scale: float, offset: float = 0.0) -> np.ndarray | float:
    """Pixel-centre coordinates in a copy scaled by ``scale`` (and offset) back to source pixels."""
    return (np.asarray(index, dtype=np.float64) + 0.5) / scale - 0.5 + offset


def detect_boxes(small: np.ndarray, detector: str) -> list[tuple[tuple[float, float, float, float], float]]:
    """Raw detections on an RGB array: ``((left, top, right, bottom), score)`` in its own pixels."""
    if detector == "cnn":
        # No upsampling (the CNN is slow on a CPU; it finds faces from ~80 px), except for small images.
        found = dlib_models.cnn_detector()(small, 0)
        if not found and max(small.shape[:2]) <= 640:
            found = dlib_models.cnn_detector()(small, 1)
        return [
            ((d.rect.left(), d.rect.top(), d.rect.right(), d.rect.bottom()), float(d.confidence))
            for d in found
            if d.confidence >= SCORE_THRESHOLD
        ]
    boxes, scores, _ = dlib_models.hog_detector().run(small, 1, SCORE_THRESHOLD)
    return [((b.left(), b.top(), b.right(), b.bottom()), float(s)) for b, s in zip(boxes, scores, strict=True)]


def _predict(patch: np.ndarray, box: tuple[float, float, float, float]) -> np.ndarray:
    import dlib

    rect = dlib.rectangle(*(int(round(v)) for v in box))
    shape = dlib_models.shape_predictor()(patch, rect)
    return np.array([[p.x, p.y] for p in shape.parts()], dtype=np.float64)


def landmarks_for_box(image: Image.Image, box: tuple[float, float, float, float]) -> np.ndarray:
    """First-pass 68 landmarks (source pixels) for a detector box in source pixels.

    The predictor runs on a crop around the box (half a box width of margin), downscaled so the box is
    at most LANDMARK_BOX_SIDE px wide.
    """
    left, top, right, bottom = box
    width, height = right - left + 1, bottom - top + 1
    x0 = max(0, int(np.floor(left - 0.5 * width)))
    y0 = max(0, int(np.floor(top - 0.5 * height)))
    x1 = min(image.width, int(np.ceil(right + 1 + 0.5 * width)))
    y1 = min(image.height, int(np.ceil(bottom + 1 + 0.5 * height)))
    ratio = min(1.0, LANDMARK_BOX_SIDE / max(width, 1.0))
    size = (max(1, round((x1 - x0) * ratio)), max(1, round((y1 - y0) * ratio)))
    if ratio < 1.0:
        patch_image = image.resize(size, Image.Resampling.LANCZOS, box=(x0, y0, x1, y1))
    else:
        patch_image = image.crop((x0, y0, x1, y1))
    patch = np.ascontiguousarray(np.asarray(patch_image))
    sx, sy = patch.shape[1] / (x1 - x0), patch.shape[0] / (y1 - y0)

    def to_patch(value: float, scale: float, origin: int) -> float:
        return (value + 0.5 - origin) * scale - 0.5

    patch_box = (to_patch(left, sx, x0), to_patch(top, sy, y0), to_patch(right, sx, x0), to_patch(bottom, sy, y0))
    points = _predict(patch, patch_box)
    return np.stack([_to_source(points[:, 0], sx, x0), _to_source(points[:, 1], sy, y0)], axis=1)


@dataclass
class Refined:
    """Refined landmarks, their mirror error and the last canonical patch (level face, 80 px eye distance)."""

    landmarks: np.ndarray
    mirror_error: float
    patch: np.ndarray | None


def _face_crop(
    image: Image.Image, centre: np.ndarray, half: int, scale: float
) -> tuple[Image.Image, np.ndarray, float]:
    """A square of side ``2·half`` source px around ``centre`` (black outside the image), scaled by about
    ``scale`` when that shrinks it; returns it, its top-left corner in source px, and its exact scale.

    A large face is first box-reduced by an integer factor on its own region only (Pillow's
    ``reduce(box=…)``), so a face thousands of pixels wide never needs a full-resolution crop.
    """
    factor = max(1, int(np.floor(1.0 / scale))) if scale < 0.5 else 1
    half = -(-half // factor) * factor  # a multiple of the reduction factor
    origin = (np.floor(centre).astype(int) - half) // factor * factor
    if factor == 1:
        crop = image.crop((origin[0], origin[1], origin[0] + 2 * half, origin[1] + 2 * half))
    else:
        x0, y0 = max(0, int(origin[0])), max(0, int(origin[1]))
        x1, y1 = min(image.width, int(origin[0]) + 2 * half), min(image.height, int(origin[1]) + 2 * half)
        side = 2 * half // factor
        crop = Image.new("RGB", (side, side))
        if x1 > x0 and y1 > y0:
            part = image.reduce(factor, box=(x0, y0, x1, y1))
            crop.paste(part, ((x0 - int(origin[0])) // factor, (y0 - int(origin[1])) // factor))
    ratio = crop.width / (2 * half)
    if scale < ratio:
        target = max(8, int(round(2 * half * scale)))
        crop = crop.resize((target, target), Image.Resampling.LANCZOS)
        ratio = target / (2 * half)
    return crop, origin, ratio


def refine_landmarks(image: Image.Image, landmarks: np.ndarray, rounds: int = REFINE_ROUNDS) -> Refined:
    """Landmarks that depend on the face, not on where the detector's box happened to fall.

    dlib's predictor is a cascade started from its box, so a box shifted by a HOG cell moves the
    landmarks by a pixel or two (enough to make the same photo, shifted, rotated or rescaled, align
    differently). Each round warps a patch where the current landmarks are level, ``CANON_IOD`` px
    apart and centred, predicts with a box placed the same way relative to them, averages with the
    prediction on the mirrored patch, and maps the points back to the source.

    Also returns the mirror error of the last round: the mean distance between the landmarks predicted
    on the patch and on its mirror image (mirrored back), in eye distances. Real faces give 0.01–0.05;
    the predictor drifts on things that are not faces.
    """
    points = np.asarray(landmarks, dtype=np.float64)
    error = float("inf")
    patch = None
    side = int(round(2.0 * CANON_BOX * CANON_IOD))
    box_side = CANON_BOX * CANON_IOD
    for _ in range(rounds):
        left_eye, right_eye = points[36:42].mean(axis=0), points[42:48].mean(axis=0)
        eye_vec = right_eye - left_eye
        iod = float(np.hypot(*eye_vec))
        if iod < 1e-3:
            break
        cos, sin = eye_vec / iod
        scale = CANON_IOD / iod  # patch pixels per source pixel
        centre = points.mean(axis=0) + 0.5  # continuous source coordinates
        # 1. Axis-aligned crop around the face covering the rotated patch (out-of-image parts black),
        #    downscaled with an antialiasing filter when the face is larger than the canonical one.
        crop, origin, ratio = _face_crop(image, centre, int(np.ceil(side * 0.75 / scale)) + 2, scale)
        # 2. Rotate and scale (continuous coordinates: crop = centre_c + k·R(θ)·(patch − patch_centre)).
        centre_c = (centre - origin) * ratio
        pc = side / 2.0
        k = ratio / scale
        kc, ks = k * cos, k * sin
        coeffs = (kc, -ks, centre_c[0] - kc * pc + ks * pc, ks, kc, centre_c[1] - ks * pc - kc * pc)
        patch = np.ascontiguousarray(
            np.asarray(crop.transform((side, side), Image.Transform.AFFINE, coeffs, Image.Resampling.BICUBIC))
        )
        box_cy = pc + CANON_BOX_DY * CANON_IOD
        flipped = np.ascontiguousarray(patch[:, ::-1])
        direct, mirrored = [], []
        for factor in REFINE_BOX_SCALES:
            half_box = box_side * factor / 2
            box = (pc - half_box - 0.5, box_cy - half_box - 0.5, pc + half_box - 0.5, box_cy + half_box - 0.5)
            direct.append(_predict(patch, box))
            back = _predict(flipped, (side - 1 - box[2], box[1], side - 1 - box[0], box[3]))
            back[:, 0] = side - 1 - back[:, 0]
            mirrored.append(back[MIRROR])
        direct_mean, mirrored_mean = np.mean(direct, axis=0), np.mean(mirrored, axis=0)
        error = float(np.linalg.norm(direct_mean - mirrored_mean, axis=1).mean() / CANON_IOD)
        found = (direct_mean + mirrored_mean) / 2.0
        # 3. Back to source index coordinates.
        rel = found + 0.5 - pc
        crop_c = np.stack(
            [centre_c[0] + kc * rel[:, 0] - ks * rel[:, 1], centre_c[1] + ks * rel[:, 0] + kc * rel[:, 1]], axis=1
        )
        points = crop_c / ratio + origin - 0.5
    return Refined(points, error, patch)


def redetect_score(patch: np.ndarray) -> float:
    """Best HOG score of a detection centred in a canonical patch (−inf when none)."""
    side = patch.shape[0]
    centre_y = side / 2 + CANON_BOX_DY * CANON_IOD
    boxes, scores, _ = dlib_models.hog_detector().run(patch, 0, -1.0)
    near = [
        float(score)
        for b, score in zip(boxes, scores, strict=True)
        if abs((b.left() + b.right()) / 2 - side / 2) < CANON_IOD / 2
        and abs((b.top() + b.bottom()) / 2 - centre_y) < CANON_IOD / 2
    ]
    return max(near, default=float("-inf"))


def sanity_problems(candidate: FaceCandidate) -> list[str]:
    """Reasons why landmarks do not look like a real face (empty when they pass)."""
    problems = []
    if candidate.mirror_error > MAX_MIRROR_ERROR:
        problems.append(f"landmarks unstable under mirroring ({candidate.mirror_error:.2f})")
    if candidate.redetect_score is not None and candidate.redetect_score < MIN_REDETECT_SCORE:
        problems.append(f"not detected again once levelled ({candidate.redetect_score:.2f})")
    left_eye, right_eye = candidate.eye_centres
    eye_vec = right_eye - left_eye
    eye_distance = float(np.hypot(*eye_vec))
    box_width = candidate.box[2] - candidate.box[0] + 1
    ratio = eye_distance / max(box_width, 1)
    if not EYE_TO_BOX_RANGE[0] <= ratio <= EYE_TO_BOX_RANGE[1]:
        problems.append(f"eye distance {ratio:.2f} of the box width")
    mouth = (candidate.landmarks[48] + candidate.landmarks[54]) / 2
    eye_to_mouth = mouth - (left_eye + right_eye) / 2
    # Signed distance of the mouth below the eye line, in the face's own frame (y down).
    drop = float((eye_vec[0] * eye_to_mouth[1] - eye_vec[1] * eye_to_mouth[0]) / max(eye_distance, 1e-6))
    if not MOUTH_DROP_RANGE[0] <= drop / max(eye_distance, 1e-6) <= MOUTH_DROP_RANGE[1]:
        problems.append("mouth not below the eyes")
    return problems


def find_faces(image: Image.Image, detector: str = "hog") -> list[FaceCandidate]:
    """Every detection with landmarks and sanity verdict, most confident first (source pixels)."""
    detector = check_detector(detector)
    small, scale = detection_copy(image, DETECT_MAX_SIDE[detector])
    small = np.ascontiguousarray(small)
    candidates = []
    for (left, top, right, bottom), score in detect_boxes(small, detector):
        box_src = (
            float(_to_source(left, scale)),
            float(_to_source(top, scale)),
            float(_to_source(right, scale)),
            float(_to_source(bottom, scale)),
        )
        refined = refine_landmarks(image, landmarks_for_box(image, box_src))
        candidate = FaceCandidate(
            box=(round(box_src[0]), round(box_src[1]), round(box_src[2]), round(box_src[3])),
            score=score,
            landmarks=refined.landmarks,
            mirror_error=refined.mirror_error,
            # The CNN finds faces HOG cannot (so HOG cannot confirm them); its false positives are rare.
            redetect_score=redetect_score(refined.patch) if detector == "hog" and refined.patch is not None else None,
        )
        candidate.problems = sanity_problems(candidate)
        candidates.append(candidate)
    candidates.sort(key=lambda c: c.score, reverse=True)
    return candidates


def choose_faces(
    candidates: list[FaceCandidate],
    *,
    name: str,
    all_faces: bool = False,
    detector: str = "hog",
    min_eye_distance: float = MIN_EYE_DISTANCE,
) -> tuple[list[FaceCandidate], int, list[str]]:
    """The face(s) to align, the number of faces found, and warnings naming the file.

    Faces found = detections whose landmarks pass the sanity check. Without ``all_faces`` the most
    confident one that is large enough wins (a warning names the count when there are several); with
    it, every large-enough face. Raises :class:`NoFaceError` or :class:`FaceTooSmallError`.
    """
    faces = [c for c in candidates if c.sane]
    rejected = len(candidates) - len(faces)
    if not faces:
        detail = f"; {rejected} detection(s) failed the landmark sanity check" if rejected else ""
        hint = "" if detector == "cnn" else ", or try --detector cnn"
        raise NoFaceError(
            f"{name}: no face found ({detector.upper()} detector{detail}); use a photo with a clearly visible, "
            f"roughly frontal face{hint}."
        )
    large = [c for c in faces if c.eye_distance >= min_eye_distance]
    if not large:
        biggest = max(c.eye_distance for c in faces)
        raise FaceTooSmallError(
            f"{name}: the face is too small ({biggest:.0f} px between the eye centres, minimum "
            f"{min_eye_distance:.0f} px); use a higher-resolution photo or one taken closer to the face."
        )
    warnings = []
    small = len(faces) - len(large)
    if all_faces:
        if small:
            warnings.append(
                f"{name}: skipped {small} of {len(faces)} faces smaller than {min_eye_distance:.0f} px "
                "between the eye centres."
            )
        return large, len(faces), warnings
    if len(faces) > 1:
        warnings.append(
            f"{name}: {len(faces)} faces found; aligned the most confident one (detector score "
            f"{large[0].score:.2f}); use --all-faces to align each of them."
        )
    return [large[0]], len(faces), warnings
