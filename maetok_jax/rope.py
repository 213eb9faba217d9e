"""Apply the axial 2D RoPE of ``maetok.rope`` to queries and keys (docs/design.md §3.3)."""

import jax.numpy as jnp

from maetok.rope import rotation_tables


def rope_for(m, width: int, heads: int, num_latent_tokens: int):
    """The (cos, signs·sin) constants, float32 (N + L, K), for a stack of width ``width``
    (``maetok.rope.rotation_tables``)."""
    cos, sin = rotation_tables(m.grid, num_latent_tokens, width // heads, m.rope_theta)
    return jnp.asarray(cos), jnp.asarray(sin)


def swap_quarters(x):
    """Within each axis half (rows, columns) of the head dim: [a, b] → [b, a], a reversal
    of a size-2 axis (its gradient is the same reversal, one pass with no slices or pads)."""
    k = x.shape[-1]
    return jnp.flip(x.reshape(*x.shape[:-1], 2, 2, k // 4), axis=-2).reshape(x.shape)


def apply_rope(x, cos, signed_sin):
    """x (B, T, ..., K) with the (T, K) tables of :func:`rope_for`: ``x·cos +
    rotate_half(x)·sin`` in x's dtype, computed as ``x·cos + swap_quarters(x)·(signs·sin)``
    (``maetok.rope``: the same bits).

    ``x`` is (B, T, heads, K), or (B, T, 2, heads, K) for q and k rotated together.
    """
    shape = (1, cos.shape[0], *(1,) * (x.ndim - 3), cos.shape[-1])
    c = cos.reshape(shape).astype(x.dtype)
    s = signed_sin.reshape(shape).astype(x.dtype)
    return x * c + swap_quarters(x) * s
