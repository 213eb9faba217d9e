"""Latent diffusion: config, DiT, flow matching, samplers, exact resume, and the commands."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from maetok import checkpoint as ckpt
from maetok.diffusion_config import DiffusionConfig, preset
from maetok.errors import ConfigError
from maetok.params import init_dit
from maetok.schedules import learning_rate
from maetok.tree import map_tree
from maetok_jax import diffusion_train as dtrain
from maetok_jax.dit import condition, dit, dit_block
from maetok_jax.flow import guided_velocity, integrate, sample

# Every toy problem uses this one config (a shorter sequence than the tiny preset) and the
# same data shapes, so the train step compiles once per test run.
TOY = dict(num_tokens=4, token_dim=4, batch_size=32, lr=2e-3, ema_decay=0.9)


def _random_params(cfg, rng, scale=0.1):
    """DiT parameters with every leaf random (the zero-initialised ones would hide bugs)."""
    return map_tree(
        lambda a: jnp.asarray(a + scale * rng.standard_normal(a.shape), jnp.float32),
        init_dit(cfg, 0),
    )


# ---------------------------------------------------------------------------------- config


@pytest.mark.parametrize("name", ["tiny", "small"])
def test_presets_round_trip_through_json(name):
    cfg = preset(name)
    again = DiffusionConfig.from_json(cfg.to_json())
    assert again == cfg and hash(again) == hash(cfg)


@pytest.mark.parametrize(
    "changes,needle",
    [
        ({"heads": 5}, "diffusion.heads 5 does not divide"),
        ({"b2": 1.0}, "diffusion.b2"),
        ({"label_dropout": -0.1}, "diffusion.label_dropout"),
        ({"time_sampling": "cosine"}, "diffusion.time_sampling"),
        ({"sampler": "rk4"}, "diffusion.sampler"),
        ({"steps": 1.5}, "diffusion.steps must be an integer"),
        ({"widht": 64}, "unknown diffusion option(s) ['widht']"),
    ],
)
def test_bad_values_name_the_field(changes, needle):
    with pytest.raises(ConfigError) as e:
        preset("tiny").replace(**changes)
    assert needle in str(e.value)


def test_blocks_start_as_identity_and_velocity_at_zero(rng):
    cfg = preset("tiny")
    params = map_tree(jnp.asarray, init_dit(cfg, 3))
    x = jnp.asarray(rng.standard_normal((3, cfg.num_tokens, cfg.token_dim)), jnp.float32)
    z = jnp.asarray(rng.standard_normal((3, cfg.num_tokens, cfg.width)), jnp.float32)
    t, y = jnp.asarray(rng.uniform(size=3), jnp.float32), jnp.array([0, 4, cfg.num_classes])

    def outputs(params, x, z, t, y):  # (velocity, first block applied to z)
        block = jax.tree_util.tree_map(lambda a: a[0], params["blocks"])
        return dit(params, x, t, y, cfg), dit_block(block, z, condition(params, t, y, cfg), cfg)

    v, z_out = jax.jit(outputs)(params, x, z, t, y)
    assert float(jnp.abs(v).max()) == 0.0  # zero head: v = 0
    np.testing.assert_array_equal(z_out, z)
    assert float(jnp.abs(condition(params, t, y, cfg)).max()) > 0  # gates see a real signal


# ----------------------------------------------------------------------------- the sampler


def _gaussian_velocity(mu, sigma):
    """Exact velocity of x_t = (1 − t)·ε + t·x for x ~ N(μ, σ²) per element."""

    def velocity(x, t):
        t = t[:, None, None]
        s2 = (1 - t) ** 2 + (t * sigma) ** 2
        return mu + (t * sigma**2 - (1 - t)) / s2 * (x - t * mu)

    return velocity


def test_samplers_integrate_a_known_flow(rng):
    mu, sigma = 1.5, 0.4
    x0 = jnp.asarray(rng.standard_normal((4000, 2, 2)), jnp.float32)
    exact = mu + sigma * x0  # the flow maps noise z to μ + σ·z
    errors = {}
    for sampler in ("euler", "heun"):
        x1 = integrate(_gaussian_velocity(mu, sigma), x0, 20, sampler)
        errors[sampler] = float(jnp.abs(x1 - exact).max())
    # Heun lands on N(μ, σ²) up to the sampling error of 16000 values; Euler (20 steps) does not
    assert abs(float(x1.mean()) - mu) < 0.01 and abs(float(x1.std()) - sigma) < 0.01
    assert errors["heun"] < 5e-3 and errors["heun"] < errors["euler"] / 20, errors


def test_guidance_one_is_the_conditional_model(rng):
    cfg = preset("tiny", **TOY)
    params = _random_params(cfg, rng)
    x = jnp.asarray(rng.standard_normal((5, 4, 4)), jnp.float32)
    t, y = jnp.asarray(rng.uniform(size=5), jnp.float32), jnp.asarray(rng.integers(0, 10, 5))
    v_cond = dit(params, x, t, y, cfg)
    v_null = dit(params, x, t, jnp.full_like(y, cfg.num_classes), cfg)
    assert float(jnp.abs(v_cond - v_null).max()) > 1e-3  # the label matters
    np.testing.assert_array_equal(guided_velocity(params, x, t, y, cfg, 1.0), v_cond)
    np.testing.assert_allclose(
        guided_velocity(params, x, t, y, cfg, 2.5),
        v_null + 2.5 * (v_cond - v_null),
        rtol=1e-5,
        atol=1e-5,
    )
    # sample() draws its noise from the key and integrates the conditional velocity at g = 1
    key = jax.random.key(7)
    got = sample(params, key, y, cfg, "euler", 4, guidance=1.0)
    x0 = jax.random.normal(key, (5, 4, 4), jnp.float32)
    want = integrate(lambda z, s: dit(params, z, s, y, cfg), x0, 4, "euler")
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------- training


def _toy_data(rng, n_per_class=16):
    """Two well-separated Gaussian modes per class: latents (N, 4, 4), labels (N,), modes."""
    modes = rng.standard_normal((10, 2, 4, 4)).astype(np.float32)
    labels = np.repeat(np.arange(10), n_per_class).astype(np.int32)
    which = rng.integers(0, 2, len(labels))
    latents = modes[labels, which] + 0.1 * rng.standard_normal((len(labels), 4, 4))
    return latents.astype(np.float32), labels, modes


def test_loss_falls_and_samples_find_their_class(rng):
    cfg = preset("tiny", **TOY, steps=300)
    latents, labels, modes = _toy_data(rng)
    state, step = dtrain.init_state(cfg), dtrain.make_train_step(cfg)
    losses = []
    for s in range(cfg.steps):
        state, metrics = step(state, latents, labels, np.float32(learning_rate(s, cfg)))
        losses.append(metrics["loss"])
    losses = np.asarray(jax.device_get(losses))
    assert losses[-50:].mean() < 0.6 * losses[:20].mean(), (losses[:20].mean(), losses[-50:].mean())
    y = np.repeat(np.arange(10), 8).astype(np.int32)
    x = np.asarray(sample(state["ema"], jax.random.key(1), y, cfg, "heun", 12, 1.0))
    dist = ((x[:, None, None] - modes[None]) ** 2).mean((-1, -2)).reshape(len(x), -1)
    assert (dist.argmin(1) // 2 == y).mean() > 0.8  # nearest of the 20 modes has the right class


def test_ema_follows_its_formula(rng):
    cfg = preset("tiny", **TOY)
    latents, labels, _ = _toy_data(rng)
    state = dtrain.init_state(cfg)
    before = jax.device_get(state["params"])
    state, _ = dtrain.make_train_step(cfg)(state, latents, labels, np.float32(1e-2))
    after, ema = jax.device_get(state["params"]), jax.device_get(state["ema"])
    moved = jax.tree_util.tree_map(lambda a, b: float(np.abs(a - b).max()), after, before)
    assert max(jax.tree_util.tree_leaves(moved)) > 1e-3
    want = jax.tree_util.tree_map(lambda b, a: 0.9 * b + 0.1 * a, before, after)
    jax.tree_util.tree_map(
        lambda w, g: np.testing.assert_allclose(g, w, rtol=1e-6, atol=1e-7), want, ema
    )


def test_resume_is_bit_exact(tmp_path, rng):
    cfg = preset("tiny", **TOY, steps=6, log_every=1, ckpt_every=3)
    latents, labels, _ = _toy_data(rng)
    norm = dtrain.latent_norm(latents)
    meta = {"tokenizer": "tok.safetensors", "tokenizer_sha256": "0" * 64, "tokenizer_ema": False}
    dtrain.fit(cfg, latents, labels, norm, tmp_path / "straight", meta, progress=False)
    dtrain.fit(cfg, latents, labels, norm, tmp_path / "split", meta, stop_at=3, progress=False)
    mid, _, mid_meta = ckpt.load_diffusion(tmp_path / "split" / dtrain.CHECKPOINT_NAME)
    assert mid_meta["step"] == 3 and int(mid["step"]) == 3
    dtrain.fit(cfg, latents, labels, norm, tmp_path / "split", meta, resume=True, progress=False)
    a, cfg_a, meta_a = ckpt.load_diffusion(
        tmp_path / "straight" / dtrain.CHECKPOINT_NAME, dtrain.expected_layout
    )
    b, _, meta_b = ckpt.load_diffusion(tmp_path / "split" / dtrain.CHECKPOINT_NAME)
    assert cfg_a == cfg and meta_a == meta_b == {**meta, "step": 6}
    flat_a, flat_b = ckpt.flatten(a), ckpt.flatten(b)
    assert sorted(flat_a) == sorted(flat_b) and "opt/nu/head/w" in flat_a
    for key in flat_a:
        assert flat_a[key].tobytes() == flat_b[key].tobytes(), key
    assert not np.array_equal(flat_a["params/head/w"], flat_a["ema/head/w"])

    def losses(run):
        lines = (tmp_path / run / "metrics.jsonl").read_text().splitlines()
        return [(r["step"], r["loss"]) for r in map(json.loads, lines)]

    assert losses("straight") == losses("split") and len(losses("straight")) == 6


def test_checkpoints_are_written_on_the_saver_thread(tmp_path, rng, monkeypatch):
    import threading

    cfg = preset("tiny", **TOY, steps=4, log_every=1, ckpt_every=2)
    latents, labels, _ = _toy_data(rng)
    threads, write = [], ckpt.save_diffusion

    def recorded(*args):
        threads.append(threading.current_thread().name)
        return write(*args)

    monkeypatch.setattr(ckpt, "save_diffusion", recorded)
    meta = {"tokenizer": "tok.safetensors", "tokenizer_sha256": "0" * 64, "tokenizer_ema": False}
    norm = dtrain.latent_norm(latents)
    dtrain.fit(cfg, latents, labels, norm, tmp_path, meta, progress=False)
    assert len(threads) == 2 and all(t.startswith("maetok-save") for t in threads)
    _, _, saved = ckpt.load_diffusion(tmp_path / dtrain.CHECKPOINT_NAME)
    assert saved["step"] == 4  # the last write is on disk when fit returns
