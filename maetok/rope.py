"""Axial 2D RoPE tables (docs/design.md §3.3, §3.6), built once in numpy so both backends agree.

A head of width K is split in two halves: the first K/2 dims rotate with the token's row,
the last K/2 with its column. Within each half, dims ``i`` and ``i + K/4`` form a rotating
pair with frequency ``θ^(−i/(K/4))``: ``x·cos + rotate_half(x)·sin`` with ``rotate_half``
taking each quarter pair ``[a, b]`` to ``[−b, a]``. Both backends compute the same thing as
``x·cos + swap(x)·(signs·sin)``: ``swap`` exchanges the two quarters of each half and the
signs (``rotation_signs``) are folded into the sine table, so the rotation is one
permutation, whose gradient is the same permutation (negation and products by ±1 are exact,
the values the same bit for bit). Latent tokens come after the N image tokens in the
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


def rotation_signs(head_dim: int) -> np.ndarray:
    """float32 (K,): −1 on the first quarter of each half, +1 on the second, the signs of
    ``rotate_half`` that ``x·cos + swap(x)·(signs·sin)`` carries in the sine table."""
    quarter = np.ones(head_dim // 4, np.float32)
    return np.concatenate([-quarter, quarter, -quarter, quarter])


@functools.cache
def rotation_tables(
    grid: int, num_latent: int, head_dim: int, theta: float
) -> tuple[np.ndarray, np.ndarray]:
    """``(cos, signs·sin)``, each float32 (N + L, K): the tables both backends'
    ``apply_rope`` take, the signs already in the sine so that no compiled block reads
    them from elsewhere."""
    cos, sin = rope_tables(grid, num_latent, head_dim, theta)
    return cos, sin * rotation_signs(head_dim)
