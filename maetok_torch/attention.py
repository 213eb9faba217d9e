"""Multi-head self-attention with 2D RoPE on q/k (docs/design.md §3.3).

Mirrors ``maetok_jax/attention.py``.

Two implementations give the same function:
- ``plain``: explicit ``softmax(q kᵀ / √K) v`` with the softmax in float32 and the scale
  applied to the logits after the matmul, as the JAX reference path does — the path the
  parity tests pin;
- ``fused``: ``F.scaled_dot_product_attention`` (flash / memory-efficient kernels on GPU),
  on (B, heads, T, K) views. ``flash`` (JAX's Pallas kernel) is this one here too: SDPA is
  torch's flash attention.

``split_qkv`` (``model.split_qkv``): q and k from one ``(D, 2D)`` matmul, rotated together,
and v from its own ``(D, D)`` matmul. SDPA takes (B, heads, T, K); the views passed are
transposes of (B, T, heads, K) buffers, which is the memory layout the flash and cuDNN
kernels read natively (row-strided), so no copy is made on the way in or out.
"""

import numpy as np
import torch
import torch.nn.functional as F

from maetok_torch.layers import dense
from maetok_torch.rope import apply_rope


def split_heads(qkv, heads: int):
    """(B, T, 3·D) → three (B, T, heads, K) tensors; the columns are laid out [q | k | v]."""
    b, t, d3 = qkv.shape
    k = d3 // (3 * heads)
    qkv = qkv.reshape(b, t, 3, heads, k)
    return qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]


def project_qkv(params, x, heads: int):
    """x (B, T, D) → (qk (B, T, 2, heads, K), v (B, T, heads, K)) from ``params`` {w (D, 3D),
    b (3D,)} in two matmuls, ``(D, 2D)`` for q and k and ``(D, D)`` for v; q is
    ``qk[:, :, 0]``. Stacked (``w`` (S, D, 3D), x (S, B, T, D)): B' = S·B.
    """
    d, t = x.shape[-1], x.shape[-2]
    w, b = params["w"], params["b"]
    qk = dense({"w": w[..., : 2 * d], "b": b[..., : 2 * d]}, x)  # (S?, B, T, 2D)
    v = dense({"w": w[..., 2 * d :], "b": b[..., 2 * d :]}, x)  # (S?, B, T, D)
    return qk.reshape(-1, t, 2, heads, d // heads), v.reshape(-1, t, heads, d // heads)


def _plain(q, k, v):
    # 1/√K rounded the way JAX computes it (float32 sqrt, float32 division).
    scale = float(np.float32(1.0) / np.sqrt(np.float32(q.shape[-1])))
    logits = torch.einsum("bqhk,bthk->bhqt", q, k).to(torch.float32) * scale
    probs = torch.softmax(logits, dim=-1).to(v.dtype)
    return torch.einsum("bhqt,bthk->bqhk", probs, v)


def _fused(q, k, v):
    # SDPA wants (B, heads, T, K); its default scale is 1/√K, as in the plain path.
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    return out.transpose(1, 2)  # (B, T, heads, K)


KERNELS = {"plain": _plain, "fused": _fused, "flash": _fused}  # the names of JAX's KERNELS


def attention(params, x, cos, sin, heads: int, impl: str = "plain", split_qkv: bool = False):
    """x (B, T, D) → (B, T, D); ``params`` holds ``qkv`` (D, 3D) and ``proj`` (D, D)."""
    if split_qkv:  # q and k rotated together; SDPA reads the (B, T, heads, K) buffers
        qk, v = project_qkv(params["qkv"], x, heads)
        qk = apply_rope(qk, cos, sin)
        q, k = qk[:, :, 0], qk[:, :, 1]
    else:
        qkv = dense(params["qkv"], x)  # (S?, B, T, 3D)
        q, k, v = split_heads(qkv.reshape(-1, *qkv.shape[-2:]), heads)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    out = KERNELS[impl](q, k, v)
    return dense(params["proj"], out.reshape(x.shape))
