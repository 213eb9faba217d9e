"""Axial 2D RoPE tables (docs/design.md §3.3, §3.6), built once in numpy so both backends agree.

A head of width K is split in two halves: the first K/2 dims rotate with the token's row,
the last K/2 with its column. Within each half, dims ``i`` and ``i + K/4`` form a rotating
pair with frequency ``θ^(−i/(K/4))``. Latent tokens come after the N image tokens in the
sequence and get ``cos = 1, sin = 0``: no rotation.
"""

from __future__ import annotations

import functools

import numpy as np


@functools.cache
def rope_tables(
    grid: int, num_latent: int, head_dim: int, theta: float
) -> tuple[np.ndarray, np.ndarray]:
    """``(cos, sin)``, each float32 (N + L, K), N = grid², for ``x·cos + rotate_half(x)·sin``."""
    quarter = head_dim // 4
    freqs = theta ** (-np.arange(quarter, dtype=np.float64) / quarter)  # (K/4,)
    idx = np.arange(grid * grid)
    rows, cols = idx // grid, idx % grid
    ang_r = rows[:, None] * freqs[None, :]  # (N, K/4)
    ang_c = cols[:, None] * freqs[None, :]
    angles = np.concatenate([ang_r, ang_r, ang_c, ang_c], axis=1)  # (N, K)
    cos = np.concatenate([np.cos(angles), np.ones((num_latent, head_dim))], axis=0)
    sin = np.concatenate([np.sin(angles), np.zeros((num_latent, head_dim))], axis=0)
    return cos.astype(np.float32), sin.astype(np.float32)
