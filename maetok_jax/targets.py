"""Auxiliary targets (docs/design.md §4): fixed features of the image, one vector per image token.

Every target maps ``images (B, H, W, C) → (B, N, D_j)`` with ``D_j =
maetok.targets.target_dim(name, m)``. They are computed from the clean image, never
differentiated, and mirrored function for function in ``maetok_torch/targets.py``.

Filters come from ``maetok.filters.filter_banks`` (numpy, lru-cached) and are applied to
each colour channel separately by folding C into the batch: ``(B, H, W, C) → (B·C, H, W)``.
All convolutions are cross-correlations (the convention of both ``lax.conv`` and
``F.conv2d``), after reflect padding, computed as one convolution on pixel blocks
(``block_conv``; the HOG gradients on cell-sized blocks, the others on 4-pixel blocks
through ``fixed_conv``): in float32 at HIGHEST precision — or, with bf16 compute and
``model.fast_filters``, in bf16 at default precision (``filter_dtype``): targets are
regression goals that bf16's 3 significant digits serve as well.
Everything after the convolutions stays float32.

Pinned numerics (padding, HOG voting, normalisation, epsilons): ``maetok.numerics``.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

import maetok.targets as core
from maetok.config import ModelConfig
from maetok.filters import (
    CONV_BLOCK,
    block_kernel,
    block_taps,
    filter_banks,
    hog_window_cells,
)
from maetok.numerics import GABOR_EPS, HOG_EPS, PIXEL_EPS
from maetok_jax.patches import patchify


def filter_dtype(m: ModelConfig):
    """The dtype of the fixed convolutions (targets, perceptual pyramid): bf16 when the
    model computes in bf16 and ``m.fast_filters`` is on, else float32."""
    fast = m.fast_filters and m.compute_dtype == "bfloat16"
    return jnp.bfloat16 if fast else jnp.float32


def block_conv(x: jnp.ndarray, kernel: np.ndarray, dtype=jnp.float32, block: int = CONV_BLOCK):
    """Stride-1 'VALID' correlation of planes x (B, H, W) with a fixed ``kernel (k, k, 1, F)``,
    as one convolution on ``block × block`` pixel blocks (``maetok.filters.block_kernel``):
    float32 at HIGHEST precision, or in ``dtype`` bf16 at default precision.

    → (B, ⌈h/block⌉, ⌈w/block⌉, block², F) in ``dtype``, h × w the valid output: output
    block (i, j) holds pixel (i·block + u, j·block + v) at index u·block + v. The planes are
    zero-padded at the bottom and right to whole blocks; no output inside h × w reads a
    padded pixel.
    """
    n, hp, wp = x.shape
    k, nf, s = kernel.shape[0], kernel.shape[-1], block
    h, w = hp - k + 1, wp - k + 1
    hb, wb, taps = -(-h // s), -(-w // s), block_taps(k, s)
    rows, cols = hb + taps - 1, wb + taps - 1  # input blocks
    x = jnp.pad(x.astype(dtype), ((0, 0), (0, s * rows - hp), (0, s * cols - wp)))
    x = x.reshape(n, rows, s, cols, s).transpose(0, 1, 3, 2, 4).reshape(n, rows, cols, s * s)
    y = jax.lax.conv_general_dilated(
        x,
        jnp.asarray(block_kernel(kernel, s), dtype),
        window_strides=(1, 1),
        padding="VALID",
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
        precision=jax.lax.Precision.DEFAULT if dtype != jnp.float32 else jax.lax.Precision.HIGHEST,
    )  # (B, hb, wb, (u, v, F))
    return y.reshape(n, hb, wb, s * s, nf)


def fixed_conv(x: jnp.ndarray, kernel: np.ndarray, dtype=jnp.float32) -> jnp.ndarray:
    """Stride-1 'VALID' correlation of planes x (B, H, W) with a fixed ``kernel (k, k, 1, F)``
    (``block_conv`` on ``CONV_BLOCK``-pixel blocks) → (B, H−k+1, W−k+1, F), float32."""
    n, hp, wp = x.shape
    k, nf, s = kernel.shape[0], kernel.shape[-1], CONV_BLOCK
    y = block_conv(x, kernel, dtype)
    hb, wb = y.shape[1:3]
    y = y.reshape(n, hb, wb, s, s, nf).transpose(0, 1, 3, 2, 4, 5).reshape(n, hb * s, wb * s, nf)
    return y[:, : hp - k + 1, : wp - k + 1].astype(jnp.float32)


def reflect_pad(x: jnp.ndarray, kernel: np.ndarray) -> jnp.ndarray:
    """Planes (N, H, W) reflect-padded by half of ``kernel``'s side, for a same-size output."""
    r = kernel.shape[0] // 2
    return jnp.pad(x, ((0, 0), (r, r), (r, r)), mode="reflect")


def planes(images: jnp.ndarray) -> jnp.ndarray:
    """Each colour channel as a plane: (B, H, W, C) → (B·C, H, W), plane b·C + c."""
    b, h, w, c = images.shape
    return images.transpose(0, 3, 1, 2).reshape(b * c, h, w)


def plane_conv(x: jnp.ndarray, kernel: np.ndarray, dtype=jnp.float32) -> jnp.ndarray:
    """Reflect-padded, stride-1 correlation of planes x (N, H, W) with ``kernel (k, k, 1, F)``
    → (N, H, W, F), float32."""
    return fixed_conv(reflect_pad(x, kernel), kernel, dtype)


def per_channel_conv(images: jnp.ndarray, kernel: np.ndarray, dtype=jnp.float32) -> jnp.ndarray:
    """Reflect-padded, stride-1 correlation of each channel with ``kernel (k, k, 1, F)``.

    (B, H, W, C) → (B, C, H, W, F), float32.
    """
    b, h, w, c = images.shape
    return plane_conv(planes(images), kernel, dtype).reshape(b, c, h, w, kernel.shape[-1])


def hog(images: jnp.ndarray, m: ModelConfig) -> jnp.ndarray:
    """HOG target: (B, H, W, C) → (B, N, C·9·(p/cell)²).

    Feature order within a token: cell row, cell column (row-major over the patch's
    cells), then colour channel, then orientation bin — i.e. index
    ``((i·(p/cell) + j)·C + c)·9 + k``. Bin k is centred on the unsigned orientation
    ``(k + ½)·π/9`` of ``atan2(gx, gy)``: a vertical edge (gx ≠ 0, gy = 0) lands in bin 4.
    """
    b, h, w, c = images.shape
    p, cell, nb = m.patch_size, core.hog_cell(m.patch_size), core.HOG_BINS
    sobel = filter_banks(p)["sobel"]
    # The gradients on cell-sized pixel blocks: each output block is one cell, (B·C, hc, wc,
    # cell²), and its histogram a sum over the minor axis.
    g = block_conv(reflect_pad(planes(images), sobel), sobel, filter_dtype(m), cell)
    gx, gy = g[..., 0].astype(jnp.float32), g[..., 1].astype(jnp.float32)
    mag = jnp.sqrt(gx * gx + gy * gy)
    # Continuous position on the bin axis; bin k's centre sits at t = k.
    t = jnp.arctan2(gx, gy) * (nb / np.pi) - 0.5
    bins = jnp.arange(nb, dtype=t.dtype)[:, None, None, None]  # the bins as planes
    d = jnp.mod(t[:, None] - bins, float(nb))  # (B·C, 9, hc, wc, cell²)
    vote = jax.nn.relu(1.0 - jnp.minimum(d, nb - d))  # two neighbours, weights sum to 1
    window = jnp.asarray(hog_window_cells(p, cell, h, w))  # (hc, wc, cell²)
    v = jnp.sum(vote * (mag * window)[:, None], axis=-1)  # (B·C, 9, hc, wc)
    v = v / jnp.sqrt(jnp.sum(v * v, axis=1, keepdims=True) + HOG_EPS)
    # Group the cells of each patch: (B, gh, gw, cells_h, cells_w, C, 9).
    u, gh, gw = p // cell, h // p, w // p
    v = v.reshape(b, c, nb, gh, u, gw, u).transpose(0, 3, 5, 4, 6, 1, 2)
    return v.reshape(b, gh * gw, u * u * c * nb)


def conv_features(images: jnp.ndarray, m: ModelConfig) -> jnp.ndarray:
    """Multi-scale Gabor energy target: (B, H, W, C) → (B, N, C·S·O).

    Feature order within a token: channel, then scale, then orientation — index
    ``(c·S + s)·O + o`` (the order of ``maetok.filters.gabor_bank``'s pairs). Each value is
    the quadrature-pair energy averaged over the p×p patch.
    """
    b, h, w, c = images.shape
    p = m.patch_size
    bank = filter_banks(p)["gabor"]  # (k, k, 1, 2·S·O), pairs [even, odd]
    y = per_channel_conv(images, bank, filter_dtype(m))  # (B, C, H, W, 2·S·O)
    so = bank.shape[-1] // 2
    y = y.reshape(b, c, h, w, so, 2)
    e = jnp.sqrt(y[..., 0] ** 2 + y[..., 1] ** 2 + GABOR_EPS)  # (B, C, H, W, S·O)
    gh, gw = h // p, w // p
    e = e.reshape(b, c, gh, p, gw, p, so).mean(axis=(3, 5))  # (B, C, gh, gw, S·O)
    return e.transpose(0, 2, 3, 1, 4).reshape(b, gh * gw, c * so)


def normalized_pixels(images: jnp.ndarray, m: ModelConfig) -> jnp.ndarray:
    """MAE pixel target: each patch standardised by its own mean and variance. → (B, N, p·p·C)."""
    x = patchify(images, m.patch_size)  # (B, N, p·p·C)
    mean = jnp.mean(x, axis=-1, keepdims=True)
    var = jnp.mean((x - mean) ** 2, axis=-1, keepdims=True)
    return (x - mean) / jnp.sqrt(var + PIXEL_EPS)


# -------------------------------------------------------------------------------- registry

TARGETS: dict[str, Callable] = {"hog": hog, "conv": conv_features, "pixel": normalized_pixels}


def register_target(name: str, fn: Callable, dim) -> None:
    """Add a user target ``fn(images (B,H,W,C), m) → (B, N, dim)``; ``dim`` an int or fn(m)."""
    core.add_target(TARGETS, name, fn, dim)


def compute_targets(images: jnp.ndarray, m: ModelConfig) -> dict[str, jnp.ndarray]:
    """Every target named in ``m.aux_targets``: ``{name: (B, N, D_j)}``, gradient-free."""
    with jax.named_scope("targets"):
        return _compute_targets(images, m)


def _compute_targets(images, m):
    core.check_implemented(TARGETS, m, "JAX", __name__)
    b, h, w, _ = images.shape
    n = (h // m.patch_size) * (w // m.patch_size)
    images = jax.lax.stop_gradient(images)
    out = {}
    for name in m.aux_targets:
        y = jax.lax.stop_gradient(TARGETS[name](images, m))
        assert y.shape == (b, n, core.target_dim(name, m)), (name, y.shape)
        out[name] = y
    return out
