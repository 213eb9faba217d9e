"""JAX vs torch, optimisers: from identical gradients, Adam / AdamW / SGD (with and without
momentum), with and without global-norm clipping, over several steps, give the same
parameters and the same state (count, mu, nu); and the same EMA.

The JAX side runs under ``jax.jit`` as in the train step. Each step's inputs are the same
numpy arrays on both sides, so only the element-wise arithmetic is compared: held to
``TOL["forward_fp32"]`` per leaf, at every step.
"""

from __future__ import annotations

import jax
import numpy as np
import pytest
import torch
from conftest import TOL, assert_close, to_jax, to_torch

import maetok_jax.optim as jo
import maetok_torch.optim as to
from maetok.config import TrainConfig
from maetok.tree import leaves, map_tree

CASES = [
    ("adamw", 0.0, 0.9),
    ("adamw", 0.5, 0.9),
    ("adam", 0.0, 0.9),
    ("adam", 0.5, 0.9),
    ("sgd", 0.0, 0.9),
    ("sgd", 0.5, 0.9),
    ("sgd", 0.5, 0.0),
]
STEPS = 5


def _tree(rng, scale=1.0) -> dict:
    def leaf(*shape):
        return (scale * rng.standard_normal(shape)).astype(np.float32)

    return {"a": {"w": leaf(6, 4), "b": leaf(4)}, "z": leaf(3, 2, 5)}


@pytest.mark.parametrize("name,clip,momentum", CASES)
def test_optimizer_steps(name, clip, momentum, rng, device):
    t = TrainConfig(
        optimizer=name,
        grad_clip=clip,
        momentum=momentum,
        weight_decay=0.01,
        b1=0.9,
        b2=0.95,
        eps=1e-8,
    )
    params = _tree(rng)

    init_j, update_j = jo.make_optimizer(t)
    init_t, update_t = to.make_optimizer(t)

    @jax.jit
    def step_j(g, state, p, lr):
        g, norm = jo.clip_by_global_norm(g, t.grad_clip)
        new_p, new_state = update_j(g, state, p, lr)
        return new_p, new_state, norm

    pj, pt = to_jax(params), to_torch(params, device)
    sj, st = init_j(pj), init_t(pt)
    assert st.count.dtype == torch.int32 and (st.nu == {}) == (name == "sgd")
    for i in range(STEPS):
        grads = _tree(rng, scale=float(rng.uniform(0.2, 3.0)))  # clipping on some steps
        lr = np.float32(rng.uniform(1e-3, 1e-1))
        pj, sj, norm_j = step_j(to_jax(grads), sj, pj, lr)
        with torch.no_grad():
            g, norm_t = to.clip_by_global_norm(to_torch(grads, device), t.grad_clip)
            pt, st = update_t(g, st, pt, torch.tensor(lr, device=device))
        tag = f"{name}/clip={clip}/momentum={momentum}/step {i}"
        assert_close(norm_t, norm_j, TOL["forward_fp32"], f"{tag}/global norm")
        assert_close(pt, pj, TOL["forward_fp32"], f"{tag}/params")
        assert int(st.count) == int(sj.count) == i + 1
        assert_close(st.mu, sj.mu, TOL["forward_fp32"], f"{tag}/mu")
        assert_close(st.nu, sj.nu, TOL["forward_fp32"], f"{tag}/nu")
    assert np.abs(to_numpy_tree(pt)["z"] - params["z"]).max() > 1e-3  # the parameters moved


def to_numpy_tree(tree):
    return map_tree(lambda a: a.cpu().numpy(), tree)


def test_ema_update(rng, device):
    ema, params = _tree(rng), _tree(rng)
    out_j = jax.jit(jo.ema_update, static_argnums=2)(to_jax(ema), to_jax(params), 0.99)
    out_t = to.ema_update(to_torch(ema, device), to_torch(params, device), 0.99)
    assert_close(out_t, out_j, TOL["forward_fp32"], "ema_update")


def test_leaf_order_matches_jax(rng):
    """Sums over leaves (the torch global norm) run in jax's order: sorted keys, depth first."""
    tree = {"b": {"y": 1, "x": 2}, "a": 3, "c": {"z": {"k": 4}}}
    assert leaves(tree) == jax.tree_util.tree_leaves(tree)
