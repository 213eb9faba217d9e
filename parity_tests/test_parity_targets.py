"""JAX vs torch: auxiliary targets, perceptual pyramid and loss, patch-GAN and GAN losses.

Same numpy inputs and the same ``maetok.params.init_disc`` parameters go to both
backends; outputs and gradients are compared with the tolerances of ``conftest.TOL``
(relative error, max|a − b| / max|b|, per array or per parameter leaf). The JAX side runs
under ``jax.jit`` as a train step would.
"""

from __future__ import annotations

import jax
import numpy as np
import pytest
import torch
from conftest import TOL, assert_close, to_jax, to_torch

import maetok_jax.discriminator as jd
import maetok_jax.perceptual as jp
import maetok_jax.targets as jt
import maetok_torch.discriminator as td
import maetok_torch.perceptual as tp
import maetok_torch.targets as tt
from maetok.config import preset
from maetok.filters import PERCEP_LEVELS
from maetok.params import init_disc

# tiny (p = 4: one HOG cell per patch) and p = 16 (2×2 HOG cells of 8 px per patch).
CONFIGS = {
    "tiny_p4": preset("tiny").model,
    "p16": preset("tiny").replace(model={"patch_size": 16}).model,
}


def _images(rng, m, b=2) -> np.ndarray:
    return rng.uniform(-1, 1, (b, m.image_size, m.image_size, m.channels)).astype(np.float32)


def test_same_targets_in_both_backends():
    assert set(jt.TARGETS) == set(tt.TARGETS)


@pytest.mark.parametrize("cfg", list(CONFIGS))
@pytest.mark.parametrize("name", ["hog", "conv", "pixel"])
def test_target_forward(cfg, name, rng, device):
    m = CONFIGS[cfg]
    x = _images(rng, m)
    y_jax = jax.jit(jt.TARGETS[name], static_argnums=1)(to_jax(x), m)
    y_torch = tt.TARGETS[name](to_torch(x, device), m)
    assert_close(y_jax, y_torch, TOL["forward_fp32"], f"{cfg}/{name}")


def test_compute_targets(rng, device):
    m = CONFIGS["p16"]
    x = _images(rng, m)
    out_jax = jax.jit(jt.compute_targets, static_argnums=1)(to_jax(x), m)
    out_torch = tt.compute_targets(to_torch(x, device), m)
    assert set(out_torch) == set(m.aux_targets)
    assert_close(out_jax, out_torch, TOL["forward_fp32"], "compute_targets")


def test_perceptual_features_every_level(rng, device):
    m = CONFIGS["tiny_p4"]
    x = _images(rng, m)
    f_jax = jax.jit(jp.perceptual_features, static_argnums=1)(to_jax(x), m)
    f_torch = tp.perceptual_features(to_torch(x, device), m)
    assert len(f_jax) == len(f_torch) == PERCEP_LEVELS
    for level in range(PERCEP_LEVELS):
        assert_close(f_jax[level], f_torch[level], TOL["forward_fp32"], f"percep/level{level}")


def test_perceptual_loss_and_grad(rng, device):
    m = CONFIGS["tiny_p4"]
    x = _images(rng, m)
    r = np.clip(x + 0.2 * rng.standard_normal(x.shape), -1, 1).astype(np.float32)
    loss_j, grad_j = jax.jit(
        jax.value_and_grad(lambda a, b: jp.perceptual_loss(a, b, m), argnums=1)
    )(to_jax(x), to_jax(r))
    r_t = to_torch(r, device).requires_grad_(True)
    loss_t = tp.perceptual_loss(to_torch(x, device), r_t, m)
    loss_t.backward()
    assert_close(loss_j, loss_t, TOL["forward_fp32"], "perceptual_loss")
    assert_close(grad_j, r_t.grad, TOL["grad_fp32"], "d perceptual_loss / d recon")


@pytest.mark.parametrize("cfg", list(CONFIGS))
def test_discriminator_forward(cfg, rng, device):
    m = CONFIGS[cfg]
    params = init_disc(m, int(rng.integers(1 << 30)))
    x = _images(rng, m)
    y_jax = jax.jit(jd.discriminator, static_argnums=2)(to_jax(params), to_jax(x), m)
    y_torch = td.discriminator(to_torch(params, device), to_torch(x, device), m)
    side = m.image_size >> m.disc_depth
    assert tuple(y_torch.shape) == tuple(y_jax.shape) == (2, side, side)
    assert_close(y_jax, y_torch, TOL["forward_fp32"], f"{cfg}/discriminator")


def test_gan_losses(rng, device):
    real = (2 * rng.standard_normal((4, 8, 8))).astype(np.float32)
    fake = (2 * rng.standard_normal((4, 8, 8))).astype(np.float32)
    ema_r, ema_f = float(rng.uniform(0, 1)), float(rng.uniform(-1, 0))
    rj, fj = to_jax(real), to_jax(fake)
    rt, ft = to_torch(real, device), to_torch(fake, device)
    tol = TOL["forward_fp32"]
    assert_close(jd.hinge_d_loss(rj, fj), td.hinge_d_loss(rt, ft), tol, "hinge_d_loss")
    assert_close(jd.generator_adv_loss(fj), td.generator_adv_loss(ft), tol, "generator_adv_loss")
    assert_close(
        jd.lecam_loss(rj, fj, ema_r, ema_f), td.lecam_loss(rt, ft, ema_r, ema_f), tol, "lecam_loss"
    )
    assert_close(
        jd.update_lecam(ema_r, ema_f, rj, fj, 0.999),
        td.update_lecam(ema_r, ema_f, rt, ft, 0.999),
        tol,
        "update_lecam",
    )


@pytest.mark.parametrize("cfg", list(CONFIGS))
def test_discriminator_hinge_grad(cfg, rng, device):
    m = CONFIGS[cfg]
    params = init_disc(m, int(rng.integers(1 << 30)))
    real, fake = _images(rng, m), _images(rng, m)
    # Shift the output bias so half the real logits sit past the hinge margin: with every
    # logit near 0 (fresh init) the bias gradient is −1 + 1, a cancellation to ~0 whose
    # relative error means nothing. The median of an even count keeps logits off the kink.
    logits = td.discriminator(to_torch(params, "cpu"), to_torch(real, "cpu"), m).numpy()
    params["out"]["b"] = np.full((1,), 1.0 - np.median(logits), np.float32)

    def loss_jax(p, a, b):
        return jd.hinge_d_loss(jd.discriminator(p, a, m), jd.discriminator(p, b, m))

    loss_j, grads_j = jax.jit(jax.value_and_grad(loss_jax))(
        to_jax(params), to_jax(real), to_jax(fake)
    )
    p_t = to_torch(params, device)
    leaves = [v for layer in p_t.values() for v in layer.values()]
    for leaf in leaves:
        leaf.requires_grad_(True)
    loss_t = td.hinge_d_loss(
        td.discriminator(p_t, to_torch(real, device), m),
        td.discriminator(p_t, to_torch(fake, device), m),
    )
    loss_t.backward()
    grads_t = {k: {n: v.grad for n, v in layer.items()} for k, layer in p_t.items()}
    assert_close(loss_j, loss_t, TOL["forward_fp32"], f"{cfg}/hinge_d_loss")
    assert all(torch.count_nonzero(g) for layer in grads_t.values() for g in layer.values())
    assert_close(grads_j, grads_t, TOL["grad_fp32"], f"{cfg}/d hinge / d disc")
