"""Patch-GAN discriminator and its losses (docs/design.md §5), over ``maetok.params.spec_disc``.

``disc_depth`` 4×4 stride-2 convs (zero padding 1 on every side, bias, LeakyReLU 0.2),
then a 4×4 stride-1 conv to one logit per location. No normalisation layers. Kernels are
``(kh, kw, in, out)`` in the parameter tree and used as ``w.permute(3, 2, 0, 1)``; images
are (B, H, W, C) at the boundary and NCHW inside. Mirrored in ``maetok_jax/discriminator.py``.

Pinned numerics (padding, slope, hinge, LeCAM, EMA): ``maetok.numerics``; the ``out``
conv's (1, 2) padding is an ``F.pad`` then a conv with padding 0.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from maetok.config import ModelConfig
from maetok.numerics import LEAKY_SLOPE


def _conv(x: torch.Tensor, p: dict, stride: int, pad: tuple[int, int]) -> torch.Tensor:
    """(B, in, h, w) → (B, out, h', w') with zero padding ``pad`` = (before, after) per axis."""
    x = F.pad(x, (pad[0], pad[1], pad[0], pad[1]))  # (left, right, top, bottom)
    return F.conv2d(x, p["w"].permute(3, 2, 0, 1), p["b"], stride=stride)


def discriminator(params: dict, images: torch.Tensor, m: ModelConfig) -> torch.Tensor:
    """Patch logits: (B, H, W, C) → (B, H/2^d, W/2^d), d = m.disc_depth."""
    x = images.permute(0, 3, 1, 2)  # (B, C, H, W)
    for i in range(m.disc_depth):
        x = F.leaky_relu(_conv(x, params[f"conv{i}"], 2, (1, 1)), LEAKY_SLOPE)
    x = _conv(x, params["out"], 1, (1, 2))  # (B, 1, h, w)
    return x[:, 0]


def hinge_d_loss(real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
    """Discriminator hinge loss (no ½ factor), a scalar."""
    return torch.mean(F.relu(1.0 - real_logits)) + torch.mean(F.relu(1.0 + fake_logits))


def generator_adv_loss(fake_logits: torch.Tensor) -> torch.Tensor:
    """Generator term −mean D(Î), a scalar."""
    return -torch.mean(fake_logits)


def lecam_loss(
    real_logits: torch.Tensor, fake_logits: torch.Tensor, ema_real, ema_fake
) -> torch.Tensor:
    """LeCAM regulariser; ``ema_real``/``ema_fake`` are scalars (EMAs of the mean logits)."""
    return torch.mean(F.relu(real_logits - ema_fake) ** 2) + torch.mean(
        F.relu(ema_real - fake_logits) ** 2
    )


def update_lecam(
    ema_real, ema_fake, real_logits: torch.Tensor, fake_logits: torch.Tensor, decay: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """New (ema_real, ema_fake) = decay·ema + (1 − decay)·mean(logits); no gradient."""
    real = torch.mean(real_logits.detach())
    fake = torch.mean(fake_logits.detach())
    return decay * ema_real + (1.0 - decay) * real, decay * ema_fake + (1.0 - decay) * fake
