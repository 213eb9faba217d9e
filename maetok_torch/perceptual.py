"""The frozen in-project perceptual feature pyramid and its loss (docs/design.md §5).

No downloaded weights: level 0 is the image, level l+1 the 2×2 average-pooled level l,
and each level is passed through the fixed Gaussian-derivative bank
``maetok.filters.percep_bank`` (∂x, ∂y, ∂xx, ∂yy, ∂xy at σ = 1) per colour channel.
Mirrored function for function in ``maetok_jax/perceptual.py``; images stay (B, H, W, C)
at the boundary and are folded to planes ``(B·C, h, w)`` only around the convolution.

Pinned numerics (padding, pooling, smooth energy, level order): ``maetok.numerics``.
"""

from __future__ import annotations

import numpy as np
import torch

from maetok.config import ModelConfig
from maetok.filters import PERCEP_LEVELS
from maetok.numerics import PERCEP_EPS
from maetok_torch.constants import Bank, bank
from maetok_torch.targets import filter_dtype, per_channel_conv


def _avg_pool2(x: torch.Tensor) -> torch.Tensor:
    """(B, H, W, C) → (B, H/2, W/2, C)."""
    b, h, w, c = x.shape
    return x.reshape(b, h // 2, 2, w // 2, 2, c).mean(dim=(2, 4))


def _level_features(
    x: torch.Tensor, kernel: np.ndarray | Bank, dtype=torch.float32
) -> torch.Tensor:
    """φ of one level: (B, h, w, C) → (B, h, w, C·F), feature index c·F + f.

    The convolution runs in ``dtype`` (``targets.filter_dtype``), the energy in float32.
    """
    b, h, w, c = x.shape
    y = per_channel_conv(x, kernel, dtype)  # (B, C, h, w, F)
    y = torch.sqrt(y * y + PERCEP_EPS)
    return y.permute(0, 2, 3, 1, 4).reshape(b, h, w, c * kernel.shape[-1])


def perceptual_features(images: torch.Tensor, m: ModelConfig) -> list[torch.Tensor]:
    """PERCEP_LEVELS feature maps; level l is (B, H/2^l, W/2^l, C·5)."""
    kernel = bank(m.patch_size, "percep")  # (5, 5, 1, 5)
    feats, x = [], images
    for level in range(PERCEP_LEVELS):
        if level:
            x = _avg_pool2(x)
        feats.append(_level_features(x, kernel, filter_dtype(m)))
    return feats


def perceptual_loss(images: torch.Tensor, recon: torch.Tensor, m: ModelConfig) -> torch.Tensor:
    """Σ_l mean((φ_l(images) − φ_l(recon))²), a scalar; gradients flow to ``recon`` only.

    images, recon: (B, H, W, C). Both go through the pyramid as one batch of 2B.
    """
    b = images.shape[0]
    both = torch.cat([images.detach(), recon], dim=0)  # (2B, H, W, C)
    loss = None
    for f in perceptual_features(both, m):
        term = torch.mean((f[:b] - f[b:]) ** 2)
        loss = term if loss is None else loss + term
    return loss
