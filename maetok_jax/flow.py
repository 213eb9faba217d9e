"""Flow matching on the linear interpolant, and ODE sampling with classifier-free guidance.

Convention, used everywhere in the project's diffusion code: **t = 0 is noise, t = 1 is
data**,

    x_t = (1 − t)·ε + t·x,     ε ~ N(0, I),     target velocity  dx_t/dt = x − ε,

so sampling integrates ``dx/dt = v(x, t)`` forward from t = 0 (pure noise) to t = 1. (The
paper's SiT convention runs the other way: its t is 1 − ours and its velocity −ours.)

The velocity of this interpolant is finite at both ends (at t = 1 the best prediction is
E[x − ε | x_1] = x_1, since ε is independent of the data), so Heun applies its corrector
on every step, the last included; there is no singular endpoint to step around as there
is for σ → 0 in EDM-style samplers.
"""

import jax
import jax.numpy as jnp

from maetok_jax.dit import dit


def interpolate(x, noise, t):
    """x_t = (1 − t)·noise + t·x for x, noise (B, L, h) and t (B,)."""
    tt = t[:, None, None]
    return (1.0 - tt) * noise + tt * x


def sample_time(key, batch: int, cfg):
    """t (B,) in (0, 1): uniform, or sigmoid of N(logit_mean, logit_std²) (logit-normal)."""
    if cfg.time_sampling == "uniform":
        return jax.random.uniform(key, (batch,))
    return jax.nn.sigmoid(cfg.logit_mean + cfg.logit_std * jax.random.normal(key, (batch,)))


def flow_loss(params, x, y, key, cfg):
    """Mean squared velocity error on latents x (B, L, h), labels y (B,); a float32 scalar.

    Each label is replaced by the null class ``num_classes`` with probability
    ``label_dropout`` so one network learns the conditional and the unconditional flow.
    """
    b = x.shape[0]
    k_time, k_noise, k_drop = jax.random.split(key, 3)
    t = sample_time(k_time, b, cfg)
    noise = jax.random.normal(k_noise, x.shape, jnp.float32)
    drop = jax.random.bernoulli(k_drop, cfg.label_dropout, (b,))
    y = jnp.where(drop, cfg.num_classes, y)
    v = dit(params, interpolate(x, noise, t), t, y, cfg)  # (B, L, h)
    return jnp.mean(jnp.square(v - (x - noise)))


def guided_velocity(params, x, t, y, cfg, guidance: float):
    """v_null + g·(v_cond − v_null), both halves in one batched forward; g = 1: v_cond alone."""
    if guidance == 1.0:
        return dit(params, x, t, y, cfg)
    null = jnp.full_like(y, cfg.num_classes)
    v = dit(
        params, jnp.concatenate([x, x]), jnp.concatenate([t, t]), jnp.concatenate([y, null]), cfg
    )  # (2B, L, h)
    v_cond, v_null = jnp.split(v, 2)
    return v_null + guidance * (v_cond - v_null)


def integrate(velocity, x0, num_steps: int, sampler: str = "heun"):
    """Solve dx/dt = velocity(x, t (B,)) from t = 0 to 1 on ``num_steps`` equal steps.

    ``euler``: x ← x + Δt·v(x, t). ``heun``: a predictor x̃ = x + Δt·v(x, t), then
    x ← x + Δt·½(v(x, t) + v(x̃, t + Δt)) — two evaluations per step, second order.
    """
    dt = 1.0 / num_steps
    b = x0.shape[0]

    def step(i, x):
        t = jnp.full((b,), i * dt, jnp.float32)
        v = velocity(x, t)
        if sampler == "euler":
            return x + dt * v
        v_next = velocity(x + dt * v, t + dt)
        return x + dt * 0.5 * (v + v_next)

    return jax.lax.fori_loop(0, num_steps, step, x0)


def _sample(params, key, labels, cfg, sampler, num_steps, guidance):
    x0 = jax.random.normal(key, (labels.shape[0], cfg.num_tokens, cfg.token_dim), jnp.float32)
    velocity = lambda x, t: guided_velocity(params, x, t, labels, cfg, guidance)
    return integrate(velocity, x0, num_steps, sampler)


_compiled_sample = jax.jit(_sample, static_argnames=("cfg", "sampler", "num_steps", "guidance"))


def sample(
    params, key, labels, cfg, sampler: str = "heun", num_steps: int = 50, guidance: float = 1.0
):
    """Normalised latents (B, L, h) for ``labels`` (B,), from noise drawn with ``key``.

    Compiled once per (cfg, sampler, num_steps, guidance, B). A label equal to
    ``num_classes`` samples the unconditional model.
    """
    return _compiled_sample(
        params, key, jnp.asarray(labels, jnp.int32), cfg, sampler, int(num_steps), float(guidance)
    )
