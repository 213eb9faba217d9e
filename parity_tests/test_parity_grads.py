"""JAX vs torch, gradients: the Stage-1 total, the Stage-2 total (w.r.t. the decoder) and the
discriminator loss, with respect to EVERY parameter leaf.

The functions are the ones the train steps differentiate (``train.generator_loss`` and
``train.disc_loss``), through each backend's own machinery: ``jax.value_and_grad`` under
``jax.jit``, and ``maetok_torch.train.value_and_grad`` (``torch.func.grad``). Per leaf,
``max|g_torch − g_jax| / max(‖g_jax‖_∞, tiny) ≤ TOL["grad_fp32"]``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from conftest import TOL, assert_close, to_jax, to_torch

import maetok_jax.targets as jtg
import maetok_jax.train as jt
import maetok_torch.targets as ttg
import maetok_torch.train as tt
from maetok.config import preset
from maetok.params import init_disc, init_params
from maetok.parity import disc_off_margin
from maetok.train_state import trainable_keys
from maetok.tree import iter_leaves

TINY = preset("tiny")
CONFIGS = {
    "tiny": TINY,
    "mlp": TINY.replace(model={"aux_kind": "mlp"}),
    "adv": TINY.replace(loss={"use_adv": True, "adaptive_weight": True}),
    "remat": TINY.replace(model={"remat": True}),
    "query_pos": TINY.replace(model={"query_pos": True}),
}
B = 2


def _inputs(rng, cfg):
    m = cfg.model
    seed = int(rng.integers(1 << 30))
    x = rng.uniform(-1, 1, (B, m.image_size, m.image_size, m.channels)).astype(np.float32)
    mask = (rng.random((B, m.num_patches)) < rng.uniform(0.3, 0.7)).astype(np.float32)
    disc = disc_off_margin(init_disc(cfg, seed), x, m) if cfg.loss.use_adv else None
    return init_params(cfg, seed), disc, x, mask


def _grads(cfg, params, disc, x, mask, device):
    """(loss, metrics, grads) of ``generator_loss`` over the stage's groups, in both backends."""
    keys = trainable_keys(cfg.train.stage)
    m = cfg.model
    adv_on = 1.0

    def loss_j(tr, fr, d, x, k):
        tg = jtg.compute_targets(x, m) if cfg.train.stage == 1 else {}
        return jt.generator_loss(tr, fr, d, x, k, tg, jnp.float32(adv_on), cfg)

    pj, xj, kj = to_jax(params), to_jax(x), to_jax(mask)
    (loss_jx, (met_j, _)), g_j = jax.jit(jax.value_and_grad(loss_j, has_aux=True))(
        {k: pj[k] for k in keys},
        {k: pj[k] for k in pj if k not in keys},
        to_jax(disc) if disc else None,
        xj,
        kj,
    )

    pt, xt, kt = to_torch(params, device), to_torch(x, device), to_torch(mask, device)
    tg = ttg.compute_targets(xt, m) if cfg.train.stage == 1 else {}
    (loss_t, (met_t, _)), g_t = tt.value_and_grad(
        tt.generator_loss,
        {k: pt[k] for k in keys},
        {k: pt[k] for k in pt if k not in keys},
        to_torch(disc, device) if disc else None,
        xt,
        kt,
        tg,
        torch.tensor(adv_on, device=device),
        cfg,
        autograd=m.remat,
    )
    return (loss_t, met_t, g_t), (loss_jx, met_j, g_j)


def _assert_every_leaf(g_t, g_j, name):
    leaves_t = dict(iter_leaves(g_t))
    leaves_j = dict(iter_leaves(jax.tree_util.tree_map(np.asarray, g_j)))
    assert set(leaves_t) == set(leaves_j), f"{name}: leaves differ"
    for path, gj in leaves_j.items():
        gt = leaves_t[path]
        assert gt.dtype == torch.float32 and tuple(gt.shape) == gj.shape, path
        assert np.abs(gj).max() > 0, f"{name}/{path}: zero gradient in JAX"
    assert_close(g_t, g_j, TOL["grad_fp32"], name)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_stage1_total_grads(name, rng, device):
    cfg = CONFIGS[name]
    (loss_t, met_t, g_t), (loss_j, met_j, g_j) = _grads(cfg, *_inputs(rng, cfg), device)
    assert set(g_t) == {"encoder", "decoder", "aux"}
    assert_close(loss_t, loss_j, TOL["forward_fp32"], f"{name}/stage1 loss")
    assert_close(
        {k: v for k, v in met_t.items()}, dict(met_j), TOL["forward_fp32"], f"{name}/stage1 metrics"
    )
    _assert_every_leaf(g_t, g_j, f"{name}/stage1 grads")


@pytest.mark.parametrize("name", ["tiny", "adv"])
def test_stage2_total_grads_decoder_only(name, rng, device):
    cfg = CONFIGS[name].replace(train={"stage": 2})
    (loss_t, met_t, g_t), (loss_j, met_j, g_j) = _grads(cfg, *_inputs(rng, cfg), device)
    assert set(g_t) == set(g_j) == {"decoder"}
    assert "mask" not in met_t and "mask" not in met_j  # aux decoders are not evaluated
    assert_close(loss_t, loss_j, TOL["forward_fp32"], f"{name}/stage2 loss")
    _assert_every_leaf(g_t, g_j, f"{name}/stage2 grads")


def test_disc_loss_grads(rng, device):
    cfg = CONFIGS["adv"]
    m, lo = cfg.model, cfg.loss
    _, disc, x, _ = _inputs(rng, cfg)
    recon = np.clip(x + 0.3 * rng.standard_normal(x.shape), -1, 1).astype(np.float32)
    # EMAs away from 0 so both LeCAM branches are active and distinct.
    lecam = {"real": np.float32(rng.uniform(0.1, 0.5)), "fake": np.float32(rng.uniform(-0.5, -0.1))}
    (tot_j, aux_j), g_j = jax.jit(
        jax.value_and_grad(jt.disc_loss, has_aux=True), static_argnums=(4, 5)
    )(to_jax(disc), to_jax(x), to_jax(recon), to_jax(lecam), lo, m)
    (tot_t, aux_t), g_t = tt.value_and_grad(
        tt.disc_loss,
        to_torch(disc, device),
        to_torch(x, device),
        to_torch(recon, device),
        to_torch(lecam, device),
        lo,
        m,
    )
    assert_close(tot_t, tot_j, TOL["forward_fp32"], "disc_loss")
    assert_close(list(aux_t), list(aux_j), TOL["forward_fp32"], "disc_loss aux")
    _assert_every_leaf(g_t, g_j, "disc grads")
