"""Learning-rate and mask-ratio schedules and loop cadences (docs/design.md §6–7), as plain
functions of the step.

They are written with ``math`` only and evaluated on the host, so both backends see the
same numbers: the learning rate enters each train step as an argument.
"""

from __future__ import annotations

import math

from maetok.config import TrainConfig


def due(step: int, every: int) -> bool:
    """Whether a cadence of ``every`` steps falls on ``step`` (a multiple of ``every``).

    The one test of the training loops' cadences (metrics, checkpoints, sample pictures,
    statistics); loops that act after a step pass the number of steps done, ``step + 1``.
    """
    return step % every == 0


def learning_rate(step: int, t: TrainConfig, base_lr: float | None = None) -> float:
    """Linear warm-up to ``lr`` in ``warmup_steps``, then cosine to ``min_lr_ratio·lr`` or flat."""
    lr = t.lr if base_lr is None else base_lr
    if t.warmup_steps and step < t.warmup_steps:
        return lr * (step + 1) / t.warmup_steps
    if t.lr_schedule == "constant":
        return lr
    decay_steps = max(1, t.steps - t.warmup_steps)
    progress = min(1.0, (step - t.warmup_steps) / decay_steps)
    floor = t.min_lr_ratio * lr
    return floor + (lr - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def percep_scale(step: int, cfg) -> float:
    """The share of λ1 at train step ``step``: in Stage 1 a linear ramp (step + 1)/W over the
    first W = ``loss.percep_warmup`` steps, else 1 (Stage 2 starts from a trained decoder)."""
    w = cfg.loss.percep_warmup
    if cfg.train.stage == 1 and w and step < w:
        return (step + 1) / w
    return 1.0


def step_scalars(step: int, cfg) -> tuple[float, float, float, float]:
    """The host-side scalars of train step ``step``: ``(lr, disc_lr, adv_on, percep_scale)``,
    ``adv_on`` 1.0 once the adversarial loss is on (``loss.use_adv`` and
    ``step ≥ loss.disc_start``)."""
    lr = learning_rate(step, cfg.train)
    disc_lr = learning_rate(step, cfg.train, cfg.train.disc_lr)
    adv_on = float(cfg.loss.use_adv and step >= cfg.loss.disc_start)
    return lr, disc_lr, adv_on, percep_scale(step, cfg)


def anneal_ratio(step: int, t: TrainConfig) -> float:
    """Stage-2 mask ratio: from ``anneal_start`` at step 0 down to 0 at ``anneal_steps``.

    linear:      r0·(1 − s)
    cosine:      r0·½(1 + cos πs)          (a half cosine, so it ends at 0 and never goes below)
    exponential: r0·exp(−5s), and exactly 0 from ``anneal_steps`` on
    with s = step / anneal_steps clipped to [0, 1].
    """
    r0 = t.anneal_start
    if t.anneal_steps == 0:
        return 0.0
    s = min(1.0, max(0.0, step / t.anneal_steps))
    if s >= 1.0:
        return 0.0
    if t.anneal_schedule == "linear":
        return r0 * (1.0 - s)
    if t.anneal_schedule == "cosine":
        return r0 * 0.5 * (1.0 + math.cos(math.pi * s))
    return r0 * math.exp(-5.0 * s)


def one_cycle(step: int, total_steps: int, peak: float, warmup_fraction: float) -> float:
    """Piecewise linear: up to ``peak`` over the first ``warmup_fraction`` of the steps, then
    down towards 0 at ``total_steps`` (the one-cycle policy of fast image classifiers)."""
    warm = max(1, round(warmup_fraction * total_steps))
    if step < warm:
        return peak * (step + 1) / warm
    return peak * max(0, total_steps - step) / (total_steps - warm + 1)
