"""Apply the axial 2D RoPE of ``maetok.rope`` to queries and keys (docs/design.md §3.3).

Mirrors ``maetok_jax/rope.py``: the tables come from the same numpy function
(``maetok.rope.rotation_tables``), and ``swap_quarters`` uses the same layout ([rows |
columns], each half split in two).
"""

import torch

from maetok.rope import rotation_tables
from maetok_torch.constants import on_device


def rope_for(m, width: int, heads: int, num_latent_tokens: int, device=None):
    """The (cos, signs·sin) constants, float32 (N + L, K), for a stack of width ``width``
    (``maetok.rope.rotation_tables``).

    ``device`` is the one argument JAX does not need (it places constants itself).
    """
    args = (m.grid, num_latent_tokens, width // heads, m.rope_theta)
    return tuple(
        on_device(("rope", i, *args), lambda i=i: rotation_tables(*args)[i], device) for i in (0, 1)
    )


def swap_quarters(x):
    """Within each axis half (rows, columns) of the head dim: [a, b] → [b, a]."""
    k = x.shape[-1]
    return torch.flip(x.reshape(*x.shape[:-1], 2, 2, k // 4), dims=(-2,)).reshape(x.shape)


def apply_rope(x, cos, signed_sin):
    """x (B, T, ..., K) with the (T, K) tables of :func:`rope_for`: ``x·cos +
    rotate_half(x)·sin`` in x's dtype, computed as ``x·cos + swap_quarters(x)·(signs·sin)``
    (``maetok.rope``: the same bits).

    ``x`` is (B, T, heads, K), or (B, T, 2, heads, K) for q and k rotated together.
    """
    shape = (1, cos.shape[0], *(1,) * (x.dim() - 3), cos.shape[-1])
    c = cos.reshape(shape).to(x.dtype)
    s = signed_sin.reshape(shape).to(x.dtype)
    return x * c + swap_quarters(x) * s
