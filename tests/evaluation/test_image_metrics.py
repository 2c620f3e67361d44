"""PSNR and SSIM against known values."""

from __future__ import annotations

import math

import numpy as np
import pytest

from lumos.evaluation.image_metrics import gaussian_window, psnr, ssim, ssim_map


def test_identical_images() -> None:
    img = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    assert psnr(img, img) == math.inf
    assert ssim(img, img) == pytest.approx(1.0)


def test_psnr_known_value() -> None:
    a = np.zeros((16, 16, 3), dtype=np.uint8)
    b = np.full((16, 16, 3), 10, dtype=np.uint8)
    assert psnr(a, b) == pytest.approx(10 * math.log10(255**2 / 100))  # 28.13 dB
    assert psnr(a.astype(np.float32), b.astype(np.float32) / 255, data_range=1.0) < psnr(a, b)


def test_ssim_of_constant_images_is_the_luminance_term() -> None:
    # Constant images have no variance: SSIM reduces to (2ab + C1) / (a^2 + b^2 + C1).
    a, b = 100.0, 150.0
    c1 = (0.01 * 255) ** 2
    expected = (2 * a * b + c1) / (a * a + b * b + c1)
    x = np.full((20, 20), a)
    y = np.full((20, 20), b)
    assert ssim(x, y) == pytest.approx(expected)
    assert ssim_map(x, y).shape == (10, 10, 1)


def test_ssim_matches_a_direct_window_computation() -> None:
    rng = np.random.default_rng(1)
    x = rng.uniform(0, 255, (13, 12))
    y = np.clip(x + rng.normal(0, 20, x.shape), 0, 255)
    g = gaussian_window()
    w = np.outer(g, g)
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    values = []
    for i in range(13 - 10):
        for j in range(12 - 10):
            px, py = x[i : i + 11, j : j + 11], y[i : i + 11, j : j + 11]
            mx, my = (w * px).sum(), (w * py).sum()
            vx, vy = (w * (px - mx) ** 2).sum(), (w * (py - my) ** 2).sum()
            cov = (w * (px - mx) * (py - my)).sum()
            values.append(
                ((2 * mx * my + c1) * (2 * cov + c2)) / ((mx**2 + my**2 + c1) * (vx + vy + c2))
            )
    assert ssim(x, y) == pytest.approx(np.mean(values), rel=1e-9)


def test_more_noise_scores_lower_and_is_symmetric() -> None:
    rng = np.random.default_rng(2)
    img = rng.integers(0, 256, (32, 32, 3)).astype(np.float64)
    noisy = [np.clip(img + rng.normal(0, s, img.shape), 0, 255) for s in (5, 20, 60)]
    p = [psnr(img, n) for n in noisy]
    s = [ssim(img, n) for n in noisy]
    assert p[0] > p[1] > p[2] and s[0] > s[1] > s[2]
    assert ssim(img, noisy[1]) == pytest.approx(ssim(noisy[1], img))


def test_errors() -> None:
    with pytest.raises(ValueError, match="shape"):
        psnr(np.zeros((4, 4)), np.zeros((4, 5)))
    with pytest.raises(ValueError, match="at least 11x11"):
        ssim(np.zeros((8, 8)), np.zeros((8, 8)))
