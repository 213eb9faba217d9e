"""Apply the axial 2D RoPE of ``maetok.rope`` to queries and keys (docs/design.md §3.3).

Mirrors ``maetok_jax/rope.py``: the tables come from the same numpy function, and
``rotate_half`` uses the same layout ([rows | columns], each half split in two).
"""

import torch

from maetok.rope import rope_tables
from maetok_torch.constants import on_device


def rope_for(m, width: int, heads: int, num_latent_tokens: int, device=None):
    """The (cos, sin) constants, float32 (N + L, K), for a stack of width ``width``.

    ``device`` is the one argument JAX does not need (it places constants itself).
    """
    args = (m.grid, num_latent_tokens, width // heads, m.rope_theta)
    return tuple(
        on_device(("rope", i, *args), lambda i=i: rope_tables(*args)[i], device) for i in (0, 1)
    )


def rotate_half(x):
    """Within each axis half (rows, columns) of the head dim: [a, b] → [−b, a]."""
    k = x.shape[-1]
    q = k // 4
    a_r, b_r, a_c, b_c = x[..., :q], x[..., q : 2 * q], x[..., 2 * q : 3 * q], x[..., 3 * q :]
    return torch.cat([-b_r, a_r, -b_c, a_c], dim=-1)


def apply_rope(x, cos, sin):
    """x (B, T, ..., K) with cos/sin (T, K): ``x·cos + rotate_half(x)·sin`` in x's dtype.

    ``x`` is (B, T, heads, K), or (B, T, 2, heads, K) for q and k rotated together.
    """
    shape = (1, cos.shape[0], *(1,) * (x.dim() - 3), cos.shape[-1])
    c = cos.reshape(shape).to(x.dtype)
    s = sin.reshape(shape).to(x.dtype)
    return x * c + rotate_half(x) * s
