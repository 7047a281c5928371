"""Image and age metrics for ``selfage eval``: PSNR, SSIM, and age-error aggregation.

Definitions (also in ``docs/eval.md``):

- **PSNR** on 8-bit RGB: ``10·log10(255² / MSE)`` with the MSE over every pixel and channel.
  Identical images have infinite PSNR (returned as ``math.inf``; the JSON report stores ``null``).
- **SSIM** (Wang et al. 2004) on **luminance** ``Y = 0.299 R + 0.587 G + 0.114 B`` (ITU-R BT.601, 0–255):
  11×11 Gaussian window with σ = 1.5 (normalised to sum 1), ``C1 = (0.01·255)²``, ``C2 = (0.03·255)²``,
  "valid" filtering (statistics only where the whole window fits, as in the authors' ``ssim_index.m``),
  and the mean of the SSIM map. Both images must have the same size.
- **Age error**: absolute error ``|estimated − target|`` per output; mean absolute error (MAE) overall,
  per decade bucket of the *target* age (``0–9``, ``10–19``, …, ``80–89``, ``90–100``; 100 joins the last
  bucket) and per prompt band (the editor's placeholder bands: ``baby`` < 5, ``child`` 5–14,
  ``adult`` 15–64, ``elderly`` ≥ 65).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image

from selfage_cli.ages.engine.bands import age_band as band  # the editor's placeholder bands

SSIM_WINDOW = 11
SSIM_SIGMA = 1.5
SSIM_K1 = 0.01
SSIM_K2 = 0.03
DATA_RANGE = 255.0
LUMA_WEIGHTS = (0.299, 0.587, 0.114)


def as_rgb_array(image: Image.Image | np.ndarray) -> np.ndarray:
    """An image as a float64 H×W×3 array in 0–255 (PIL images are converted to RGB first)."""
    if isinstance(image, Image.Image):
        image = np.asarray(image.convert("RGB"))
    array = np.asarray(image, dtype=np.float64)
    if array.ndim == 2:
        array = np.repeat(array[..., None], 3, axis=2)
    if array.ndim != 3 or array.shape[2] != 3:
        raise ValueError(f"expected an H×W×3 RGB image, got shape {array.shape}")
    return array


def luminance(image: Image.Image | np.ndarray) -> np.ndarray:
    """BT.601 luma (0–255, float64) of an RGB image; a 2-D array is taken as luminance already."""
    if isinstance(image, np.ndarray) and image.ndim == 2:
        return image.astype(np.float64)
    rgb = as_rgb_array(image)
    return rgb @ np.asarray(LUMA_WEIGHTS)


def _check_same_size(a: np.ndarray, b: np.ndarray) -> None:
    if a.shape != b.shape:
        raise ValueError(f"images differ in size: {a.shape} vs {b.shape}")


def psnr(a: Image.Image | np.ndarray, b: Image.Image | np.ndarray) -> float:
    """Peak signal-to-noise ratio in dB of two 8-bit RGB images (``math.inf`` when identical)."""
    x, y = as_rgb_array(a), as_rgb_array(b)
    _check_same_size(x, y)
    mse = float(np.mean((x - y) ** 2))
    if mse == 0.0:
        return math.inf
    return 10.0 * math.log10(DATA_RANGE**2 / mse)


def gaussian_window(size: int = SSIM_WINDOW, sigma: float = SSIM_SIGMA) -> np.ndarray:
    """The normalised 1-D Gaussian (the 2-D window is its outer product)."""
    coords = np.arange(size, dtype=np.float64) - (size - 1) / 2.0
    kernel = np.exp(-(coords**2) / (2.0 * sigma**2))
    return kernel / kernel.sum()


def _filter_valid(image: np.ndarray, kernel: np.ndarray) -> np.ndarray:
    """Separable 'valid' correlation of a 2-D array with the outer product of a 1-D kernel."""
    size = kernel.shape[0]
    rows = np.lib.stride_tricks.sliding_window_view(image, size, axis=0) @ kernel  # (H-s+1, W)
    return np.lib.stride_tricks.sliding_window_view(rows, size, axis=1) @ kernel  # (H-s+1, W-s+1)


def ssim_map(a: Image.Image | np.ndarray, b: Image.Image | np.ndarray) -> np.ndarray:
    """The SSIM map on luminance (see the module docstring for the exact recipe)."""
    x, y = luminance(a), luminance(b)
    _check_same_size(x, y)
    if min(x.shape) < SSIM_WINDOW:
        raise ValueError(f"SSIM needs images of at least {SSIM_WINDOW}×{SSIM_WINDOW} pixels, got {x.shape}")
    kernel = gaussian_window()
    c1 = (SSIM_K1 * DATA_RANGE) ** 2
    c2 = (SSIM_K2 * DATA_RANGE) ** 2
    mu_x, mu_y = _filter_valid(x, kernel), _filter_valid(y, kernel)
    var_x = _filter_valid(x * x, kernel) - mu_x**2
    var_y = _filter_valid(y * y, kernel) - mu_y**2
    cov = _filter_valid(x * y, kernel) - mu_x * mu_y
    numerator = (2 * mu_x * mu_y + c1) * (2 * cov + c2)
    denominator = (mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2)
    return numerator / denominator


def ssim(a: Image.Image | np.ndarray, b: Image.Image | np.ndarray) -> float:
    """Mean SSIM on luminance, in [-1, 1]; 1 for identical images."""
    return float(np.mean(ssim_map(a, b)))


# ---- ages -----------------------------------------------------------------------------------------
def decade_bucket(age: float) -> str:
    """The decade bucket of a target age: ``"0-9"``, ``"10-19"``, … ``"80-89"``, ``"90-100"``."""
    decade = min(int(age) // 10, 9)
    low = decade * 10
    return f"{low}-{100 if decade == 9 else low + 9}"


@dataclass(frozen=True)
class AgeError:
    """One output's target age and DEX estimate."""

    target: float
    estimated: float

    @property
    def absolute(self) -> float:
        return abs(self.estimated - self.target)


def _mae(errors: Sequence[AgeError]) -> dict[str, float | int]:
    values = [e.absolute for e in errors]
    return {"mae": float(np.mean(values)), "count": len(values)}


def aggregate_age_errors(errors: Iterable[AgeError]) -> dict[str, object] | None:
    """MAE overall, per target age, per decade bucket and per prompt band (``None`` when empty)."""
    errors = list(errors)
    if not errors:
        return None

    def grouped(key) -> dict[str, dict[str, float | int]]:
        groups: dict[str, list[AgeError]] = {}
        for error in sorted(errors, key=lambda e: e.target):
            groups.setdefault(key(error.target), []).append(error)
        return {name: _mae(group) for name, group in groups.items()}

    return {
        **_mae(errors),
        "by_target_age": grouped(lambda t: str(int(t)) if float(t).is_integer() else str(t)),
        "by_decade": grouped(decade_bucket),
        "by_band": grouped(band),
    }


def distance_summary(distances: Iterable[float | None], threshold: float) -> dict[str, float | int | None]:
    """Count, mean, median, max and share below ``threshold`` of identity distances.

    ``None`` entries (no face found in the output) are counted in ``no_face`` and left out of the rest.
    """
    given = list(distances)
    values = [float(d) for d in given if d is not None]
    summary: dict[str, float | int | None] = {"count": len(values), "no_face": len(given) - len(values)}
    if not values:
        return {**summary, "mean": None, "median": None, "max": None, "share_under_threshold": None}
    return {
        **summary,
        "mean": float(np.mean(values)),
        "median": float(np.median(values)),
        "max": float(np.max(values)),
        "share_under_threshold": float(np.mean([v < threshold for v in values])),
    }
