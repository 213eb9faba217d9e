"""Hand-written optimisers over parameter trees (docs/design.md §7): Adam/AdamW, SGD, clipping, EMA.

Mirrors ``maetok_jax/optim.py`` (no ``torch.optim``). ``make_optimizer(t_cfg)`` binds the
hyper-parameters once and returns the pair ``init(params) -> OptState`` and
``update(grads, state, params, lr) -> (params, state)``, with the one operation order
shared with the JAX backend, written out term by term in the same association so both
round alike:

    g ← g + wd·p                             (adam, sgd: L2 through the gradient)
    mu ← b1·mu + (1 − b1)·g                  nu ← b2·nu + (1 − b2)·g·g
    mu_hat ← mu / (1 − b1^t)                 nu_hat ← nu / (1 − b2^t)
    p ← p − lr·(mu_hat / (sqrt(nu_hat) + eps) + wd·p)      (wd term: adamw only)
    sgd: mu ← momentum·mu + g;  p ← p − lr·mu   (nesterov: p ← p − lr·(g + momentum·mu))

``t`` counts updates from 1. ``lr`` may be a float or a 0-d float32 tensor on the device,
so a host-side schedule changes it without a recompile under ``torch.compile``. Updates
are pure: new tensors are returned and the inputs are left as they were. Call them under
``torch.no_grad()`` (the train step does). ``fused_adam_update`` is torch's alone: clipping,
the update and the EMA leaf by leaf through one function, for ``torch.compile``'s "parts"
scope; under ``jax.jit`` XLA fuses the JAX update by itself.
"""

import functools
from typing import NamedTuple

import torch

from maetok.numerics import CLIP_EPS, EMA_WARMUP
from maetok.tree import leaves, map_tree


class OptState(NamedTuple):
    count: torch.Tensor  # int32 scalar, number of updates applied
    mu: dict  # first moment (adam) or momentum buffer (sgd)
    nu: dict  # second moment (adam); empty for sgd


def make_optimizer(t_cfg, nesterov: bool = False):
    """The optimiser ``t_cfg.optimizer`` names, its hyper-parameters bound once: ``(init, update)``.

    ``init(params) -> OptState`` (zero moments over exactly the leaves of ``params``, on
    their device); ``update(grads, state, params, lr) -> (params, state)``, gradients
    already clipped (``clip_by_global_norm``). ``nesterov`` switches SGD to Nesterov momentum.
    """
    sgd = t_cfg.optimizer == "sgd"

    def init(params) -> OptState:
        nu = {} if sgd else map_tree(torch.zeros_like, params)
        device = leaves(params)[0].device if leaves(params) else None
        count = torch.zeros((), dtype=torch.int32, device=device)
        return OptState(count, map_tree(torch.zeros_like, params), nu)

    def update(grads, state: OptState, params, lr):
        if sgd:
            return _sgd_update(grads, state, params, lr, t_cfg, nesterov)
        return _adam_update(grads, state, params, lr, t_cfg)

    return init, update


def global_norm(grads):
    return torch.sqrt(sum(torch.sum(torch.square(g.to(torch.float32))) for g in leaves(grads)))


def clip_scale(norm, max_norm: float):
    """``min(1, max_norm / (‖g‖ + CLIP_EPS))``, the factor ``clip_by_global_norm`` applies."""
    return torch.clamp(max_norm / (norm + CLIP_EPS), max=1.0)


def clip_by_global_norm(grads, max_norm: float):
    """Scale ``grads`` by ``min(1, max_norm / (‖g‖ + CLIP_EPS))``; returns (grads, ‖g‖ before)."""
    norm = global_norm(grads)
    if max_norm <= 0:
        return grads, norm
    scale = clip_scale(norm, max_norm)
    return map_tree(lambda g: g * scale, grads), norm


def adam_corrections(count, t_cfg):
    """The bias corrections ``(1 − b1^t, 1 − b2^t)`` after ``count`` updates (0-d tensors)."""
    t = count.to(torch.float32)
    return 1 - t_cfg.b1**t, 1 - t_cfg.b2**t


def adam_leaf(p, g, m, v, lr, c1, c2, t_cfg):
    """One leaf's Adam/AdamW update → (p, m, v), in the module docstring's order."""
    b1, b2, eps, wd = t_cfg.b1, t_cfg.b2, t_cfg.eps, t_cfg.weight_decay
    decoupled = t_cfg.optimizer == "adamw"
    if not decoupled and wd:
        g = g + wd * p
    m = b1 * m + (1 - b1) * g
    v = b2 * v + (1 - b2) * g * g
    upd = (m / c1) / (torch.sqrt(v / c2) + eps)
    if decoupled and wd:
        upd = upd + wd * p
    return p - lr * upd, m, v


def _unzip(tree, n: int) -> list:
    """A tree of n-tuples → n trees."""
    return [map_tree(lambda leaf, i=i: leaf[i], tree) for i in range(n)]


def _adam_update(grads, state: OptState, params, lr, t_cfg):
    count = state.count + 1
    c1, c2 = adam_corrections(count, t_cfg)
    step = lambda p, g, m, v: adam_leaf(p, g, m, v, lr, c1, c2, t_cfg)
    new_params, mu, nu = _unzip(map_tree(step, params, grads, state.mu, state.nu), 3)
    return new_params, OptState(count, mu, nu)


def _sgd_update(grads, state: OptState, params, lr, t_cfg, nesterov: bool = False):
    wd, momentum = t_cfg.weight_decay, t_cfg.momentum
    if wd:
        grads = map_tree(lambda g, p: g + wd * p, grads, params)
    mu = map_tree(lambda m, g: momentum * m + g, state.mu, grads) if momentum else grads
    # Nesterov steps along g + momentum·mu, the momentum buffer one step ahead
    step = map_tree(lambda g, m: g + momentum * m, grads, mu) if nesterov and momentum else mu
    new_params = map_tree(lambda p, s: p - lr * s, params, step)
    return new_params, OptState(state.count + 1, mu if momentum else state.mu, state.nu)


def ema_decay_at(step, t_cfg):
    """The EMA decay after ``step`` updates: ``train.ema_decay``, or with ``train.ema_warmup``
    ``min(ema_decay, (1 + step)/(EMA_WARMUP + step))`` in float32."""
    if not t_cfg.ema_warmup:
        return t_cfg.ema_decay
    s = torch.as_tensor(step).to(torch.float32)
    # made on the device: a tensor from host data would be a host→device copy, which waits
    # for the device to finish everything queued (the step's forward and backward)
    decay = torch.full((), t_cfg.ema_decay, dtype=torch.float32, device=s.device)
    return torch.minimum(decay, (1.0 + s) / (EMA_WARMUP + s))


def ema_leaf(e, p, decay):
    """One leaf of ``ema_update``."""
    return decay * e + (1 - decay) * p


def ema_update(ema, params, decay: float):
    """``ema ← decay·ema + (1 − decay)·params``."""
    return map_tree(lambda e, p: ema_leaf(e, p, decay), ema, params)


def fused_adam_leaf(p, g, m, v, e, scale, lr, c1, c2, decay, t_cfg):
    """Clip scale, Adam/AdamW and EMA (``e`` None: none) of one leaf → (p, m, v, e): what
    ``clip_by_global_norm``, the Adam update and ``ema_update`` compute for it, as one
    function. Compiled once with dynamic shapes (scope "parts"), one kernel serves every
    leaf, reading each tensor once."""
    p, m, v = adam_leaf(p, g * scale, m, v, lr, c1, c2, t_cfg)
    return p, m, v, None if e is None else ema_leaf(e, p, decay)


def fused_adam_update(grads, state: OptState, params, lr, ema, decay, t_cfg, leaf=None):
    """Clipping, the Adam/AdamW update and the EMA (``ema`` None: none) leaf by leaf through
    ``leaf`` (``fused_adam_leaf`` with ``t_cfg`` bound, or its compiled form), each leaf
    flattened → (params, state, ema, ‖g‖ before clipping). The same numbers as
    ``clip_by_global_norm``, ``make_optimizer``'s update and ``ema_update`` one after the other."""
    leaf = leaf or functools.partial(fused_adam_leaf, t_cfg=t_cfg)
    norm = global_norm(grads)
    if t_cfg.grad_clip > 0:
        scale = clip_scale(norm, t_cfg.grad_clip)
    else:  # g · 1 is g exactly
        scale = torch.ones((), dtype=torch.float32, device=norm.device)
    count = state.count + 1
    c1, c2 = adam_corrections(count, t_cfg)

    def run(p, g, m, v, e):
        # 1-D and detached (no view base), so a dynamic-shape compile of ``leaf`` guards on
        # nothing of the leaf's rank or strides: one graph serves every leaf
        flat = [None if a is None else a.reshape(-1).detach() for a in (p, g, m, v, e)]
        out = leaf(*flat, scale, lr, c1, c2, decay)
        return tuple(None if a is None else a.reshape(p.shape) for a in out)

    emas = ema if ema is not None else map_tree(lambda _: None, params)
    new_params, mu, nu, new_ema = _unzip(map_tree(run, params, grads, state.mu, state.nu, emas), 4)
    return new_params, OptState(count, mu, nu), None if ema is None else new_ema, norm
