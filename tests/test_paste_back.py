"""Paste-back geometry and blending (``selfage_cli.faces.engine.paste_back``), without the diffusion model.

Each test aligns a photo with the align stage's own code and pastes a crop back: the aligned crop
itself (identity: the photo must come back), or a flat colour (locality: where exactly it lands).
"""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from selfage_cli.faces.engine import paste_back as pb
from selfage_cli.faces.engine.align import align_image
from selfage_cli.faces.engine.ffhq import ffhq_quad
from selfage_cli.faces.engine.loading import load_image

MIN_PSNR = 35.0  # dB inside the mask, the bound
MAX_SEAM_MAE = 2.0  # grey levels on the mask's boundary ring


@pytest.fixture(scope="module")
def astronaut(astronaut_path):
    return load_image(astronaut_path)


@pytest.fixture(scope="module")
def hopper(hopper_path):
    return load_image(hopper_path)


def rotated_scaled_on_canvas(image: Image.Image) -> Image.Image:
    """The photo scaled 0.8×, rotated 17° and placed off-centre on a larger canvas."""
    small = image.resize((round(image.width * 0.8), round(image.height * 0.8)), Image.Resampling.LANCZOS)
    turned = small.rotate(17, resample=Image.Resampling.BICUBIC, expand=True, fillcolor=(90, 120, 60))
    canvas = Image.new("RGB", (turned.width + 400, turned.height + 300), (90, 120, 60))
    canvas.paste(turned, (230, 170))
    return canvas


def photo_mask(placement: pb.Placement) -> np.ndarray:
    """The blending weight at every photo pixel (float32, height × width)."""
    width, height = placement.image_size
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float64)
    m = placement.matrix
    return pb.crop_mask(m[0, 0] * xx + m[0, 1] * yy + m[0, 2], m[1, 0] * xx + m[1, 1] * yy + m[1, 2], placement.side)


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    error = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float(10 * np.log10(255.0**2 / max(error, 1e-12)))


def paste_own_crop(photo: Image.Image, size: int = 512) -> tuple[np.ndarray, np.ndarray, pb.Placement]:
    """(original pixels, pixels after pasting the unedited aligned crop back, placement)."""
    face = align_image(photo, size=size, name="photo")[0]
    out = pb.paste_back(photo, face.image, face.landmarks, size)
    return np.asarray(photo), np.asarray(out), pb.Placement.from_landmarks(face.landmarks, photo.size, size)


def _photo(request, which: str, tmp_path) -> Image.Image:
    if which == "rotated17_scaled0.8":
        return rotated_scaled_on_canvas(request.getfixturevalue("astronaut"))
    if which == "exif6_jpeg":
        upright = request.getfixturevalue("astronaut")
        exif = Image.Exif()
        exif[0x0112] = 6  # stored sideways: rotate 90° clockwise to display
        path = tmp_path / "sideways.jpg"
        upright.transpose(Image.Transpose.ROTATE_90).save(path, quality=95, exif=exif)
        photo = load_image(path)
        assert photo.size == upright.size  # upright, as the user sees it
        return photo
    return request.getfixturevalue(which)


@pytest.mark.parametrize("which", ["astronaut", "hopper", "rotated17_scaled0.8", "exif6_jpeg"])
def test_unedited_crop_pasted_back_gives_the_original(which, request, tmp_path):
    photo = _photo(request, which, tmp_path)
    original, out, placement = paste_own_crop(photo)
    mask = photo_mask(placement)
    assert out.shape == original.shape
    assert np.array_equal(out[mask <= 0], original[mask <= 0])  # outside the mask: byte-identical
    inside = psnr(out[mask > 0], original[mask > 0])
    assert inside >= MIN_PSNR, f"{which}: {inside:.1f} dB inside the mask"
    assert (mask > 0).sum() > 0.3 * (placement.footprint()[2] - placement.footprint()[0]) ** 2  # it did paste


@pytest.mark.parametrize("which", ["astronaut", "rotated17_scaled0.8"])
def test_no_seam_where_the_mask_ends(which, request, tmp_path):
    photo = _photo(request, which, tmp_path)
    original, out, placement = paste_own_crop(photo)
    mask = photo_mask(placement)
    inside = mask > 0
    # The boundary ring: pasted pixels with an unpasted 4-neighbour, and the whole feather band.
    outside = ~inside
    ring = inside & (
        np.roll(outside, 1, 0) | np.roll(outside, -1, 0) | np.roll(outside, 1, 1) | np.roll(outside, -1, 1)
    )
    band = (mask > 0) & (mask < 1)
    for name, where in (("boundary ring", ring), ("feather band", band)):
        assert where.sum() > 100
        step = np.abs(out[where].astype(float) - original[where].astype(float)).mean()
        assert step <= MAX_SEAM_MAE, f"{which}: {name} differs by {step:.2f} grey levels"


def test_flat_crop_lands_exactly_on_the_face_quad(astronaut):
    face = align_image(astronaut, name="astronaut.png")[0]
    colour = (255, 0, 255)
    out = np.asarray(pb.paste_back(astronaut, Image.new("RGB", (512, 512), colour), face.landmarks, 512))
    original = np.asarray(astronaut)
    changed = np.any(out != original, axis=2)
    assert changed.sum() > 1000
    # Every changed pixel lies inside the FFHQ quad (computed here from the landmarks, not from the
    # paste-back's matrix), within a pixel.
    quad = ffhq_quad(face.landmarks)
    side = quad.qsize
    ys, xs = np.nonzero(changed)
    rel = np.stack([xs, ys], axis=1) - quad.quad[0]
    a = rel @ (quad.x / np.hypot(*quad.x)) / side
    b = rel @ (quad.y / np.hypot(*quad.y)) / side
    slack = 1.5 / side
    assert a.min() >= -slack and a.max() <= 1 + slack and b.min() >= -slack and b.max() <= 1 + slack
    # The middle of the quad is the flat colour; the photo's corners are untouched.
    centre = np.rint(quad.centre).astype(int)
    assert tuple(out[centre[1], centre[0]]) == colour
    core = (a > pb.FEATHER + 0.02) & (a < 0.98 - pb.FEATHER) & (b > pb.FEATHER + 0.02) & (b < 0.98 - pb.FEATHER)
    assert np.abs(out[ys[core], xs[core]].astype(int) - colour).max() <= 1
    for y, x in ((0, 0), (0, -1), (-1, 0), (-1, -1)):
        corner = (slice(0, 40) if y == 0 else slice(-40, None), slice(0, 40) if x == 0 else slice(-40, None))
        assert np.array_equal(out[corner], original[corner])


def test_face_near_the_edge_writes_only_inside_the_photo(astronaut):
    """A face cut by the photo's edge (the alignment padded it): the paste covers just the photo's part."""
    cut = astronaut.crop((120, 60, 512, 512))  # the face close to the left and top edges
    face = align_image(cut, name="cut")[0]
    placement = pb.Placement.from_landmarks(face.landmarks, cut.size, 512)
    corners = placement.to_photo(np.array([[-0.5, -0.5], [511.5, 511.5]]))
    assert corners.min() < 0  # the quad leaves the photo
    out = pb.paste_back(cut, Image.new("RGB", (512, 512), (0, 255, 0)), face.landmarks, 512)
    assert out.size == cut.size
    assert np.asarray(out)[..., 1].max() == 255


def test_other_face_stays_byte_identical(astronaut, hopper):
    canvas = Image.new("RGB", (astronaut.width + 60 + hopper.width, hopper.height), (128, 128, 128))
    canvas.paste(astronaut, (0, 0))
    canvas.paste(hopper, (astronaut.width + 60, 0))
    faces = align_image(canvas, all_faces=True, name="two")
    assert len(faces) == 2
    chosen = max(faces, key=lambda f: f.landmarks[:, 0].mean())  # Grace Hopper, on the right
    other = min(faces, key=lambda f: f.landmarks[:, 0].mean())
    out = np.asarray(pb.paste_back(canvas, Image.new("RGB", (512, 512), (255, 0, 0)), chosen.landmarks, 512))
    before = np.asarray(canvas)
    left, top, right, bottom = other.box
    assert np.array_equal(out[top:bottom, left:right], before[top:bottom, left:right])
    assert np.array_equal(out[:, : astronaut.width], before[:, : astronaut.width])  # the whole other portrait
    assert not np.array_equal(out[:, astronaut.width :], before[:, astronaut.width :])


def test_shrunk_alignment_and_model_sized_crop(hopper):
    """A photo large enough for the recipe's shrink step, and a crop at another side than the aligned one."""
    big = hopper.resize((hopper.width * 3, hopper.height * 3), Image.Resampling.LANCZOS)
    face = align_image(big, size=160, name="big")[0]
    from selfage_cli.faces.engine.ffhq import ffhq_geometry

    assert ffhq_geometry(face.landmarks, big.size, 160).shrink >= 2
    crop = face.image.resize((128, 128), Image.Resampling.LANCZOS)  # the model's resolution
    placement = pb.Placement.from_landmarks(face.landmarks, big.size, 160, 128)
    assert placement.scale < 1  # the crop is magnified into the photo
    out = np.asarray(pb.paste_back(big, crop, face.landmarks, 160))
    mask = photo_mask(placement)
    # A 128² crop holds less detail than the 3× photo: compare at the crop's own scale (blurred).
    import cv2

    sigma = 1.0 / placement.scale / 2
    soft_out = cv2.GaussianBlur(out.astype(np.float32), (0, 0), sigma)
    soft_in = cv2.GaussianBlur(np.asarray(big, dtype=np.float32), (0, 0), sigma)
    assert psnr(soft_out[mask >= 1], soft_in[mask >= 1]) >= 30.0


def test_bands_give_the_same_pixels(astronaut, monkeypatch):
    face = align_image(astronaut, name="astronaut.png")[0]
    crop = Image.new("RGB", (512, 512), (10, 200, 30))
    whole = np.asarray(pb.paste_back(astronaut, crop, face.landmarks, 512))
    monkeypatch.setattr(pb, "BAND_ROWS", 37)
    banded = np.asarray(pb.paste_back(astronaut, crop, face.landmarks, 512))
    assert np.array_equal(whole, banded)
