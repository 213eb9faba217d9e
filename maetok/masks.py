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


def step_rng(seed: int, step: int, stream: int) -> np.random.Generator:
    return np.random.default_rng([seed, step, stream])


def mask_ratio(step: int, t: TrainConfig) -> float:
    """Stage 1: r ~ U[mask_min, mask_max] drawn from (seed, step); stage 2: the anneal schedule."""
    if t.stage == 2:
        return anneal_ratio(step, t)
    return float(step_rng(t.seed, step, STREAM_MASK).uniform(t.mask_min, t.mask_max))


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


def mask_for_step(step: int, t: TrainConfig, n: int) -> tuple[np.ndarray, float]:
    """The mask and ratio that training step ``step`` uses."""
    r = mask_ratio(step, t)
    return sample_mask(t.seed, step, t.batch_size, n, r, t.mask_mode), r
