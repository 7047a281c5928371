"""Robust image reading for alignment: any common file, any pixel mode, EXIF orientation applied.

:func:`load_image` returns an 8-bit RGB Pillow image whatever the file holds:

* EXIF orientation is applied (phone photos are often stored sideways with an orientation tag);
* grayscale, bilevel and palette images are expanded to RGB;
* images with transparency (RGBA, LA, palette with a transparent colour) are composited on neutral
  grey (128, 128, 128), so a transparent background neither turns black nor white;
* CMYK is converted through its embedded ICC profile when there is one (else Pillow's formula);
* 16-bit grayscale (``I;16``) and 32-bit integer/float images are scaled to 8 bits (16-bit RGB PNG/TIFF
  are already reduced to 8 bits by Pillow).

Large photos are decoded once at full resolution as 8-bit RGB (an 8000×6000 photo takes 144 MB); face
detection runs on a downscaled copy (:func:`detection_copy`) and the aligned crop is cut from the
full-resolution image, with no float copy of the whole photo.
"""

from __future__ import annotations

import io
import warnings
from collections.abc import Iterable
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from selfage_cli.faces.engine.errors import UnreadableImageError

GREY_BACKGROUND = (128, 128, 128)
IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff"})
READABLE = "PNG, JPEG, WebP, BMP or TIFF"


# Pillow's UserWarning for a damaged EXIF block; a photo is used as stored then (no raw warning leaks).
CORRUPT_EXIF = r"(?i).*corrupt exif"


def load_image(path: str | Path) -> Image.Image:
    """The photo at ``path`` as 8-bit RGB with its EXIF orientation applied.

    Raises :class:`UnreadableImageError` (one sentence naming the file) for a missing, non-image,
    truncated or corrupt file.
    """
    path = Path(path)
    name = path.name
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            warnings.filterwarnings("ignore", message=CORRUPT_EXIF, category=UserWarning)  # the photo itself is fine
            with Image.open(path) as opened:
                opened.load()
                image = _apply_exif_orientation(opened, name)
                return to_rgb(image)
    except FileNotFoundError:
        raise UnreadableImageError(name, f"the file does not exist ({path})", "check the path") from None
    except IsADirectoryError:
        raise UnreadableImageError(name, "is a folder, not an image", "pass the folder itself to align it") from None
    except PermissionError:
        raise UnreadableImageError(name, "permission denied", "make the file readable") from None
    except UnidentifiedImageError:
        raise UnreadableImageError(
            name, "not an image file Pillow can read", f"give a {READABLE} photo or remove it"
        ) from None
    except Image.DecompressionBombError as exc:
        raise UnreadableImageError(
            name, f"too many pixels to decode safely ({exc})", "downscale it below 178 megapixels first"
        ) from None
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise UnreadableImageError(
            name, f"the image data is truncated or corrupt ({exc})", "re-copy or re-export the photo"
        ) from None


def _apply_exif_orientation(image: Image.Image, name: str) -> Image.Image:
    """The image turned upright per its EXIF orientation tag (no copy when it is already upright).

    A broken EXIF block must not make a good photo unreadable: the photo is used as stored, with a
    warning naming the file (a sideways face may then not be detected).
    """
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=CORRUPT_EXIF, category=UserWarning)  # read or not, said below
            orientation = image.getexif().get(0x0112, 1)
            if orientation in (None, 1):
                return image
            return ImageOps.exif_transpose(image)
    except Exception as exc:  # noqa: BLE001 - any EXIF parsing failure
        from selfage_cli import console  # lazily: alignment workers do not load rich otherwise

        console.warn(f"{name}: its EXIF orientation could not be read ({exc}); using the photo as stored.")
        return image


def to_rgb(image: Image.Image | np.ndarray) -> Image.Image:
    """Any Pillow image (or an H×W / H×W×3 / H×W×4 array) as 8-bit RGB; transparency over neutral grey."""
    if isinstance(image, np.ndarray):
        image = _array_to_image(image)
    mode = image.mode
    if mode == "RGB":
        return image
    if mode.startswith("I;16") or mode in ("I", "F"):
        return Image.fromarray(_to_uint8(np.asarray(image))).convert("RGB")
    if mode == "CMYK":
        return _cmyk_to_rgb(image)
    has_alpha = mode in ("RGBA", "RGBa", "LA", "La", "PA") or (
        mode in ("P", "L", "RGB") and "transparency" in image.info
    )
    if has_alpha:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (*GREY_BACKGROUND, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def _array_to_image(array: np.ndarray) -> Image.Image:
    if array.ndim == 2:
        return Image.fromarray(_to_uint8(array))
    if array.ndim == 3 and array.shape[2] in (3, 4):
        data = _to_uint8(array)
        return Image.fromarray(np.ascontiguousarray(data))
    raise UnreadableImageError(
        f"array of shape {array.shape}", "expected H×W (grey), H×W×3 (RGB) or H×W×4 (RGBA) pixels"
    )


def _to_uint8(array: np.ndarray) -> np.ndarray:
    """Scale integer/float pixels to 0–255: uint16 by 1/257, floats in [0, 1] by 255, others clipped."""
    if array.dtype == np.uint8:
        return array
    if array.dtype == np.uint16:
        return ((array.astype(np.uint32) * 255 + 32767) // 65535).astype(np.uint8)
    values = array.astype(np.float64)
    top = float(values.max()) if values.size else 0.0
    if np.issubdtype(array.dtype, np.floating) and top <= 1.0:
        values = values * 255.0
    elif top > 255.0:
        values = values * (255.0 / (65535.0 if top <= 65535.0 else top))
    return np.clip(np.rint(values), 0, 255).astype(np.uint8)


def _cmyk_to_rgb(image: Image.Image) -> Image.Image:
    profile = image.info.get("icc_profile")
    if profile:
        try:
            from PIL import ImageCms

            source = ImageCms.ImageCmsProfile(io.BytesIO(profile))
            converted = ImageCms.profileToProfile(image, source, ImageCms.createProfile("sRGB"), outputMode="RGB")
            if converted is not None:
                return converted
        except Exception as exc:  # noqa: BLE001 - fall back to Pillow's plain formula
            from selfage_cli import console

            console.warn(f"CMYK photo: its colour profile could not be applied ({exc}); using a plain conversion.")
    return image.convert("RGB")


def detection_copy(image: Image.Image, max_side: int) -> tuple[np.ndarray, float]:
    """An RGB array no larger than ``max_side`` on its longer side, and its scale (copy = source × scale)."""
    longest = max(image.size)
    if longest <= max_side:
        return np.asarray(image), 1.0
    scale = max_side / longest
    size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    small = image.resize(size, Image.Resampling.BILINEAR, reducing_gap=2.0)
    return np.asarray(small), small.width / image.width


def is_image_name(path: Path) -> bool:
    """Whether a file found in a folder looks like a photo (by its suffix)."""
    return path.suffix.lower() in IMAGE_SUFFIXES and not path.name.startswith(".")


def images_in_folder(folder: Path, exclude: Iterable[Path] = ()) -> list[Path]:
    """The photos in ``folder`` and its subfolders, sorted: by suffix (:func:`is_image_name`), hidden files and
    folders skipped, none under a folder of ``exclude``. The one folder search of ``align``, ``train --refs``
    and ``edit``."""
    excluded = list(exclude)
    return sorted(
        f
        for f in folder.rglob("*")
        if f.is_file()
        and is_image_name(f)
        and not any(part.startswith(".") for part in f.relative_to(folder).parts)
        and not any(f.is_relative_to(d) for d in excluded)
    )
