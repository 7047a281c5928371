"""The FFHQ alignment recipe (NVlabs ffhq-dataset, ``recreate_aligned_images``), faithfully.

From the 68 landmarks: eye centres (means of points 36–41 and 42–47), mouth corners (48 and 54), then
an oriented square ("quad") whose half-side vector is ``x = eye_to_eye − rot90(eye_to_mouth)``
normalised and scaled by ``max(2.0·|eye_to_eye|, 1.8·|eye_to_mouth|)``, centred 0.1·eye_to_mouth
below the eye midpoint. The photo is then

1. **shrunk** by an integer factor ``floor(qsize / size / 2)`` when the face is more than twice the
   output size (Lanczos), so the final warp never minifies by more than 2×;
2. **cropped** to the quad's bounding box plus a border of 10 % of the quad size;
3. **padded** where the quad leaves the photo: reflect padding (at least 30 % of the quad size), blurred
   (Gaussian, σ = 2 % of the quad size) progressively towards the outside, and faded towards the
   padding's median colour — exactly the original's mask arithmetic;
4. **warped** with the quad transform to 4× the output size (bilinear) and reduced to ``size`` with a
   Lanczos filter (FFHQ: 4096 → 1024; here 4·size → size).

Two differences from the original that do not change the result: the shrink is computed on the crop's
region only (Pillow's ``resize(box=…)`` gives the same pixels as shrinking the whole photo and then
cropping, without decoding a second full-size copy), and OpenCV's Gaussian blur (same σ, same 4σ
truncation, mirror boundary) replaces ``scipy.ndimage.gaussian_filter``.

:func:`source_to_aligned` maps source pixel positions (e.g. landmarks) to where the recipe puts them in
the output, so tests and callers know where the eyes land.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image

SUPERSAMPLE = 4  # transform_size / output_size in the original (4096 / 1024)


@dataclass(frozen=True)
class FFHQQuad:
    """The oriented crop square in source pixels: corners (top-left, bottom-left, bottom-right, top-right)."""

    quad: np.ndarray  # (4, 2)
    centre: np.ndarray  # c0
    x: np.ndarray  # half-side vector along the eye line (points right)
    y: np.ndarray  # half-side vector pointing down the face

    @property
    def qsize(self) -> float:
        return float(np.hypot(*self.x) * 2)


def eye_mouth_points(landmarks: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Left eye centre, right eye centre, left and right mouth corners from the 68 landmarks."""
    lm = np.asarray(landmarks, dtype=np.float64)
    if lm.shape != (68, 2):
        raise ValueError(f"expected 68 landmarks of shape (68, 2), got {lm.shape}")
    return lm[36:42].mean(axis=0), lm[42:48].mean(axis=0), lm[48], lm[54]


def ffhq_quad(landmarks: np.ndarray) -> FFHQQuad:
    """The FFHQ crop square for a face's 68 landmarks (``rotate_level=True``, no random shift)."""
    eye_left, eye_right, mouth_left, mouth_right = eye_mouth_points(landmarks)
    eye_avg = (eye_left + eye_right) * 0.5
    eye_to_eye = eye_right - eye_left
    mouth_avg = (mouth_left + mouth_right) * 0.5
    eye_to_mouth = mouth_avg - eye_avg

    x = eye_to_eye - np.flipud(eye_to_mouth) * [-1, 1]
    x = x / np.hypot(*x)
    x = x * max(np.hypot(*eye_to_eye) * 2.0, np.hypot(*eye_to_mouth) * 1.8)
    y = np.flipud(x) * [-1, 1]
    c0 = eye_avg + eye_to_mouth * 0.1
    quad = np.stack([c0 - x - y, c0 - x + y, c0 + x + y, c0 + x - y])
    return FFHQQuad(quad=quad, centre=c0, x=x, y=y)


def source_to_aligned(points: np.ndarray, quad: FFHQQuad, size: int) -> np.ndarray:
    """Where source pixel positions (N×2, pixel centres at integers) land in the ``size``² output.

    The quad's top-left corner maps to the output's top-left pixel edge; the warp is a similarity, so
    this is exact up to the original's sub-pixel rounding of the shrink step (≤ 0.25 output px).
    """
    pts = np.asarray(points, dtype=np.float64).reshape(-1, 2)
    side = 2.0 * np.hypot(*quad.x)
    ux = quad.x / np.hypot(*quad.x)
    uy = quad.y / np.hypot(*quad.y)
    rel = pts - quad.quad[0]
    transform_size = SUPERSAMPLE * size
    # Index coordinates in the transform_size frame (Pillow's QUAD warp with the original's +0.5),
    # then the Lanczos reduction to ``size`` (continuous coordinates scale by size / transform_size).
    u = (rel @ ux) / side * transform_size
    v = (rel @ uy) / side * transform_size
    return np.stack([(u + 0.5) / SUPERSAMPLE - 0.5, (v + 0.5) / SUPERSAMPLE - 0.5], axis=1)


def _gaussian_blur(array: np.ndarray, sigma: float) -> np.ndarray:
    """``scipy.ndimage.gaussian_filter(array, [sigma, sigma, 0])`` (truncate 4, mode reflect) via OpenCV."""
    import cv2

    radius = int(4.0 * sigma + 0.5)
    if radius < 1:
        return array.copy()
    ksize = 2 * radius + 1
    return cv2.GaussianBlur(array, (ksize, ksize), sigmaX=sigma, sigmaY=sigma, borderType=cv2.BORDER_REFLECT)


@dataclass(frozen=True)
class FFHQGeometry:
    """The recipe's steps for one face in one photo, as numbers (what :func:`ffhq_align` does to the pixels).

    ``shrink`` (1: none), the shrunk photo's ``work_size``, the ``crop`` box in that frame, the ``pad``
    added on each side (left, top, right, bottom; zeros without padding) and ``quad`` in the padded
    frame (pixel centres at integers), which the warp maps onto the ``size``² output.
    :meth:`matrix` composes them into the affine map from source pixels to output pixels.
    """

    image_size: tuple[int, int]
    size: int
    shrink: int
    work_size: tuple[int, int]
    crop: tuple[int, int, int, int]
    pad: tuple[int, int, int, int]
    padded: bool
    quad: np.ndarray  # (4, 2) in the padded frame: top-left, bottom-left, bottom-right, top-right
    border: int

    def matrix(self, output_size: int | None = None) -> np.ndarray:
        """The 2×3 affine map from source pixel positions to output pixel positions (centres at integers).

        Exact for the recipe: the shrink's actual per-axis factors (``width / work_width``, Pillow's
        resize maps pixel edges), the crop and pad offsets, Pillow's QUAD warp of ``quad + 0.5`` (the
        quad's top-left corner lands on the output's top-left pixel edge) and the Lanczos reduction
        (edges scale). ``output_size`` (default ``size``) gives the map into the same square resized
        to another side, e.g. the model's resolution.
        """
        out = float(output_size or self.size)
        # source → work frame (pixel centres): (x + 0.5) / factor − 0.5 per axis.
        fx = self.image_size[0] / self.work_size[0]
        fy = self.image_size[1] / self.work_size[1]
        to_work = np.array([[1.0 / fx, 0.0, 0.5 / fx - 0.5], [0.0, 1.0 / fy, 0.5 / fy - 0.5], [0.0, 0.0, 1.0]])
        # work → padded frame: a translation.
        shift = np.array([[1.0, 0.0, self.pad[0] - self.crop[0]], [0.0, 1.0, self.pad[1] - self.crop[1]], [0, 0, 1.0]])
        # padded frame → output: the quad's sides as the unit square (edges), then pixel centres.
        origin = self.quad[0]
        side_x = self.quad[3] - self.quad[0]
        side_y = self.quad[1] - self.quad[0]
        basis = np.linalg.inv(np.stack([side_x, side_y], axis=1))  # (padded − origin) → (a, b) in [0, 1]²
        to_unit = np.eye(3)
        to_unit[:2, :2] = basis
        to_unit[:2, 2] = -basis @ origin
        to_output = np.array([[out, 0.0, -0.5], [0.0, out, -0.5], [0.0, 0.0, 1.0]])
        return (to_output @ to_unit @ shift @ to_work)[:2]


def ffhq_geometry(
    landmarks_or_quad: np.ndarray | FFHQQuad,
    image_size: tuple[int, int],
    size: int = 512,
    *,
    enable_padding: bool = True,
) -> FFHQGeometry:
    """The recipe's shrink, crop, pad and warp quad for a face in a photo of ``image_size`` (width, height)."""
    spec = landmarks_or_quad if isinstance(landmarks_or_quad, FFHQQuad) else ffhq_quad(landmarks_or_quad)
    quad = spec.quad.copy()
    qsize = spec.qsize
    output_size = int(size)
    width, height = (int(v) for v in image_size)

    # Shrink (computed for the whole photo as in the original; applied to the crop's region only).
    shrink = int(np.floor(qsize / output_size * 0.5))
    work_size = (width, height)
    if shrink > 1:
        work_size = (int(np.rint(float(width) / shrink)), int(np.rint(float(height) / shrink)))
        quad /= shrink
        qsize /= shrink

    # Crop.
    border = max(int(np.rint(qsize * 0.1)), 3)
    crop = (
        int(np.floor(min(quad[:, 0]))),
        int(np.floor(min(quad[:, 1]))),
        int(np.ceil(max(quad[:, 0]))),
        int(np.ceil(max(quad[:, 1]))),
    )
    crop = (
        max(crop[0] - border, 0),
        max(crop[1] - border, 0),
        min(crop[2] + border, work_size[0]),
        min(crop[3] + border, work_size[1]),
    )
    if crop[2] <= crop[0] or crop[3] <= crop[1]:
        raise ValueError("the face's crop square lies outside the image")
    quad -= crop[0:2]

    # Pad.
    crop_w, crop_h = crop[2] - crop[0], crop[3] - crop[1]
    pad = (
        int(np.floor(min(quad[:, 0]))),
        int(np.floor(min(quad[:, 1]))),
        int(np.ceil(max(quad[:, 0]))),
        int(np.ceil(max(quad[:, 1]))),
    )
    pad = (
        max(-pad[0] + border, 0),
        max(-pad[1] + border, 0),
        max(pad[2] - crop_w + border, 0),
        max(pad[3] - crop_h + border, 0),
    )
    padded = bool(enable_padding and max(pad) > border - 4)
    if padded:
        pad = tuple(int(v) for v in np.maximum(pad, int(np.rint(qsize * 0.3))))
        quad += pad[:2]
    else:
        pad = (0, 0, 0, 0)
    return FFHQGeometry(
        image_size=(width, height),
        size=output_size,
        shrink=max(shrink, 1),
        work_size=work_size,
        crop=crop,
        pad=pad,
        padded=padded,
        quad=quad,
        border=border,
    )


def ffhq_align(
    image: Image.Image, landmarks: np.ndarray, size: int = 512, *, enable_padding: bool = True
) -> tuple[Image.Image, FFHQQuad]:
    """The FFHQ-aligned ``size``² RGB crop of ``image`` for one face's landmarks, and its quad."""
    spec = ffhq_quad(landmarks)
    geometry = ffhq_geometry(spec, image.size, size, enable_padding=enable_padding)
    output_size = geometry.size
    transform_size = SUPERSAMPLE * output_size
    work_size, crop, pad, quad = geometry.work_size, geometry.crop, geometry.pad, geometry.quad
    qsize = spec.qsize / geometry.shrink if geometry.shrink > 1 else spec.qsize

    # Shrink and crop.
    if geometry.shrink > 1:
        factor_x, factor_y = image.width / work_size[0], image.height / work_size[1]
        region = (crop[0] * factor_x, crop[1] * factor_y, crop[2] * factor_x, crop[3] * factor_y)
        img = image.resize((crop[2] - crop[0], crop[3] - crop[1]), Image.Resampling.LANCZOS, box=region)
    elif crop[2] - crop[0] < work_size[0] or crop[3] - crop[1] < work_size[1]:
        img = image.crop(crop)
    else:
        img = image

    # Pad.
    if geometry.padded:
        arr = np.pad(np.float32(img), ((pad[1], pad[3]), (pad[0], pad[2]), (0, 0)), "reflect")
        h, w, _ = arr.shape
        yy, xx, _ = np.ogrid[:h, :w, :1]
        mask = np.maximum(
            1.0 - np.minimum(np.float32(xx) / pad[0], np.float32(w - 1 - xx) / pad[2]),
            1.0 - np.minimum(np.float32(yy) / pad[1], np.float32(h - 1 - yy) / pad[3]),
        )
        blur = qsize * 0.02
        # The original's two lines, computed in place to hold fewer full-size float copies:
        #   img += (gaussian_filter(img, [blur, blur, 0]) - img) * np.clip(mask * 3.0 + 1.0, 0.0, 1.0)
        #   img += (np.median(img, axis=(0, 1)) - img) * np.clip(mask, 0.0, 1.0)
        step = _gaussian_blur(arr, blur)
        step -= arr
        step *= np.clip(mask * 3.0 + 1.0, 0.0, 1.0)
        arr += step
        np.subtract(np.median(arr, axis=(0, 1)), arr, out=step)
        step *= np.clip(mask, 0.0, 1.0)
        arr += step
        del step
        img = Image.fromarray(np.uint8(np.clip(np.rint(arr), 0, 255)), "RGB")

    # Transform.
    img = img.transform(
        (transform_size, transform_size),
        Image.Transform.QUAD,
        tuple((quad + 0.5).flatten()),
        Image.Resampling.BILINEAR,
    )
    if output_size < transform_size:
        img = img.resize((output_size, output_size), Image.Resampling.LANCZOS)
    return img, spec
