"""Hand-written optimisers against a plain numpy reference, several steps (docs/design.md §7)."""

import jax.numpy as jnp
import numpy as np
import pytest

from maetok.config import TrainConfig, preset
from maetok.errors import ConfigError
from maetok.schedules import anneal_ratio, due, learning_rate, one_cycle, percep_scale, step_scalars
from maetok.tree import leaves
from maetok_jax.optim import clip_by_global_norm, ema_update, make_optimizer


def numpy_reference(params, grads_seq, t, lr):
    """Adam/AdamW/SGD written out element by element in float64."""
    p = {k: v.astype(np.float64) for k, v in params.items()}
    mu = {k: np.zeros_like(v) for k, v in p.items()}
    nu = {k: np.zeros_like(v) for k, v in p.items()}
    for step, grads in enumerate(grads_seq, start=1):
        g = {k: v.astype(np.float64) for k, v in grads.items()}
        if t.grad_clip > 0:
            norm = np.sqrt(sum((v**2).sum() for v in g.values()))
            scale = min(1.0, t.grad_clip / (norm + 1e-6))
            g = {k: v * scale for k, v in g.items()}
        for k in p:
            if t.optimizer in ("adam", "sgd"):
                g[k] = g[k] + t.weight_decay * p[k]
            if t.optimizer == "sgd":
                mu[k] = t.momentum * mu[k] + g[k]
                p[k] = p[k] - lr * mu[k]
                continue
            mu[k] = t.b1 * mu[k] + (1 - t.b1) * g[k]
            nu[k] = t.b2 * nu[k] + (1 - t.b2) * g[k] ** 2
            upd = (mu[k] / (1 - t.b1**step)) / (np.sqrt(nu[k] / (1 - t.b2**step)) + t.eps)
            if t.optimizer == "adamw":
                upd = upd + t.weight_decay * p[k]
            p[k] = p[k] - lr * upd
    return p


@pytest.mark.parametrize("name,clip", [("adam", 0.0), ("adamw", 0.5), ("sgd", 0.0), ("sgd", 0.5)])
def test_optimizer_matches_numpy(name, clip, rng):
    t = TrainConfig(optimizer=name, weight_decay=0.01, grad_clip=clip, momentum=0.8)
    params = {
        "a": rng.normal(size=(4, 3)).astype(np.float32),
        "b": rng.normal(size=(5,)).astype(np.float32),
    }
    grads_seq = [
        {k: rng.normal(size=v.shape).astype(np.float32) for k, v in params.items()}
        for _ in range(6)
    ]
    lr = 0.05
    p = {k: jnp.asarray(v) for k, v in params.items()}
    init, update = make_optimizer(t)
    state = init(p)
    for grads in grads_seq:
        g, _ = clip_by_global_norm({k: jnp.asarray(v) for k, v in grads.items()}, t.grad_clip)
        p, state = update(g, state, p, lr)
    ref = numpy_reference(params, grads_seq, t, lr)
    assert int(state.count) == 6
    for k in params:
        assert np.abs(ref[k] - params[k]).max() > 1e-3  # the parameters did move
        np.testing.assert_allclose(np.asarray(p[k]), ref[k], rtol=2e-5, atol=2e-6)


def test_clip_reports_the_norm_before_clipping(rng):
    g = {"x": jnp.asarray(rng.normal(size=(10,)).astype(np.float32) * 5)}
    clipped, norm = clip_by_global_norm(g, 1.0)
    np.testing.assert_allclose(float(norm), np.linalg.norm(np.asarray(g["x"])), rtol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(np.asarray(clipped["x"])), 1.0, rtol=1e-5)


def test_ema_update(rng):
    e, p = rng.normal(size=3).astype(np.float32), rng.normal(size=3).astype(np.float32)
    out = ema_update({"w": jnp.asarray(e)}, {"w": jnp.asarray(p)}, 0.9)
    np.testing.assert_allclose(np.asarray(out["w"]), 0.9 * e + 0.1 * p, rtol=1e-6)


@pytest.mark.parametrize("backend", ["jax", "torch"])
def test_ema_warmup_forgets_the_starting_weights(backend):
    """With the warm-up an EMA started at 0 follows weights held at 1 within 1e-6 after 100
    updates; a constant decay of 0.999 still holds 90 % of its start."""
    import dataclasses

    import torch

    from maetok.config import TrainConfig
    from maetok_jax import optim as jax_optim
    from maetok_torch import optim as torch_optim

    optim = jax_optim if backend == "jax" else torch_optim
    tensor = jnp.asarray if backend == "jax" else torch.as_tensor
    for warmup, want in ((True, 1.0), (False, 1 - 0.999**100)):
        t = dataclasses.replace(TrainConfig(), ema_decay=0.999, ema_warmup=warmup)
        ema, params = {"w": tensor(np.zeros(3, np.float32))}, {"w": tensor(np.ones(3, np.float32))}
        for step in range(100):
            ema = optim.ema_update(ema, params, optim.ema_decay_at(tensor(np.int32(step)), t))
        np.testing.assert_allclose(np.asarray(ema["w"]), want, rtol=1e-5, atol=1e-6)
    t = dataclasses.replace(TrainConfig(), ema_decay=0.999)
    assert float(optim.ema_decay_at(tensor(np.int32(0)), t)) == np.float32(0.1)
    assert float(optim.ema_decay_at(tensor(np.int32(10**6)), t)) == np.float32(0.999)


def test_learning_rate_schedule():
    t = TrainConfig(lr=1.0, warmup_steps=10, steps=110, lr_schedule="cosine", min_lr_ratio=0.1)
    assert learning_rate(0, t) == pytest.approx(0.1)
    assert learning_rate(9, t) == pytest.approx(1.0)
    assert learning_rate(60, t) == pytest.approx(0.1 + 0.9 * 0.5)
    assert learning_rate(110, t) == pytest.approx(0.1)
    flat = TrainConfig(lr=2.0, warmup_steps=0, lr_schedule="constant")
    assert learning_rate(500, flat) == 2.0


def test_perceptual_warmup_ramps_lambda1_in_stage1_only():
    cfg = preset("tiny", loss={"percep_warmup": 4})
    assert [percep_scale(s, cfg) for s in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    assert step_scalars(1, cfg)[3] == 0.5  # the step's fourth host-side scalar
    assert percep_scale(0, cfg.replace(train={"stage": 2})) == 1.0  # a trained decoder
    assert percep_scale(0, preset("tiny")) == 1.0  # no warm-up: λ1 in full from step 0
    with pytest.raises(ConfigError, match=r"loss\.percep_warmup must be >= 0"):
        preset("tiny", loss={"percep_warmup": -1})


@pytest.mark.parametrize("kind", ["linear", "cosine", "exponential"])
def test_anneal_schedules_go_from_start_to_zero(kind):
    t = TrainConfig(stage=2, anneal_start=0.6, anneal_steps=100, anneal_schedule=kind)
    values = [anneal_ratio(s, t) for s in range(0, 121)]
    assert values[0] == pytest.approx(0.6)
    assert values[100] == 0.0 and values[120] == 0.0
    assert all(a >= b for a, b in zip(values, values[1:]))  # never increases
    assert 0 < values[50] < 0.6


def test_nesterov_sgd_matches_numpy(rng):
    t = TrainConfig(optimizer="sgd", weight_decay=0.01, momentum=0.9)
    p0 = rng.normal(size=(6,)).astype(np.float32)
    grads_seq = [rng.normal(size=6).astype(np.float32) for _ in range(5)]
    init, nesterov = make_optimizer(t, nesterov=True)
    _, plain_update = make_optimizer(t)
    p, state = {"w": jnp.asarray(p0)}, init({"w": jnp.asarray(p0)})
    ref, mu = p0.astype(np.float64), np.zeros(6)
    for g in grads_seq:
        p, state = nesterov({"w": jnp.asarray(g)}, state, p, 0.1)
        g = g + 0.01 * ref
        mu = 0.9 * mu + g
        ref = ref - 0.1 * (g + 0.9 * mu)
    plain, _ = plain_update({"w": jnp.asarray(grads_seq[0])}, init(p), {"w": jnp.asarray(p0)}, 0.1)
    assert np.abs(ref - p0).max() > 1e-2
    np.testing.assert_allclose(np.asarray(p["w"]), ref, rtol=2e-5, atol=2e-6)
    # with a zero buffer the first Nesterov step is (1 + momentum)× the plain one
    first, _ = nesterov({"w": jnp.asarray(grads_seq[0])}, init(p), {"w": jnp.asarray(p0)}, 0.1)
    np.testing.assert_allclose(
        np.asarray(first["w"]) - p0, 1.9 * (np.asarray(plain["w"]) - p0), rtol=1e-5, atol=1e-7
    )


def test_one_cycle_rises_then_falls_to_zero():
    lrs = [one_cycle(s, 100, 0.4, 0.25) for s in range(100)]
    assert lrs[0] == pytest.approx(0.4 / 25) and max(lrs) == pytest.approx(0.4)
    assert int(np.argmax(lrs)) == 24 and lrs[-1] == pytest.approx(0.4 / 76)
    assert all(a < b for a, b in zip(lrs[:24], lrs[1:25]))
    assert all(a > b for a, b in zip(lrs[24:-1], lrs[25:]))


def test_due_marks_every_nth_step():
    assert [s for s in range(1, 13) if due(s, 4)] == [4, 8, 12]
    assert [s for s in range(0, 7) if due(s, 3)] == [0, 3, 6]  # from 0 when counting from 0
    assert all(due(s, 1) for s in range(5))


@pytest.mark.parametrize("name,clip,ema", [("adamw", 0.5, True), ("adam", 0.0, False)])
def test_fused_adam_update_gives_the_three_steps_numbers_bit_for_bit(name, clip, ema, rng):
    """torch: ``fused_adam_update`` (clip, Adam and EMA leaf by leaf, the ``parts`` compile
    scope's path) computes exactly what clip → update → EMA compute one after the other,
    over three steps, for leaves of every rank."""
    import torch

    from maetok_torch import optim as to

    t = TrainConfig(optimizer=name, grad_clip=clip, weight_decay=0.1, lr=1e-2)

    def rand(shape):
        return torch.as_tensor(rng.standard_normal(shape).astype(np.float32))

    params = {"a": rand((3, 4, 5)), "b": {"w": rand((7,)), "v": rand((2, 6))}}
    init, update = to.make_optimizer(t)
    lr, decay = torch.tensor(1e-2), torch.tensor(0.9)
    ema = to.map_tree(torch.clone, params) if ema else None
    ref = fused = (params, init(params), ema)
    for _ in range(3):
        grads = to.map_tree(lambda p: rand(tuple(p.shape)), params)
        p, state, e = ref
        clipped, norm = to.clip_by_global_norm(grads, clip)
        p, state = update(clipped, state, p, lr)
        ref = (p, state, None if e is None else to.ema_update(e, p, decay))
        p, state, e = fused
        p, state, e, fused_norm = to.fused_adam_update(grads, state, p, lr, e, decay, t)
        fused = (p, state, e)
        assert torch.equal(norm, fused_norm)

    def tensors(run):
        p, state, e = run
        return leaves(p) + leaves(state.mu) + leaves(state.nu) + (leaves(e) if e else [])

    assert len(tensors(fused)) == len(tensors(ref)) == (12 if ema else 9)
    assert all(torch.equal(a, b) for a, b in zip(tensors(ref), tensors(fused)))
    assert int(fused[1].count) == int(ref[1].count) == 3 and (fused[2] is None) == (not ema)
