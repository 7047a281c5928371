"""Put an FFHQ-aligned crop (e.g. an edited face) back into the photo it was cut from.

The align stage's crop is the photo warped by a similarity (plus the recipe's shrink step, whose
per-axis factors make it a general affine map): :meth:`FFHQGeometry.matrix` gives that map exactly,
from source pixels to crop pixels. Pasting back inverts it:

* **Geometry.** For every photo pixel of the crop's footprint, the crop position it came from
  (:class:`Placement`); the crop is sampled there with Lanczos interpolation. When the face is smaller
  in the photo than the crop (the usual case: a 512² crop of a face 200 px wide), the crop is first
  reduced with Pillow's antialiasing Lanczos filter to about the footprint's size, so nothing aliases.
* **Blending.** A soft mask in crop coordinates: 1 over the aligned square, falling smoothly to 0 over a
  border of :data:`FEATHER` of the side (so proportional to the face size) inside its edge, 0 outside.
  Only photo pixels are written: the reflect-padded surround that the alignment invented beyond the
  photo's edge is never pasted, and every pixel the mask leaves at 0 keeps its exact value.
* **Memory.** Only the footprint's bounding box is touched, in bands of :data:`BAND_ROWS` rows
  (float32 planes of one band, never of the whole photo), so memory grows with the face's width, not
  with the photo's size.

:func:`paste_into` modifies a photo in place (the caller owns the copy) and returns the box it wrote;
:func:`paste_back` returns a new image.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image

from selfage_cli.faces.engine.ffhq import ffhq_geometry

FEATHER = 0.1  # width of the mask's soft border, as a fraction of the crop's side
INSET = 0.01  # the crop's outermost pixels (resampling edge effects) are not pasted at all
BAND_ROWS = 256  # photo rows blended at once


@dataclass(frozen=True)
class Placement:
    """Where a ``side``² aligned crop lies in a photo: the affine map from photo to crop pixels."""

    matrix: np.ndarray  # 2×3: photo pixel (x, y, 1) → crop pixel (u, v); centres at integers
    side: int
    image_size: tuple[int, int]  # the photo's (width, height), EXIF orientation applied

    @classmethod
    def from_landmarks(
        cls, landmarks: np.ndarray, image_size: tuple[int, int], aligned_size: int, side: int | None = None
    ) -> Placement:
        """The placement of the crop that ``ffhq_align(photo, landmarks, aligned_size)`` made, resized to ``side``."""
        geometry = ffhq_geometry(np.asarray(landmarks, dtype=np.float64), image_size, aligned_size)
        side = int(side or aligned_size)
        return cls(matrix=geometry.matrix(side), side=side, image_size=(int(image_size[0]), int(image_size[1])))

    @property
    def scale(self) -> float:
        """Crop pixels per photo pixel (> 1: the crop is larger than the face in the photo)."""
        return float(np.sqrt(abs(np.linalg.det(self.matrix[:, :2]))))

    def to_photo(self, points: np.ndarray) -> np.ndarray:
        """Crop pixel positions (N×2) → photo pixel positions."""
        full = np.vstack([self.matrix, [0.0, 0.0, 1.0]])
        inverse = np.linalg.inv(full)[:2]
        pts = np.asarray(points, dtype=np.float64).reshape(-1, 2)
        return pts @ inverse[:, :2].T + inverse[:, 2]

    def footprint(self, margin: float = 2.0) -> tuple[int, int, int, int] | None:
        """The photo box (left, top, right, bottom; right/bottom exclusive) the crop covers, clipped to
        the photo; None when it lies wholly outside."""
        edge = np.array(
            [[-0.5, -0.5], [-0.5, self.side - 0.5], [self.side - 0.5, self.side - 0.5], [self.side - 0.5, -0.5]]
        )
        corners = self.to_photo(edge)
        left = max(int(np.floor(corners[:, 0].min() - margin)), 0)
        top = max(int(np.floor(corners[:, 1].min() - margin)), 0)
        right = min(int(np.ceil(corners[:, 0].max() + margin)) + 1, self.image_size[0])
        bottom = min(int(np.ceil(corners[:, 1].max() + margin)) + 1, self.image_size[1])
        if right <= left or bottom <= top:
            return None
        return left, top, right, bottom


def crop_mask(u: np.ndarray, v: np.ndarray, side: int, feather: float = FEATHER) -> np.ndarray:
    """The blending weight (float32, 0–1) at crop positions ``u``, ``v`` (pixel centres at integers).

    1 inside the square less a border of ``feather`` × side, rising smoothly (smoothstep) from 0 at
    ``INSET`` × side inside the square's edge; 0 outside the square.
    """
    # Distance from the square's nearest edge, in crop pixels (the edge is at −0.5 and side − 0.5).
    distance = np.minimum(np.minimum(u + 0.5, v + 0.5), np.minimum(side - 0.5 - u, side - 0.5 - v))
    ramp = np.clip((distance - INSET * side) / max(feather * side, 1e-6), 0.0, 1.0).astype(np.float32)
    return ramp * ramp * (3.0 - 2.0 * ramp)


def _prepared_crop(crop: Image.Image, placement: Placement) -> tuple[np.ndarray, np.ndarray]:
    """The crop as float32 RGB, reduced (antialiased) when it is larger than the face in the photo, and the
    photo → crop matrix for that version."""
    crop = crop.convert("RGB")
    if crop.size != (placement.side, placement.side):
        raise ValueError(f"the crop is {crop.size[0]}×{crop.size[1]}, expected {placement.side}² for this placement")
    matrix = placement.matrix.copy()
    scale = placement.scale
    if scale > 1.0:
        side = max(int(np.ceil(placement.side / scale)), 8)
        if side < placement.side:
            crop = crop.resize((side, side), Image.Resampling.LANCZOS)
            ratio = side / placement.side  # pixel edges scale: c' + 0.5 = (c + 0.5) · ratio
            matrix = matrix * ratio
            matrix[:, 2] += 0.5 * ratio - 0.5
    return np.asarray(crop, dtype=np.float32), matrix


def paste_into(
    photo: Image.Image, crop: Image.Image, placement: Placement, feather: float = FEATHER
) -> tuple[int, int, int, int] | None:
    """Blend ``crop`` into ``photo`` (RGB, modified in place) where ``placement`` says it came from.

    Returns the box that may have changed (None when the crop lies outside the photo). Pixels outside
    the mask keep their exact values.
    """
    import cv2

    if photo.mode != "RGB":
        raise ValueError(f"paste_into needs an RGB photo, got mode {photo.mode}")
    if photo.size != placement.image_size:
        raise ValueError(f"the photo is {photo.size[0]}×{photo.size[1]}, the placement is for {placement.image_size}")
    box = placement.footprint()
    if box is None:
        return None
    source, matrix = _prepared_crop(crop, placement)
    ratio = source.shape[0] / placement.side  # the crop's reduction, if any (mask in original crop pixels)
    left, top, right, bottom = box
    columns = np.arange(left, right, dtype=np.float64)
    # Per column and per row parts of the photo → crop map (float64, then float32 planes per band).
    u_cols, v_cols = matrix[0, 0] * columns + matrix[0, 2], matrix[1, 0] * columns + matrix[1, 2]
    for band_top in range(top, bottom, BAND_ROWS):
        band_bottom = min(band_top + BAND_ROWS, bottom)
        rows = np.arange(band_top, band_bottom, dtype=np.float64)[:, None]
        u = (u_cols[None, :] + matrix[0, 1] * rows).astype(np.float32)
        v = (v_cols[None, :] + matrix[1, 1] * rows).astype(np.float32)
        mask = crop_mask((u + 0.5) / ratio - 0.5, (v + 0.5) / ratio - 0.5, placement.side, feather)
        if not mask.any():
            continue
        warped = cv2.remap(source, u, v, interpolation=cv2.INTER_LANCZOS4, borderMode=cv2.BORDER_REPLICATE)
        del u, v
        region_box = (left, band_top, right, band_bottom)
        original = np.asarray(photo.crop(region_box))
        warped -= original
        warped *= mask[..., None]
        warped += original
        blended = np.clip(np.rint(warped, out=warped), 0, 255, out=warped).astype(np.uint8)
        del warped
        np.copyto(blended, original, where=(mask <= 0)[..., None])  # exactly the photo where nothing is pasted
        photo.paste(Image.fromarray(blended, "RGB"), region_box[:2])
    return box


def paste_back(
    photo: Image.Image, crop: Image.Image, landmarks: np.ndarray, aligned_size: int, feather: float = FEATHER
) -> Image.Image:
    """A copy of ``photo`` (RGB, EXIF orientation applied) with ``crop`` blended back where the face with
    these ``landmarks`` was aligned from at ``aligned_size`` (the crop may have any side)."""
    out = photo.convert("RGB").copy() if photo.mode != "RGB" else photo.copy()
    placement = Placement.from_landmarks(landmarks, out.size, aligned_size, crop.width)
    paste_into(out, crop, placement, feather)
    return out
