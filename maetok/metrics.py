"""Reconstruction quality per image: PSNR and SSIM, in numpy (no scipy).

Both take ``(B, H, W, C)`` arrays on the model's [-1, 1] scale, so ``data_range`` is 2 by
default; PSNR and SSIM computed this way equal those computed on the same images mapped to
[0, 255] with ``data_range=255``. Arithmetic is float64 so that the metric does not depend on
the precision the model ran in.
"""

from __future__ import annotations

import numpy as np

SSIM_WINDOW, SSIM_SIGMA, SSIM_K1, SSIM_K2 = 11, 1.5, 0.01, 0.03  # Wang et al. (2004)


def _pair(a, b) -> tuple[np.ndarray, np.ndarray]:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if a.shape != b.shape or a.ndim != 4:
        raise ValueError(
            f"expected two (B, H, W, C) arrays of one shape, got {a.shape} and {b.shape}"
        )
    return a, b


def psnr(a, b, data_range: float = 2.0) -> np.ndarray:
    """(B,) peak signal-to-noise ratio in dB of each image pair; ``inf`` where identical."""
    a, b = _pair(a, b)
    mse = np.mean((a - b) ** 2, axis=(1, 2, 3))  # (B,)
    with np.errstate(divide="ignore"):
        return 10.0 * np.log10(data_range**2 / mse)


def gaussian_window(size: int = SSIM_WINDOW, sigma: float = SSIM_SIGMA) -> np.ndarray:
    """(size,) normalised 1D Gaussian; the SSIM window is its outer product with itself."""
    x = np.arange(size, dtype=np.float64) - (size - 1) / 2
    g = np.exp(-0.5 * (x / sigma) ** 2)
    return g / g.sum()


def _filter_valid(x: np.ndarray, g: np.ndarray) -> np.ndarray:
    """Separable 'valid' filtering of (B, H, W, C) over H and W → (B, H-k+1, W-k+1, C)."""
    k = len(g)
    h, w = x.shape[1] - k + 1, x.shape[2] - k + 1
    rows = sum(g[j] * x[:, j : j + h] for j in range(k))  # (B, H', W, C)
    return sum(g[j] * rows[:, :, j : j + w] for j in range(k))  # (B, H', W', C)


def ssim(a, b, data_range: float = 2.0) -> np.ndarray:
    """(B,) structural similarity of each image pair (Wang et al., 2004).

    Gaussian 11×11 window with σ = 1.5, K1 = 0.01, K2 = 0.03, evaluated per channel at every
    window position that fits inside the image ('valid') and averaged over positions and
    channels. Images must be at least 11 pixels on each side.
    """
    a, b = _pair(a, b)
    if min(a.shape[1:3]) < SSIM_WINDOW:
        raise ValueError(
            f"SSIM needs images of at least {SSIM_WINDOW}×{SSIM_WINDOW}, "
            f"got {a.shape[2]}×{a.shape[1]}"
        )
    # one image at a time, so its filtered maps stay in the CPU cache: the same numbers, 7×
    # faster for 100 images at 256² (17.1 → 2.4 s)
    return np.concatenate([_ssim(a[i : i + 1], b[i : i + 1], data_range) for i in range(len(a))])


def _ssim(a: np.ndarray, b: np.ndarray, data_range: float) -> np.ndarray:
    g = gaussian_window()
    c1, c2 = (SSIM_K1 * data_range) ** 2, (SSIM_K2 * data_range) ** 2
    mu_a, mu_b = _filter_valid(a, g), _filter_valid(b, g)
    # Local (co)variances as E[xy] − E[x]E[y] under the window, as in the reference code.
    var_a = _filter_valid(a * a, g) - mu_a**2
    var_b = _filter_valid(b * b, g) - mu_b**2
    cov = _filter_valid(a * b, g) - mu_a * mu_b
    num = (2 * mu_a * mu_b + c1) * (2 * cov + c2)
    den = (mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2)
    return np.mean(num / den, axis=(1, 2, 3))  # every channel has as many positions
