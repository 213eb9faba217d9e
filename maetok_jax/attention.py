"""Multi-head self-attention with 2D RoPE on q/k (docs/design.md §3.3).

Two implementations give the same function:
- ``plain``: explicit ``softmax(q kᵀ / √K) v`` with the softmax in float32 — the
  reference path that parity tests pin against torch;
- ``fused``: ``jax.nn.dot_product_attention``, which uses cuDNN's flash attention on GPU
  for bfloat16 inputs and XLA's attention elsewhere.
"""

import jax
import jax.numpy as jnp

from maetok_jax.layers import dense
from maetok_jax.rope import apply_rope


def split_heads(qkv, heads: int):
    """(B, T, 3·D) → three (B, T, heads, K) arrays; the columns are laid out [q | k | v]."""
    b, t, d3 = qkv.shape
    k = d3 // (3 * heads)
    qkv = qkv.reshape(b, t, 3, heads, k)
    return qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]


def _plain(q, k, v):
    scale = 1.0 / jnp.sqrt(jnp.float32(q.shape[-1]))
    logits = jnp.einsum("bqhk,bthk->bhqt", q, k).astype(jnp.float32) * scale
    probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    return jnp.einsum("bhqt,bthk->bqhk", probs, v)


def _fused(q, k, v):
    on_gpu = jax.default_backend() == "gpu"
    impl = "cudnn" if on_gpu and q.dtype in (jnp.bfloat16, jnp.float16) else None
    return jax.nn.dot_product_attention(q, k, v, implementation=impl)


def attention(params, x, cos, sin, heads: int, impl: str = "plain"):
    """x (B, T, D) → (B, T, D); ``params`` holds ``qkv`` (D, 3D) and ``proj`` (D, D).

    ``cos``/``sin`` None: no rotation (a model with learned absolute positions).
    """
    b, t, d = x.shape
    q, k, v = split_heads(dense(params["qkv"], x), heads)  # each (B, T, heads, K)
    if cos is not None:
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    out = _fused(q, k, v) if impl == "fused" else _plain(q, k, v)
    return dense(params["proj"], out.reshape(b, t, d))
