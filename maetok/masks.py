"""Token masks as a pure function of (seed, step, batch shape, r) (docs/design.md §6).

Masks are drawn on the host with numpy, in the data pipeline, so the JAX and torch
backends see the same mask at the same step and a resumed run sees the masks it would
have seen. ``1`` marks a masked token, whose embedding the encoder replaces by the mask
token.
"""

from __future__ import annotations

import math

import numpy as np

from maetok.config import TrainConfig
from maetok.schedules import anneal_ratio

# Stream tags keep the generators of one step independent of each other.
STREAM_DATA, STREAM_AUGMENT, STREAM_MASK = 0, 1, 2
MASK_SUBSTREAM = 0x4D41524C  # "MARL": tags the seeds of ``substream_seed``


def step_rng(seed: int, step: int, stream: int) -> np.random.Generator:
    return np.random.default_rng([seed, step, stream])


def mask_ratio(step: int, t: TrainConfig, seed: int | None = None, stage_step: int | None = None):
    """The mask ratio r of a step: the one mask schedule of the trainer and the Marble plugin.

    Stage 1: r ~ U[mask_min, mask_max] drawn from ``(seed, step)`` (``seed``: ``t.seed``);
    stage 2: the anneal schedule at ``stage_step`` (the step within the stage; ``step``).
    """
    if t.stage == 2:
        return anneal_ratio(step if stage_step is None else stage_step, t)
    rng = step_rng(t.seed if seed is None else seed, step, STREAM_MASK)
    return float(rng.uniform(t.mask_min, t.mask_max))


def sample_mask(
    seed: int, step: int, batch: int, n: int, ratio: float, mode: str = "bernoulli"
) -> np.ndarray:
    """(B, N) float32 mask: Bernoulli(r) per token, or exactly ceil(N·r) tokens per image."""
    rng = step_rng(seed, step, STREAM_MASK)
    rng.uniform()  # the draw mask_ratio() used for r, so the mask stream follows it
    if mode == "exact":
        k = min(n, math.ceil(n * ratio - 1e-9))
        order = np.argsort(rng.random((batch, n)), axis=1)
        mask = np.zeros((batch, n), np.float32)
        np.put_along_axis(mask, order[:, :k], 1.0, axis=1)
        return mask
    return (rng.random((batch, n)) < ratio).astype(np.float32)


def mask_for_step(
    step: int,
    t: TrainConfig,
    n: int,
    seed: int | None = None,
    stage_step: int | None = None,
    batch: int | None = None,
) -> tuple[np.ndarray, float]:
    """The (B, N) mask and ratio of step ``step``; ``seed``, ``stage_step`` as in
    ``mask_ratio``, ``batch`` defaults to ``t.batch_size``."""
    seed = t.seed if seed is None else seed
    r = mask_ratio(step, t, seed, stage_step)
    return sample_mask(seed, step, t.batch_size if batch is None else batch, n, r, t.mask_mode), r


def substream_seed(seed: int, sub: int) -> int:
    """The seed of mask sub-stream ``sub`` of ``seed``: ``seed`` itself for 0, otherwise a
    seed independent of every step's stream (the Marble plugin draws the masks of
    pretraining iterations and of repeated Wanderer steps from these)."""
    if sub == 0:
        return seed
    return int(np.random.SeedSequence([seed, MASK_SUBSTREAM, sub + 2**31]).generate_state(1)[0])
