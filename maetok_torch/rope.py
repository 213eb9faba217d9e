"""Apply the axial 2D RoPE of ``maetok.rope`` to queries and keys (docs/design.md §3.3).

Mirrors ``maetok_jax/rope.py``: the tables come from the same numpy function, and
``rotate_half`` uses the same layout ([rows | columns], each half split in two).
"""

import torch

from maetok.rope import rope_tables

# (grid, L, K, θ, device) → (cos, sin): one host→device copy per table, not one per step
# (a copy from pageable memory would also make the host wait for the GPU).
_ON_DEVICE: dict = {}


def rope_for(m, width: int, heads: int, num_latent_tokens: int, device=None):
    """The (cos, sin) constants, float32 (N + L, K), for a stack of width ``width``.

    ``device`` is the one argument JAX does not need (it places constants itself).
    """
    dev = torch.device(device) if device is not None else torch.device("cpu")
    if torch.compiler.is_compiling():
        # Inside torch.compile the tables become constants of the graph: a module-level
        # tensor read inside the step's torch.func.grad region breaks inductor (torch 2.13),
        # and a cache mutated while tracing would hold traced tensors.
        cos, sin = rope_tables(m.grid, num_latent_tokens, width // heads, m.rope_theta)
        return torch.as_tensor(cos, device=dev), torch.as_tensor(sin, device=dev)
    key = (m.grid, num_latent_tokens, width // heads, m.rope_theta, str(dev))
    if key not in _ON_DEVICE:
        cos, sin = rope_tables(m.grid, num_latent_tokens, width // heads, m.rope_theta)
        _ON_DEVICE[key] = (torch.as_tensor(cos, device=dev), torch.as_tensor(sin, device=dev))
    return _ON_DEVICE[key]


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
