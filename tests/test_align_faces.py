"""Face alignment library: FFHQ recipe, robustness, input modes, errors, identity descriptors."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageOps

from selfage_cli.faces.engine.align import align_file, align_image
from selfage_cli.faces.engine.detect import MIN_EYE_DISTANCE, choose_faces, find_faces
from selfage_cli.faces.engine.errors import FaceTooSmallError, NoFaceError, UnreadableImageError
from selfage_cli.faces.engine.ffhq import ffhq_align, ffhq_quad, source_to_aligned
from selfage_cli.faces.engine.identity import SAME_PERSON_THRESHOLD, descriptor_distance, face_descriptor
from selfage_cli.faces.engine.loading import GREY_BACKGROUND, load_image, to_rgb

# Bounds for "aligns to nearly the same image": mean absolute error (0–255 scale) over the central
# 256×256 of the 512² output (the face; the corners hold padding or canvas, which differ by design).
# Measured: astronaut ≤ 2.2 (rotated ±20°, 2×, on a canvas, EXIF-rotated); Grace Hopper (glasses,
# wrinkles: a 1-px shift alone gives 5.5) ≤ 8. A wrong rotation, scale or offset gives 20–60.
SMOOTH_FACE_MAE = 5.0
TEXTURED_FACE_MAE = 12.0


def central_mae(a: Image.Image, b: Image.Image) -> float:
    x = np.asarray(a, dtype=np.float64)
    y = np.asarray(b, dtype=np.float64)
    h, w = x.shape[:2]
    return float(np.abs(x - y)[h // 4 : 3 * h // 4, w // 4 : 3 * w // 4].mean())


@pytest.fixture(scope="module")
def astronaut(astronaut_path):
    return load_image(astronaut_path)


@pytest.fixture(scope="module")
def hopper(hopper_path):
    return load_image(hopper_path)


@pytest.fixture(scope="module")
def astronaut_face(astronaut):
    return align_image(astronaut, name="astronaut.png")[0]


@pytest.fixture(scope="module")
def hopper_face(hopper):
    return align_image(hopper, name="grace_hopper.jpg")[0]


# ---- the recipe ----------------------------------------------------------------------------------
def test_ffhq_quad_matches_hand_computation():
    landmarks = np.zeros((68, 2))
    landmarks[36:42] = (100, 100)  # left eye centre
    landmarks[42:48] = (140, 100)  # right eye centre
    landmarks[48] = (105, 150)
    landmarks[54] = (135, 150)
    quad = ffhq_quad(landmarks)
    # eye_to_eye (40, 0), eye_to_mouth (0, 50): x = (40, 0) + (50, 0) → unit × max(80, 90) = (90, 0);
    # centre = eye midpoint (120, 100) + 0.1 × (0, 50).
    np.testing.assert_allclose(quad.x, [90, 0])
    np.testing.assert_allclose(quad.y, [0, 90])
    np.testing.assert_allclose(quad.centre, [120, 105])
    np.testing.assert_allclose(quad.quad, [[30, 15], [30, 195], [210, 195], [210, 15]])
    # Eyes land at (70, 85)/180 of the output side (index coordinates of the 4× frame, reduced).
    eyes = source_to_aligned(np.array([[100.0, 100.0], [140.0, 100.0]]), quad, 512)
    expected = (np.array([[70.0, 85.0], [110.0, 85.0]]) / 180 * 2048 + 0.5) / 4 - 0.5
    np.testing.assert_allclose(eyes, expected)


def test_output_is_size_by_size_rgb(astronaut_face, hopper):
    assert astronaut_face.image.size == (512, 512)
    assert astronaut_face.image.mode == "RGB"
    small = align_image(hopper, size=128)[0]
    assert small.image.size == (128, 128)
    assert small.landmarks.shape == (68, 2)


@pytest.mark.parametrize("which", ["astronaut_face", "hopper_face"])
def test_eye_centres_land_where_the_recipe_puts_them(which, request):
    face = request.getfixturevalue(which)
    expected = face.aligned_landmarks
    found = [c for c in find_faces(face.image) if c.sane][0].landmarks
    for eye in (slice(36, 42), slice(42, 48)):
        error = np.hypot(*(found[eye].mean(0) - expected[eye].mean(0)))
        assert error < 2.0, f"{which}: eye centre {error:.2f} px from where FFHQ puts it"
    # Level eyes, horizontally symmetric about the centre (the recipe's x axis follows the eye line).
    left, right = expected[36:42].mean(0), expected[42:48].mean(0)
    assert abs(left[1] - right[1]) < 1.0


@pytest.mark.parametrize("scale,size", [(1.0, 512), (2.0, 128)])  # 2×/128: the shrink path (shrink = 2)
def test_warp_moves_marked_points_exactly_where_predicted(hopper, hopper_face, scale, size):
    """Gaussian dots at sub-pixel positions on a flat photo-sized image end up where predicted."""
    width, height = round(hopper.width * scale), round(hopper.height * scale)
    landmarks = (hopper_face.landmarks + 0.5) * scale - 0.5
    points = np.array([landmarks[36:42].mean(0), landmarks[42:48].mean(0), landmarks[48], landmarks[54]])
    yy, xx = np.mgrid[:height, :width]
    sigma = 2.0 * scale
    dots = sum(np.exp(-((xx - x) ** 2 + (yy - y) ** 2) / (2 * sigma**2)) for x, y in points)
    image = Image.fromarray(np.repeat((40 + 200 * dots)[..., None], 3, axis=2).round().astype(np.uint8))
    aligned, quad = ffhq_align(image, landmarks, size)
    if scale > 1:
        assert np.floor(quad.qsize / size * 0.5) >= 2
    signal = np.asarray(aligned, float)[..., 0] - 40
    predicted = source_to_aligned(points, quad, size)
    oy, ox = np.mgrid[:size, :size]
    window = max(4, size // 40)
    for px, py in predicted:
        weights = signal * ((np.abs(ox - px) <= window) & (np.abs(oy - py) <= window))
        centroid = np.array([(weights * ox).sum(), (weights * oy).sum()]) / weights.sum()
        assert np.hypot(*(centroid - [px, py])) < 0.5  # the shrink step rounds like the original (≤ 0.25 px)


# ---- robustness ----------------------------------------------------------------------------------
def _variant(image: Image.Image, kind: str) -> Image.Image:
    if kind.startswith("rotate"):
        return image.rotate(float(kind[6:]), resample=Image.Resampling.BICUBIC, expand=True, fillcolor=(128, 128, 128))
    if kind.startswith("scale"):
        factor = float(kind[5:])
        return image.resize((round(image.width * factor), round(image.height * factor)), Image.Resampling.LANCZOS)
    canvas = Image.new("RGB", (image.width * 2 + 101, image.height * 2 + 47), (90, 120, 60))
    canvas.paste(image, (image.width // 2 + 37, image.height // 3))
    return canvas


@pytest.mark.parametrize(
    "who,kind,bound",
    [
        ("astronaut", "rotate20", SMOOTH_FACE_MAE),
        ("astronaut", "rotate-20", SMOOTH_FACE_MAE),
        ("astronaut", "scale2", SMOOTH_FACE_MAE),
        ("astronaut", "canvas", SMOOTH_FACE_MAE),
        # Halved, the astronaut's eyes are 22 px apart (below the 32-px minimum): use Grace Hopper.
        ("hopper", "scale0.5", TEXTURED_FACE_MAE),
    ],
)
def test_same_photo_transformed_aligns_to_nearly_the_same_image(who, kind, bound, request):
    image = request.getfixturevalue(who)
    base = request.getfixturevalue(f"{who}_face")
    face = align_image(_variant(image, kind), name=kind)[0]
    assert central_mae(face.image, base.image) < bound


def test_exif_rotated_jpeg_aligns_like_the_upright_one(astronaut, tmp_path):
    upright = tmp_path / "upright.jpg"
    astronaut.save(upright, quality=95)
    stored_sideways = astronaut.transpose(Image.Transpose.ROTATE_90)  # what a phone writes
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90° clockwise to display
    tagged = tmp_path / "tagged.jpg"
    stored_sideways.save(tagged, quality=95, exif=exif)
    assert load_image(tagged).size == astronaut.size
    a = align_file(upright)[0]
    b = align_file(tagged)[0]
    assert central_mae(a.image, b.image) < SMOOTH_FACE_MAE
    np.testing.assert_allclose(a.landmarks, b.landmarks, atol=2.0)


def test_grayscale_and_rgba_photos_align(astronaut, astronaut_face, tmp_path):
    grey = tmp_path / "grey.png"
    astronaut.convert("L").save(grey)
    face = align_file(grey)[0]
    pixels = np.asarray(face.image)
    assert face.image.size == (512, 512)
    assert np.array_equal(pixels[..., 0], pixels[..., 1]) and np.array_equal(pixels[..., 1], pixels[..., 2])

    rgba = astronaut.convert("RGBA")
    alpha = Image.new("L", astronaut.size, 255)
    ImageDraw.Draw(alpha).rectangle((0, 300, 511, 511), fill=0)  # transparent lower part (the suit)
    rgba.putalpha(alpha)
    path = tmp_path / "cutout.png"
    rgba.save(path)
    loaded = load_image(path)
    assert loaded.getpixel((10, 400)) == GREY_BACKGROUND
    face = align_file(path)[0]
    assert face.image.size == (512, 512)
    top = slice(0, 200)
    assert (
        central_mae(
            Image.fromarray(np.asarray(face.image)[top]), Image.fromarray(np.asarray(astronaut_face.image)[top])
        )
        < SMOOTH_FACE_MAE
    )


def test_sixteen_bit_grayscale_aligns(astronaut, tmp_path):
    grey16 = (np.asarray(astronaut.convert("L"), dtype=np.uint16) * 257).astype(np.uint16)
    path = tmp_path / "grey16.png"
    Image.fromarray(grey16).save(path)
    with Image.open(path) as raw:
        assert raw.mode.startswith("I")
    loaded = np.asarray(load_image(path))
    np.testing.assert_array_equal(loaded[..., 0], np.asarray(astronaut.convert("L")))
    assert align_file(path)[0].image.size == (512, 512)


@pytest.mark.parametrize(
    "mode,expected",
    [
        ("L", (77, 77, 77)),
        ("1", (255, 255, 255)),
        ("P", (200, 30, 40)),
        ("CMYK", (200, 30, 40)),
        ("LA", (77, 77, 77)),
        ("I", (77, 77, 77)),
        ("F", (77, 77, 77)),
    ],
)
def test_pixel_modes_become_rgb(mode, expected):
    if mode in ("L", "LA", "I", "F"):
        image = Image.new("L", (4, 4), 77).convert(mode)
    elif mode == "1":
        image = Image.new("1", (4, 4), 1)
    elif mode == "P":
        image = Image.new("RGB", (4, 4), (200, 30, 40)).convert("P", palette=Image.Palette.ADAPTIVE)
    else:
        image = Image.new("RGB", (4, 4), (200, 30, 40)).convert(mode)
    rgb = to_rgb(image)
    assert rgb.mode == "RGB"
    assert all(abs(a - b) <= 2 for a, b in zip(rgb.getpixel((1, 1)), expected, strict=True))


def test_transparent_pixels_become_neutral_grey():
    rgba = Image.new("RGBA", (4, 4), (255, 0, 0, 0))
    assert to_rgb(rgba).getpixel((0, 0)) == GREY_BACKGROUND
    half = Image.new("RGBA", (4, 4), (255, 255, 255, 128))
    assert to_rgb(half).getpixel((0, 0)) == (192, 192, 192)


# ---- bad input -----------------------------------------------------------------------------------
def test_no_face_raises_a_clear_error(tmp_path):
    rng = np.random.default_rng(0)
    landscape = np.zeros((400, 600, 3), np.uint8)
    landscape[:200] = (120, 170, 230)
    landscape[200:] = (60, 130, 50)
    landscape = np.clip(landscape + rng.normal(0, 8, landscape.shape), 0, 255).astype(np.uint8)
    path = tmp_path / "landscape.png"
    Image.fromarray(landscape).save(path)
    with pytest.raises(NoFaceError, match=r"^landscape\.png: no face found"):
        align_file(path)


def test_truncated_and_non_image_files_raise_unreadable(hopper_path, tmp_path):
    truncated = tmp_path / "cut.jpg"
    truncated.write_bytes(hopper_path.read_bytes()[:15000])
    with pytest.raises(UnreadableImageError, match=r"^cut\.jpg: the image data is truncated or corrupt"):
        align_file(truncated)
    text = tmp_path / "notes.jpg"
    text.write_text("not a photo")
    with pytest.raises(UnreadableImageError, match=r"^notes\.jpg: not an image file"):
        align_file(text)
    with pytest.raises(UnreadableImageError, match="does not exist"):
        align_file(tmp_path / "missing.png")


def test_unreadable_errors_keep_their_parts_and_survive_pickling(tmp_path):
    import pickle

    text = tmp_path / "notes.jpg"
    text.write_text("not a photo")
    with pytest.raises(UnreadableImageError) as caught:
        align_file(text)
    error = caught.value
    assert (error.name, error.problem) == ("notes.jpg", "not an image file Pillow can read")
    assert str(error) == f"notes.jpg: not an image file Pillow can read; {error.fix}."
    assert error.sentence("re-run the edit") == "notes.jpg: not an image file Pillow can read; re-run the edit."
    copy = pickle.loads(pickle.dumps(error))  # align's worker processes send errors back pickled
    assert type(copy) is UnreadableImageError and str(copy) == str(error)


def test_face_too_small_is_refused_with_its_size(astronaut):
    half = astronaut.resize((256, 256), Image.Resampling.LANCZOS)
    with pytest.raises(
        FaceTooSmallError, match=r"half\.png: the face is too small \(2\d px between the eye centres, minimum 32 px\)"
    ):
        align_image(half, name="half.png")


def test_threshold_lets_both_test_portraits_through(astronaut_face, hopper_face):
    assert astronaut_face.eye_distance > MIN_EYE_DISTANCE * 1.25
    assert hopper_face.eye_distance > MIN_EYE_DISTANCE * 2


def test_mission_patch_is_rejected_by_the_landmark_sanity_check(astronaut):
    candidates = find_faces(astronaut)
    assert len(candidates) == 2  # HOG fires on the face and on the round mission patch
    patch = [c for c in candidates if not c.sane]
    assert len(patch) == 1 and patch[0].box[1] > 300
    chosen, found, warnings = choose_faces(candidates, name="astronaut.png")
    assert found == 1 and warnings == []
    assert chosen[0].box[1] < 100


def test_several_faces_pick_the_most_confident_or_all(astronaut, hopper):
    canvas = Image.new("RGB", (1100, 620), (128, 128, 128))
    canvas.paste(astronaut, (0, 40))
    canvas.paste(hopper, (560, 0))
    from selfage_cli import console

    console.WARNINGS.clear()
    one = align_image(canvas, name="group.jpg")
    assert len(one) == 1 and one[0].faces_found == 2
    assert any("group.jpg: 2 faces found" in w for w in console.WARNINGS)
    both = align_image(canvas, all_faces=True, name="group.jpg")
    assert [f.face_index for f in both] == [0, 1]
    assert {f.box[0] < 550 for f in both} == {True, False}


def test_large_photo_is_detected_on_a_downscaled_copy(hopper, tmp_path):
    canvas = Image.new("RGB", (6000, 4000), (70, 90, 110))
    canvas.paste(hopper.resize((hopper.width * 3, hopper.height * 3), Image.Resampling.BILINEAR), (3900, 1500))
    path = tmp_path / "big.jpg"
    canvas.save(path, quality=85)
    face = align_file(path)[0]
    assert face.image.size == (512, 512)
    assert 3900 < face.box[0] < face.box[2] < 3900 + hopper.width * 3
    assert face.eye_distance == pytest.approx(3 * 81, rel=0.08)


def test_cnn_detector(hopper):
    # Keep the CNN's input small (200², face ~115 px): it takes seconds on a CPU at 512².
    around_face = hopper.crop((110, 70, 430, 390)).resize((200, 200), Image.Resampling.LANCZOS)
    face = align_image(around_face, detector="cnn")[0]
    assert face.detector == "cnn" and face.image.size == (512, 512)


# ---- identity --------------------------------------------------------------------------------------
def test_descriptors_separate_people_and_match_a_mirror(astronaut_face, hopper_face):
    a = face_descriptor(astronaut_face.image, astronaut_face.aligned_landmarks)
    h = face_descriptor(hopper_face.image, hopper_face.aligned_landmarks)
    detected = face_descriptor(astronaut_face.image)  # landmarks found on the aligned image itself
    mirror = face_descriptor(ImageOps.mirror(astronaut_face.image))
    assert a.shape == (128,)
    assert descriptor_distance(a, a) == 0.0
    assert descriptor_distance(a, detected) < 0.1
    assert descriptor_distance(a, h) > SAME_PERSON_THRESHOLD
    assert descriptor_distance(a, mirror) < 0.35


def test_descriptor_of_a_faceless_image_is_none():
    assert face_descriptor(np.full((128, 128, 3), 128, np.uint8)) is None


def test_in_memory_array_input(astronaut):
    buffer = io.BytesIO()
    astronaut.save(buffer, format="PNG")
    array = np.asarray(astronaut)
    face = align_image(array)[0]
    assert face.image.size == (512, 512)


def test_missing_model_files_name_the_fix(tmp_path, monkeypatch):
    from selfage_cli.errors import SelfageError
    from selfage_cli.faces.engine import dlib_models

    monkeypatch.setenv("SELFAGE_DLIB_MODELS", str(tmp_path))
    with pytest.raises(SelfageError, match=r"shape_predictor_68_face_landmarks\.dat: dlib model file not found; pip"):
        dlib_models.model_path(dlib_models.SHAPE_PREDICTOR_68)
    monkeypatch.delenv("SELFAGE_DLIB_MODELS")
    assert dlib_models.model_path(dlib_models.SHAPE_PREDICTOR_68).is_file()


@pytest.mark.parametrize("suffix", [".png", ".jpg", ".webp", ".bmp", ".tif"])
def test_common_formats_are_read(astronaut, tmp_path, suffix):
    path = tmp_path / f"photo{suffix}"
    astronaut.save(path)
    loaded = load_image(path)
    assert loaded.mode == "RGB" and loaded.size == astronaut.size
    assert np.abs(np.asarray(loaded, float) - np.asarray(astronaut, float)).mean() < 6  # lossy formats too


def test_cmyk_jpeg_is_converted(astronaut, tmp_path):
    path = tmp_path / "print.jpg"
    astronaut.convert("CMYK").save(path, quality=95)
    loaded = load_image(path)
    assert loaded.mode == "RGB"
    assert np.abs(np.asarray(loaded, float) - np.asarray(astronaut, float)).mean() < 6
