"""PSNR and SSIM against closed forms and a slow, explicit reference."""

import numpy as np
import pytest

from maetok.metrics import gaussian_window, psnr, ssim


def _images(rng, shape=(3, 24, 20, 3)):
    return rng.uniform(-0.8, 0.8, shape).astype(np.float32)


def test_psnr_of_a_constant_offset(rng):
    a = _images(rng)
    offsets = np.array([0.1, 0.02, 0.3])
    b = a + offsets[:, None, None, None]
    # MSE = offset², so PSNR = 10·log10(range² / offset²) = 20·log10(2 / offset)
    np.testing.assert_allclose(psnr(a, b), 20 * np.log10(2.0 / offsets), rtol=1e-5)
    np.testing.assert_allclose(psnr(a, b, data_range=1.0), 20 * np.log10(1.0 / offsets), rtol=1e-5)
    same = psnr(a, a)
    assert same.shape == (3,) and np.all(np.isinf(same))


def test_ssim_is_one_for_identical_images_and_falls_with_noise(rng):
    a = _images(rng, (1, 32, 32, 3))
    np.testing.assert_allclose(ssim(a, a), [1.0], atol=1e-12)
    scores = [ssim(a, a + sigma * rng.standard_normal(a.shape))[0] for sigma in (0.02, 0.1, 0.4)]
    assert 1.0 > scores[0] > scores[1] > scores[2]


def _ssim_reference(x, y, data_range=2.0):
    """SSIM of one (H, W, C) pair by explicit loops over window positions and channels."""
    g = gaussian_window()
    w = np.outer(g, g)
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    h_out, w_out = x.shape[0] - 10, x.shape[1] - 10
    total = 0.0
    for c in range(x.shape[2]):
        for i in range(h_out):
            for j in range(w_out):
                px, py = x[i : i + 11, j : j + 11, c], y[i : i + 11, j : j + 11, c]
                mx, my = (w * px).sum(), (w * py).sum()
                vx, vy = (w * (px - mx) ** 2).sum(), (w * (py - my) ** 2).sum()
                cov = (w * (px - mx) * (py - my)).sum()
                total += (
                    (2 * mx * my + c1) * (2 * cov + c2) / ((mx**2 + my**2 + c1) * (vx + vy + c2))
                )
    return total / (x.shape[2] * h_out * w_out)


def test_ssim_matches_the_explicit_reference(rng):
    a = rng.uniform(-1, 1, (2, 16, 16, 3))
    b = np.clip(a + 0.3 * rng.standard_normal(a.shape), -1, 1)
    got = ssim(a, b)
    want = [_ssim_reference(a[i], b[i]) for i in range(2)]
    np.testing.assert_allclose(got, want, rtol=1e-9)
    np.testing.assert_allclose(ssim(b, a), got, rtol=1e-12)  # symmetric
    assert 0.0 < got.min() < 0.9


def test_gaussian_window():
    g = gaussian_window()
    assert g.shape == (11,) and abs(g.sum() - 1) < 1e-12 and g.argmax() == 5
    np.testing.assert_allclose(g, g[::-1])
    np.testing.assert_allclose(g[6] / g[5], np.exp(-0.5 / 1.5**2))


def test_shape_errors(rng):
    a = _images(rng)
    with pytest.raises(ValueError, match="one shape"):
        psnr(a, a[:2])
    with pytest.raises(ValueError, match="at least 11"):
        ssim(a[:, :8], a[:, :8])
