"""The frozen in-project perceptual feature pyramid and its loss (docs/design.md §5).

No downloaded weights: level 0 is the image, level l+1 the 2×2 average-pooled level l,
and each level is passed through the fixed Gaussian-derivative bank
``maetok.filters.percep_bank`` (∂x, ∂y, ∂xx, ∂yy, ∂xy at σ = 1) per colour channel.
Mirrored function for function in ``maetok_torch/perceptual.py``.

Pinned numerics (padding, pooling, smooth energy, level order): ``maetok.numerics``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from maetok.config import ModelConfig
from maetok.filters import PERCEP_LEVELS, filter_banks
from maetok.numerics import PERCEP_EPS
from maetok_jax.targets import filter_dtype, plane_conv, planes


def _avg_pool2(x: jnp.ndarray) -> jnp.ndarray:
    """Planes (N, h, w) → (N, h/2, w/2)."""
    n, h, w = x.shape
    return x.reshape(n, h // 2, 2, w // 2, 2).mean(axis=(2, 4))


def _plane_features(x: jnp.ndarray, m: ModelConfig) -> list[jnp.ndarray]:
    """φ of every level of planes x (N, H, W): PERCEP_LEVELS maps (N, H/2^l, W/2^l, F).

    The pyramid stays in planes from level 0 on: each level is pooled from the one before
    and convolved where it lies, not gathered again from the (B, H, W, C) images. The
    convolution runs in ``targets.filter_dtype``, the energy in float32.
    """
    kernel = filter_banks(m.patch_size)["percep"]  # (5, 5, 1, 5)
    feats = []
    for level in range(PERCEP_LEVELS):
        if level:
            x = _avg_pool2(x)
        y = plane_conv(x, kernel, filter_dtype(m))
        feats.append(jnp.sqrt(y * y + PERCEP_EPS))
    return feats


def perceptual_features(images: jnp.ndarray, m: ModelConfig) -> list[jnp.ndarray]:
    """PERCEP_LEVELS feature maps; level l is (B, H/2^l, W/2^l, C·5), feature index c·5 + f."""
    b, _, _, c = images.shape
    feats = []
    for f in _plane_features(planes(images), m):
        _, h, w, nf = f.shape
        feats.append(f.reshape(b, c, h, w, nf).transpose(0, 2, 3, 1, 4).reshape(b, h, w, c * nf))
    return feats


def perceptual_loss(images: jnp.ndarray, recon: jnp.ndarray, m: ModelConfig) -> jnp.ndarray:
    """Σ_l mean((φ_l(images) − φ_l(recon))²), a scalar; gradients flow to ``recon`` only.

    images, recon: (B, H, W, C). Both go through the pyramid as one batch of 2B, as planes:
    a mean over every feature needs no (B, h, w, C·5) layout.
    """
    with jax.named_scope("perceptual"):
        both = jnp.concatenate([jax.lax.stop_gradient(images), recon], axis=0)  # (2B, H, W, C)
        half = images.shape[0] * images.shape[-1]  # the planes of images, then of recon
        loss = None
        for f in _plane_features(planes(both), m):
            term = jnp.mean((f[:half] - f[half:]) ** 2)
            loss = term if loss is None else loss + term
        return loss
