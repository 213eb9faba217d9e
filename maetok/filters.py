"""Fixed filter banks as numpy, built by one function so both backends use the same numbers.

- Sobel kernels and the per-patch Gaussian window for HOG (docs/design.md §4).
- A Gabor bank (quadrature pairs at several scales and orientations) for the multi-scale
  conv target.
- Gaussian-derivative kernels for the frozen perceptual feature pyramid (docs/design.md §5).

Kernels are ``(kh, kw, 1, F)`` and are applied to each colour channel separately, as one
convolution on 4×4 pixel blocks (``block_kernel``): 16 input channels and 16·F output
channels, where a one-channel convolution gets no tensor cores.
"""

from __future__ import annotations

import functools

import numpy as np

from maetok.targets import GABOR_ORIENTATIONS, GABOR_SCALES

PERCEP_LEVELS = 3  # pyramid levels: full, 1/2, 1/4 resolution
PERCEP_SIGMA = 1.0
CONV_BLOCK = 4  # pixels per side of the blocks a fixed convolution runs on (block_kernel)


def _grid(radius: int) -> tuple[np.ndarray, np.ndarray]:
    r = np.arange(-radius, radius + 1, dtype=np.float64)
    return np.meshgrid(r, r, indexing="ij")  # (y, x)


def gaussian_window(size: int, sigma: float) -> np.ndarray:
    """A ``size × size`` Gaussian centred on the window, summing to 1."""
    r = np.arange(size, dtype=np.float64) - (size - 1) / 2.0
    g = np.exp(-(r**2) / (2 * sigma**2))
    w = np.outer(g, g)
    return (w / w.sum()).astype(np.float32)


def gabor_bank() -> np.ndarray:
    """Quadrature Gabor pairs ``(k, k, 1, 2·S·O)``: for each scale then orientation, [even, odd].

    Wavelength is 4σ; the even filter has its mean removed so flat regions give zero.
    """
    radius = int(np.ceil(3 * max(GABOR_SCALES)))
    y, x = _grid(radius)
    kernels = []
    for sigma in GABOR_SCALES:
        envelope = np.exp(-(x**2 + y**2) / (2 * sigma**2))
        for o in range(GABOR_ORIENTATIONS):
            theta = np.pi * o / GABOR_ORIENTATIONS
            u = x * np.cos(theta) + y * np.sin(theta)
            phase = 2 * np.pi * u / (4 * sigma)
            even = envelope * np.cos(phase)
            even -= envelope * (even.sum() / envelope.sum())
            odd = envelope * np.sin(phase)
            norm = np.sqrt((even**2).sum() + (odd**2).sum())
            kernels += [even / norm, odd / norm]
    return np.stack(kernels, -1)[:, :, None, :].astype(np.float32)


def percep_bank() -> np.ndarray:
    """Gaussian-derivative kernels ``(5, 5, 1, 5)``: ∂x, ∂y, ∂xx, ∂yy, ∂xy at σ = 1."""
    y, x = _grid(2)
    s2 = PERCEP_SIGMA**2
    g = np.exp(-(x**2 + y**2) / (2 * s2))
    g /= g.sum()
    kernels = [
        -x / s2 * g,
        -y / s2 * g,
        (x**2 / s2 - 1) / s2 * g,
        (y**2 / s2 - 1) / s2 * g,
        x * y / s2**2 * g,
    ]
    kernels = [k - k.mean() for k in kernels]  # no response to a constant image
    kernels = [k / np.abs(k).sum() for k in kernels]
    return np.stack(kernels, -1)[:, :, None, :].astype(np.float32)


@functools.cache
def filter_banks(patch_size: int) -> dict[str, np.ndarray]:
    """Every fixed kernel the targets and the perceptual loss use, for one patch size."""
    gx = np.array([[1, 0, -1], [2, 0, -2], [1, 0, -1]], np.float32)
    return {
        "sobel": np.stack([gx, gx.T], -1)[:, :, None, :],  # (3, 3, 1, 2): [gx, gy = gxᵀ]
        # docs/design.md §4: a 16×16 window with σ = 8 for p = 16; in general p × p with σ = p/2.
        "hog_window": gaussian_window(patch_size, patch_size / 2.0),
        "gabor": gabor_bank(),
        "percep": percep_bank(),
    }


@functools.cache
def hog_window_cells(patch_size: int, cell: int, h: int, w: int) -> np.ndarray:
    """The HOG window, one per patch over an h × w image, laid out by cell:
    ``(h/cell, w/cell, cell²)``, cell (i, j)'s pixel (u, v) at index u·cell + v (the layout
    of ``block_conv`` on cell-sized blocks)."""
    win = np.tile(filter_banks(patch_size)["hog_window"], (h // patch_size, w // patch_size))
    win = win.reshape(h // cell, cell, w // cell, cell).transpose(0, 2, 1, 3)
    return np.ascontiguousarray(win.reshape(h // cell, w // cell, cell * cell))


def block_taps(k: int, block: int = CONV_BLOCK) -> int:
    """Taps per axis of a ``k × k`` kernel on the grid of ``block × block`` pixel blocks:
    the blocks one output block's receptive field touches, ``⌈(block + k − 1) / block⌉``."""
    return (block + k - 2) // block + 1


def block_kernel(kernel: np.ndarray, block: int = CONV_BLOCK) -> np.ndarray:
    """A fixed ``kernel (k, k, 1, F)`` as a convolution on pixel blocks, HWIO
    ``(n, n, block², block²·F)`` with ``n = block_taps(k, block)``.

    Cut the planes into ``block × block`` blocks and make each block's pixels its channels
    ``(p, q)``, row-major: the correlation with ``kernel`` is then the 'VALID' correlation of
    the block grid with this kernel, whose output channels ``(u, v, f)`` are the pixels of an
    output block: ``W[a, b, (p, q), (u, v, f)] = kernel[block·a + p − u, block·b + q − v, 0, f]``
    where both indices fall in ``[0, k)``, else 0. It costs ``(n·block / k)²`` × the direct
    FLOPs (1.5× for the 13×13 Gabor bank at block 4) on tensor cores, reading each input
    pixel once, where cuDNN's one-channel convolutions use no tensor cores.
    """
    return _block_kernel(kernel.tobytes(), kernel.shape, kernel.dtype.str, block)


@functools.lru_cache(maxsize=64)
def _block_kernel(raw: bytes, shape: tuple, dtype: str, block: int) -> np.ndarray:
    kernel = np.frombuffer(raw, dtype).reshape(shape)[:, :, 0, :]  # (k, k, F)
    k, nf = shape[0], shape[-1]
    n = block_taps(k, block)
    r = np.arange(block)
    idx = block * np.arange(n)[:, None, None] + r[None, :, None] - r[None, None, :]  # (a, p, u)
    inside = (idx >= 0) & (idx < k)
    idx = np.clip(idx, 0, k - 1)
    rows, cols = idx[:, None, :, None, :, None], idx[None, :, None, :, None, :]
    w = kernel[rows, cols]  # (a, b, p, q, u, v, F)
    w = w * (inside[:, None, :, None, :, None] & inside[None, :, None, :, None, :])[..., None]
    return np.ascontiguousarray(w.reshape(n, n, block * block, block * block * nf))
