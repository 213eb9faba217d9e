"""Patch-GAN discriminator and its losses (docs/design.md §5), over ``maetok.params.spec_disc``.

``disc_depth`` 4×4 stride-2 convs (zero padding 1 on every side, bias, LeakyReLU 0.2),
then a 4×4 stride-1 conv to one logit per location. No normalisation layers. Kernels are
``(kh, kw, in, out)`` and used as HWIO directly. Mirrored in ``maetok_torch/discriminator.py``.

Pinned numerics (padding, slope, hinge, LeCAM, EMA): ``maetok.numerics``; convolutions
run at HIGHEST precision.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from maetok.config import ModelConfig
from maetok.numerics import LEAKY_SLOPE

_DN = ("NHWC", "HWIO", "NHWC")


def _conv(x: jnp.ndarray, p: dict, stride: int, pad: tuple[int, int]) -> jnp.ndarray:
    """(B, h, w, in) → (B, h', w', out) with zero padding ``pad`` = (before, after) per axis."""
    y = jax.lax.conv_general_dilated(
        x,
        p["w"],
        (stride, stride),
        (pad, pad),
        dimension_numbers=_DN,
        precision=jax.lax.Precision.HIGHEST,
    )
    return y + p["b"]


def discriminator(params: dict, images: jnp.ndarray, m: ModelConfig) -> jnp.ndarray:
    """Patch logits: (B, H, W, C) → (B, H/2^d, W/2^d), d = m.disc_depth."""
    x = images
    for i in range(m.disc_depth):
        x = jax.nn.leaky_relu(_conv(x, params[f"conv{i}"], 2, (1, 1)), LEAKY_SLOPE)
    x = _conv(x, params["out"], 1, (1, 2))  # (B, h, w, 1)
    return x[..., 0]


def hinge_d_loss(real_logits: jnp.ndarray, fake_logits: jnp.ndarray) -> jnp.ndarray:
    """Discriminator hinge loss (no ½ factor), a scalar."""
    return jnp.mean(jax.nn.relu(1.0 - real_logits)) + jnp.mean(jax.nn.relu(1.0 + fake_logits))


def generator_adv_loss(fake_logits: jnp.ndarray) -> jnp.ndarray:
    """Generator term −mean D(Î), a scalar."""
    return -jnp.mean(fake_logits)


def lecam_loss(
    real_logits: jnp.ndarray, fake_logits: jnp.ndarray, ema_real, ema_fake
) -> jnp.ndarray:
    """LeCAM regulariser; ``ema_real``/``ema_fake`` are scalars (EMAs of the mean logits)."""
    return jnp.mean(jax.nn.relu(real_logits - ema_fake) ** 2) + jnp.mean(
        jax.nn.relu(ema_real - fake_logits) ** 2
    )


def update_lecam(
    ema_real, ema_fake, real_logits: jnp.ndarray, fake_logits: jnp.ndarray, decay: float
) -> tuple[jnp.ndarray, jnp.ndarray]:
    """New (ema_real, ema_fake) = decay·ema + (1 − decay)·mean(logits); no gradient."""
    real = jax.lax.stop_gradient(jnp.mean(real_logits))
    fake = jax.lax.stop_gradient(jnp.mean(fake_logits))
    return decay * ema_real + (1.0 - decay) * real, decay * ema_fake + (1.0 - decay) * fake
