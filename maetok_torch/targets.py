"""Auxiliary targets (docs/design.md §4): fixed features of the image, one vector per image token.

Every target maps ``images (B, H, W, C) → (B, N, D_j)`` with ``D_j =
maetok.targets.target_dim(name, m)``. They are computed from the clean image, never
differentiated, and mirrored function for function in ``maetok_jax/targets.py``.

Filters come from ``maetok.filters.filter_banks`` (numpy, lru-cached) and are applied to
each colour channel separately by folding C into the batch: ``(B, H, W, C) → (B·C, H, W)``.
All convolutions are cross-correlations (the convention of both ``F.conv2d`` and
``lax.conv``), after reflect padding, computed as one convolution on pixel blocks
(``block_conv``, as in JAX; the HOG gradients on cell-sized blocks, the others on
4-pixel blocks through ``fixed_conv``): in float32 — or, with bf16 compute and
``model.fast_filters``, in bf16 (``filter_dtype``). Everything after the convolutions stays
float32.

Pinned numerics (padding, HOG voting, normalisation, epsilons): ``maetok.numerics``.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F

import maetok.targets as core
from maetok.config import ModelConfig
from maetok.filters import (
    CONV_BLOCK,
    block_kernel,
    block_taps,
    hog_window_cells,
)
from maetok.numerics import GABOR_EPS, HOG_EPS, PIXEL_EPS
from maetok_torch.compiled import compiled_part
from maetok_torch.constants import Bank, bank, on_device
from maetok_torch.patches import patchify


def filter_dtype(m: ModelConfig):
    """The dtype of the fixed convolutions (targets, perceptual pyramid): bf16 when the
    model computes in bf16 and ``m.fast_filters`` is on, else float32."""
    fast = m.fast_filters and m.compute_dtype == "bfloat16"
    return torch.bfloat16 if fast else torch.float32


def block_conv(
    x: torch.Tensor, kernel: np.ndarray | Bank, dtype=torch.float32, block: int = CONV_BLOCK
) -> torch.Tensor:
    """Stride-1 'VALID' correlation of planes x (B, H, W) with a fixed ``kernel (k, k, 1, F)``
    (an array or a ``Bank``), as one convolution on ``block × block`` pixel blocks
    (``maetok.filters.block_kernel``) in ``dtype``.

    → (B, ⌈h/block⌉, ⌈w/block⌉, block², F) in ``dtype`` (a view of F.conv2d's output),
    h × w the valid output: output block (i, j) holds pixel (i·block + u, j·block + v) at
    index u·block + v. The planes are zero-padded at the bottom and right to whole blocks;
    no output inside h × w reads a padded pixel. In float32 on a GPU, cuDNN may use TF32
    (torch's default for convolutions, as in the discriminator); the parity runs switch it
    off.
    """
    n, hp, wp = x.shape
    k, nf, s = kernel.shape[0], kernel.shape[-1], block
    h, w = hp - k + 1, wp - k + 1
    hb, wb, taps = -(-h // s), -(-w // s), block_taps(k, s)
    rows, cols = hb + taps - 1, wb + taps - 1  # input blocks
    x = F.pad(x.to(dtype), (0, s * cols - wp, 0, s * rows - hp))
    x = x.reshape(n, rows, s, cols, s).permute(0, 2, 4, 1, 3).reshape(n, s * s, rows, cols)
    if isinstance(kernel, Bank):
        key, array = ("block", s, kernel), kernel.array
    else:
        key, array = ("block", s, kernel.tobytes(), kernel.shape), lambda: kernel
    # HWIO → OIHW, F.conv2d's layout
    weight = on_device(key, lambda: block_kernel(array(), s).transpose(3, 2, 0, 1), x.device, dtype)
    y = F.conv2d(x, weight)  # (B, (u, v, F), hb, wb)
    return y.reshape(n, s * s, nf, hb, wb).permute(0, 3, 4, 1, 2)


def fixed_conv(x: torch.Tensor, kernel: np.ndarray | Bank, dtype=torch.float32) -> torch.Tensor:
    """Stride-1 'VALID' correlation of planes x (B, H, W) with a fixed ``kernel (k, k, 1, F)``
    (``block_conv`` on ``CONV_BLOCK``-pixel blocks) → (B, H−k+1, W−k+1, F), float32."""
    n, hp, wp = x.shape
    k, nf, s = kernel.shape[0], kernel.shape[-1], CONV_BLOCK
    y = block_conv(x, kernel, dtype)
    hb, wb = y.shape[1:3]
    y = y.reshape(n, hb, wb, s, s, nf).permute(0, 1, 3, 2, 4, 5).reshape(n, hb * s, wb * s, nf)
    return y[:, : hp - k + 1, : wp - k + 1].to(torch.float32)


def reflect_pad(x: torch.Tensor, kernel: np.ndarray | Bank) -> torch.Tensor:
    """Planes (N, H, W) reflect-padded by half of ``kernel``'s side, for a same-size output."""
    r = kernel.shape[0] // 2
    return F.pad(x, (r, r, r, r), mode="reflect")


def planes(images: torch.Tensor) -> torch.Tensor:
    """Each colour channel as a plane: (B, H, W, C) → (B·C, H, W), plane b·C + c."""
    b, h, w, c = images.shape
    return images.permute(0, 3, 1, 2).reshape(b * c, h, w)


def plane_conv(x: torch.Tensor, kernel: np.ndarray | Bank, dtype=torch.float32) -> torch.Tensor:
    """Reflect-padded, stride-1 correlation of planes x (N, H, W) with ``kernel (k, k, 1, F)``
    → (N, H, W, F), float32."""
    return fixed_conv(reflect_pad(x, kernel), kernel, dtype)


def per_channel_conv(
    images: torch.Tensor, kernel: np.ndarray | Bank, dtype=torch.float32
) -> torch.Tensor:
    """Reflect-padded, stride-1 correlation of each channel with ``kernel (k, k, 1, F)``.

    (B, H, W, C) → (B, C, H, W, F), float32.
    """
    b, h, w, c = images.shape
    return plane_conv(planes(images), kernel, dtype).reshape(b, c, h, w, kernel.shape[-1])


def hog(images: torch.Tensor, m: ModelConfig) -> torch.Tensor:
    """HOG target: (B, H, W, C) → (B, N, C·9·(p/cell)²).

    Feature order within a token: cell row, cell column (row-major over the patch's
    cells), then colour channel, then orientation bin — i.e. index
    ``((i·(p/cell) + j)·C + c)·9 + k``. Bin k is centred on the unsigned orientation
    ``(k + ½)·π/9`` of ``atan2(gx, gy)``: a vertical edge (gx ≠ 0, gy = 0) lands in bin 4.
    """
    b, h, w, c = images.shape
    p, cell, nb = m.patch_size, core.hog_cell(m.patch_size), core.HOG_BINS
    sobel = bank(p, "sobel")
    # The gradients on cell-sized pixel blocks: each output block is one cell, (B·C, hc, wc,
    # cell²), and its histogram a sum over the minor axis.
    g = block_conv(reflect_pad(planes(images), sobel), sobel, filter_dtype(m), cell)
    gx, gy = g[..., 0].to(torch.float32), g[..., 1].to(torch.float32)
    mag = torch.sqrt(gx * gx + gy * gy)
    # Continuous position on the bin axis; bin k's centre sits at t = k.
    t = torch.atan2(gx, gy) * (nb / math.pi) - 0.5
    bins = torch.arange(nb, dtype=t.dtype, device=t.device)[:, None, None, None]  # as planes
    d = torch.remainder(t[:, None] - bins, float(nb))  # (B·C, 9, hc, wc, cell²)
    vote = torch.relu(1.0 - torch.minimum(d, nb - d))  # two neighbours, weights sum to 1
    window = on_device(  # (hc, wc, cell²)
        ("hog_window_cells", p, cell, h, w),
        lambda: hog_window_cells(p, cell, h, w),
        images.device,
        images.dtype,
    )
    v = torch.sum(vote * (mag * window)[:, None], dim=-1)  # (B·C, 9, hc, wc)
    v = v / torch.sqrt(torch.sum(v * v, dim=1, keepdim=True) + HOG_EPS)
    # Group the cells of each patch: (B, gh, gw, cells_h, cells_w, C, 9).
    u, gh, gw = p // cell, h // p, w // p
    v = v.reshape(b, c, nb, gh, u, gw, u).permute(0, 3, 5, 4, 6, 1, 2)
    return v.reshape(b, gh * gw, u * u * c * nb)


def conv_features(images: torch.Tensor, m: ModelConfig) -> torch.Tensor:
    """Multi-scale Gabor energy target: (B, H, W, C) → (B, N, C·S·O).

    Feature order within a token: channel, then scale, then orientation — index
    ``(c·S + s)·O + o`` (the order of ``maetok.filters.gabor_bank``'s pairs). Each value is
    the quadrature-pair energy averaged over the p×p patch.
    """
    b, h, w, c = images.shape
    p = m.patch_size
    gabor = bank(p, "gabor")  # (k, k, 1, 2·S·O), pairs [even, odd]
    y = per_channel_conv(images, gabor, filter_dtype(m))  # (B, C, H, W, 2·S·O)
    so = gabor.shape[-1] // 2
    y = y.reshape(b, c, h, w, so, 2)
    e = torch.sqrt(y[..., 0] ** 2 + y[..., 1] ** 2 + GABOR_EPS)  # (B, C, H, W, S·O)
    gh, gw = h // p, w // p
    e = e.reshape(b, c, gh, p, gw, p, so).mean(dim=(3, 5))  # (B, C, gh, gw, S·O)
    return e.permute(0, 2, 3, 1, 4).reshape(b, gh * gw, c * so)


def normalized_pixels(images: torch.Tensor, m: ModelConfig) -> torch.Tensor:
    """MAE pixel target: each patch standardised by its own mean and variance. → (B, N, p·p·C)."""
    x = patchify(images, m.patch_size)  # (B, N, p·p·C)
    mean = torch.mean(x, dim=-1, keepdim=True)
    var = torch.mean((x - mean) ** 2, dim=-1, keepdim=True)
    return (x - mean) / torch.sqrt(var + PIXEL_EPS)


# -------------------------------------------------------------------------------- registry

TARGETS: dict[str, Callable] = {"hog": hog, "conv": conv_features, "pixel": normalized_pixels}


def register_target(name: str, fn: Callable, dim) -> None:
    """Add a user target ``fn(images (B,H,W,C), m) → (B, N, dim)``; ``dim`` an int or fn(m)."""
    core.add_target(TARGETS, name, fn, dim)


@compiled_part
def compute_targets(images: torch.Tensor, m: ModelConfig) -> dict[str, torch.Tensor]:
    """Every target named in ``m.aux_targets``: ``{name: (B, N, D_j)}``, gradient-free."""
    core.check_implemented(TARGETS, m, "torch", __name__)
    b, h, w, _ = images.shape
    n = (h // m.patch_size) * (w // m.patch_size)
    out = {}
    with torch.no_grad():
        images = images.detach()
        for name in m.aux_targets:
            y = TARGETS[name](images, m).detach()
            assert y.shape == (b, n, core.target_dim(name, m)), (name, tuple(y.shape))
            out[name] = y
    return out
