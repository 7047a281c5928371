"""Eval metrics: PSNR, SSIM (luminance, Gaussian 11/1.5, valid window) and age-error aggregation."""

from __future__ import annotations

import math

import numpy as np
import pytest
from PIL import Image

from selfage_cli.eval.engine import metrics


def _naive_ssim(x: np.ndarray, y: np.ndarray) -> float:
    """SSIM by explicit loops over every valid 11×11 window (the definition, independent of the fast code)."""
    size, sigma = 11, 1.5
    coords = np.arange(size) - 5
    g = np.exp(-(coords[:, None] ** 2 + coords[None, :] ** 2) / (2 * sigma**2))
    w = g / g.sum()
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    values = []
    for i in range(x.shape[0] - size + 1):
        for j in range(x.shape[1] - size + 1):
            a, b = x[i : i + size, j : j + size], y[i : i + size, j : j + size]
            ma, mb = (w * a).sum(), (w * b).sum()
            va, vb = (w * (a - ma) ** 2).sum(), (w * (b - mb) ** 2).sum()
            cov = (w * (a - ma) * (b - mb)).sum()
            values.append(((2 * ma * mb + c1) * (2 * cov + c2)) / ((ma**2 + mb**2 + c1) * (va + vb + c2)))
    return float(np.mean(values))


def test_psnr_matches_hand_computation() -> None:
    a = np.zeros((4, 4, 3), dtype=np.uint8)
    b = a.copy()
    b[0, 0, 0] = 48  # MSE = 48² / 48 = 48
    assert metrics.psnr(a, b) == pytest.approx(10 * math.log10(255**2 / 48.0))
    assert metrics.psnr(a, a) == math.inf


def test_ssim_identical_is_one_and_constant_images_follow_the_formula() -> None:
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (32, 40, 3), dtype=np.uint8)
    assert metrics.ssim(image, image) == pytest.approx(1.0)
    # Constant images a, b: variances and covariance vanish, SSIM = (2ab + C1) / (a² + b² + C1).
    a, b = np.full((16, 16), 100.0), np.full((16, 16), 140.0)
    c1 = (0.01 * 255) ** 2
    assert metrics.ssim(a, b) == pytest.approx((2 * 100 * 140 + c1) / (100**2 + 140**2 + c1))


def test_ssim_matches_the_definition_on_luminance() -> None:
    rng = np.random.default_rng(1)
    x = rng.integers(0, 256, (20, 23, 3), dtype=np.uint8)
    y = np.clip(x.astype(int) + rng.integers(-40, 40, x.shape), 0, 255).astype(np.uint8)
    lx = x.astype(float) @ np.array([0.299, 0.587, 0.114])
    ly = y.astype(float) @ np.array([0.299, 0.587, 0.114])
    assert metrics.ssim(Image.fromarray(x), Image.fromarray(y)) == pytest.approx(_naive_ssim(lx, ly), rel=1e-9)
    assert metrics.ssim_map(x, y).shape == (10, 13)  # valid window only


def test_size_mismatch_and_tiny_images_are_refused() -> None:
    with pytest.raises(ValueError, match="differ in size"):
        metrics.psnr(np.zeros((4, 4, 3)), np.zeros((4, 5, 3)))
    with pytest.raises(ValueError, match="at least 11"):
        metrics.ssim(np.zeros((8, 8, 3)), np.zeros((8, 8, 3)))


def test_buckets_and_bands() -> None:
    assert [metrics.decade_bucket(a) for a in (0, 9, 10, 59, 89, 90, 100)] == [
        "0-9",
        "0-9",
        "10-19",
        "50-59",
        "80-89",
        "90-100",
        "90-100",
    ]
    assert [metrics.band(a) for a in (0, 4, 5, 14, 15, 64, 65, 100)] == [
        "baby",
        "baby",
        "child",
        "child",
        "adult",
        "adult",
        "elderly",
        "elderly",
    ]


def test_age_error_aggregation_by_hand() -> None:
    errors = [
        metrics.AgeError(0, 6.0),
        metrics.AgeError(20, 30.0),
        metrics.AgeError(25, 22.0),
        metrics.AgeError(80, 60.0),
        metrics.AgeError(20, 18.0),
    ]
    result = metrics.aggregate_age_errors(errors)
    assert result["mae"] == pytest.approx((6 + 10 + 3 + 20 + 2) / 5)
    assert result["count"] == 5
    assert result["by_decade"]["20-29"] == {"mae": pytest.approx((10 + 3 + 2) / 3), "count": 3}
    assert result["by_decade"]["0-9"]["mae"] == pytest.approx(6)
    assert result["by_band"]["adult"]["mae"] == pytest.approx(5)
    assert result["by_band"]["elderly"]["mae"] == pytest.approx(20)
    assert result["by_target_age"]["20"] == {"mae": pytest.approx(6), "count": 2}
    assert metrics.aggregate_age_errors([]) is None


def test_distance_summary_counts_missing_faces() -> None:
    summary = metrics.distance_summary([0.0, 0.5, None, 0.9], threshold=0.6)
    assert summary["count"] == 3 and summary["no_face"] == 1
    assert summary["mean"] == pytest.approx(1.4 / 3)
    assert summary["share_under_threshold"] == pytest.approx(2 / 3)
    empty = metrics.distance_summary([None], threshold=0.6)
    assert empty["count"] == 0 and empty["mean"] is None
