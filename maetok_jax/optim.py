"""Hand-written optimisers over parameter trees (docs/design.md §7): Adam/AdamW, SGD, clipping, EMA.

``make_optimizer(t_cfg)`` binds the hyper-parameters once and returns the pair
``init(params) -> OptState`` and ``update(grads, state, params, lr) -> (params, state)``,
with one operation order shared with the torch backend:

    g ← g + wd·p                             (adam, sgd: L2 through the gradient)
    mu ← b1·mu + (1 − b1)·g                  nu ← b2·nu + (1 − b2)·g²
    mu_hat ← mu / (1 − b1^t)                 nu_hat ← nu / (1 − b2^t)
    p ← p − lr·(mu_hat / (sqrt(nu_hat) + eps) + wd·p)      (wd term: adamw only)
    sgd: mu ← momentum·mu + g;  p ← p − lr·mu   (nesterov: p ← p − lr·(g + momentum·mu))

``t`` counts updates from 1. The learning rate is an argument so a schedule evaluated on
the host changes it without recompiling.
"""

from typing import NamedTuple

import jax
import jax.numpy as jnp

from maetok.numerics import CLIP_EPS, EMA_WARMUP

tree_map = jax.tree_util.tree_map


class OptState(NamedTuple):
    count: jnp.ndarray  # int32 scalar, number of updates applied
    mu: dict  # first moment (adam) or momentum buffer (sgd)
    nu: dict  # second moment (adam); empty for sgd


def make_optimizer(t_cfg, nesterov: bool = False):
    """The optimiser ``t_cfg.optimizer`` names, its hyper-parameters bound once: ``(init, update)``.

    ``init(params) -> OptState`` (zero moments over exactly the leaves of ``params``);
    ``update(grads, state, params, lr) -> (params, state)``, gradients already clipped
    (``clip_by_global_norm``). ``nesterov`` switches SGD to Nesterov momentum.
    """
    sgd = t_cfg.optimizer == "sgd"

    def init(params) -> OptState:
        nu = {} if sgd else tree_map(jnp.zeros_like, params)
        return OptState(jnp.zeros((), jnp.int32), tree_map(jnp.zeros_like, params), nu)

    def update(grads, state: OptState, params, lr):
        if sgd:
            return _sgd_update(grads, state, params, lr, t_cfg, nesterov)
        return _adam_update(grads, state, params, lr, t_cfg)

    return init, update


def global_norm(grads):
    leaves = jax.tree_util.tree_leaves(grads)
    return jnp.sqrt(sum(jnp.sum(jnp.square(g.astype(jnp.float32))) for g in leaves))


def clip_scale(norm, max_norm: float):
    """``min(1, max_norm / (‖g‖ + CLIP_EPS))``, the factor ``clip_by_global_norm`` applies."""
    return jnp.minimum(1.0, max_norm / (norm + CLIP_EPS))


def clip_by_global_norm(grads, max_norm: float):
    """Scale ``grads`` by ``min(1, max_norm / (‖g‖ + CLIP_EPS))``; returns (grads, ‖g‖ before)."""
    norm = global_norm(grads)
    if max_norm <= 0:
        return grads, norm
    scale = clip_scale(norm, max_norm)
    return tree_map(lambda g: g * scale, grads), norm


def adam_corrections(count, t_cfg):
    """The bias corrections ``(1 − b1^t, 1 − b2^t)`` after ``count`` updates (0-d arrays)."""
    t = count.astype(jnp.float32)
    return 1 - t_cfg.b1**t, 1 - t_cfg.b2**t


def adam_leaf(p, g, m, v, lr, c1, c2, t_cfg):
    """One leaf's Adam/AdamW update → (p, m, v), in the module docstring's order."""
    b1, b2, eps, wd = t_cfg.b1, t_cfg.b2, t_cfg.eps, t_cfg.weight_decay
    decoupled = t_cfg.optimizer == "adamw"
    if not decoupled and wd:
        g = g + wd * p
    m = b1 * m + (1 - b1) * g
    v = b2 * v + (1 - b2) * g * g
    upd = (m / c1) / (jnp.sqrt(v / c2) + eps)
    if decoupled and wd:
        upd = upd + wd * p
    return p - lr * upd, m, v


def _adam_update(grads, state: OptState, params, lr, t_cfg):
    count = state.count + 1
    c1, c2 = adam_corrections(count, t_cfg)
    flat, tree = jax.tree_util.tree_flatten(params)
    rest = (jax.tree_util.tree_leaves(x) for x in (grads, state.mu, state.nu))
    out = [adam_leaf(p, g, m, v, lr, c1, c2, t_cfg) for p, g, m, v in zip(flat, *rest)]
    new_params, mu, nu = (tree.unflatten([o[i] for o in out]) for i in range(3))
    return new_params, OptState(count, mu, nu)


def _sgd_update(grads, state: OptState, params, lr, t_cfg, nesterov: bool = False):
    wd, momentum = t_cfg.weight_decay, t_cfg.momentum
    if wd:
        grads = tree_map(lambda g, p: g + wd * p, grads, params)
    mu = tree_map(lambda m, g: momentum * m + g, state.mu, grads) if momentum else grads
    # Nesterov steps along g + momentum·mu, the momentum buffer one step ahead
    step = tree_map(lambda g, m: g + momentum * m, grads, mu) if nesterov and momentum else mu
    new_params = tree_map(lambda p, s: p - lr * s, params, step)
    return new_params, OptState(state.count + 1, mu if momentum else state.mu, state.nu)


def ema_decay_at(step, t_cfg):
    """The EMA decay after ``step`` updates: ``train.ema_decay``, or with ``train.ema_warmup``
    ``min(ema_decay, (1 + step)/(EMA_WARMUP + step))`` in float32."""
    if not t_cfg.ema_warmup:
        return t_cfg.ema_decay
    s = jnp.asarray(step, jnp.float32)
    return jnp.minimum(jnp.float32(t_cfg.ema_decay), (1.0 + s) / (EMA_WARMUP + s))


def ema_leaf(e, p, decay):
    """One leaf of ``ema_update``."""
    return decay * e + (1 - decay) * p


def ema_update(ema, params, decay: float):
    """``ema ← decay·ema + (1 − decay)·params``."""
    return tree_map(lambda e, p: ema_leaf(e, p, decay), ema, params)
