"""Multi-head self-attention with 2D RoPE on q/k (docs/design.md §3.3).

Three implementations give the same function:
- ``plain``: explicit ``softmax(q kᵀ / √K) v`` with the softmax in float32 — the
  reference path that parity tests pin against torch;
- ``fused``: ``jax.nn.dot_product_attention``, which uses cuDNN's flash attention on GPU
  for bfloat16 inputs and XLA's attention elsewhere;
- ``flash``: the Pallas (Triton) flash-attention kernel of ``jax.experimental.pallas``.
  Its backward pass computes dk/dv and dq in two passes, each output block written by one
  program, with no atomic additions: a kernel meant to repeat bit for bit and to compile
  under XLA's deterministic flag, where cuDNN's cannot. Off the GPU it runs in the Pallas
  interpreter (slow; for tests). T is padded to a multiple of 16 (the kernel's smallest
  block), the padding kept out of the softmax by segment ids.

Each takes q, k, v as (B, T, heads, K), the layout ``jax.nn.dot_product_attention`` reads.
``split_qkv`` (``model.split_qkv``) builds them straight in that layout: q and k from one
``(D, 2D)`` matmul (RoPE rotates them in place, the rotation writing each out
contiguous), v from its own ``(D, D)`` matmul, so no array is sliced out of a wider one
and copied before the kernel. The ``qkv`` leaf stays one ``(D, 3D)`` matrix, sliced at
call time. A stack of S attentions (stacked parameters, x (S, B, T, D)) folds S into the
batch around the kernel.
"""

import jax
import jax.numpy as jnp
import numpy as np
from jax.ad_checkpoint import checkpoint_name

from maetok.reproducible import xla_deterministic
from maetok_jax.layers import dense
from maetok_jax.rope import apply_rope


def split_heads(qkv, heads: int):
    """(B, T, 3·D) → three (B, T, heads, K) arrays; the columns are laid out [q | k | v]."""
    b, t, d3 = qkv.shape
    k = d3 // (3 * heads)
    qkv = qkv.reshape(b, t, 3, heads, k)
    return qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]


def project_qkv(params, x, heads: int):
    """x (B, T, D) → (qk (B, T, 2, heads, K), v (B, T, heads, K)) from ``params`` {w (D, 3D),
    b (3D,)} in two matmuls, ``(D, 2D)`` for q and k and ``(D, D)`` for v, so each comes out
    in the kernel's layout with nothing sliced out of a wider array; q is ``qk[:, :, 0]``.

    Stacked (``w`` (S, D, 3D), x (S, B, T, D)): S folds into the batch, B' = S·B.
    """
    d, t = x.shape[-1], x.shape[-2]
    w, b = params["w"], params["b"]
    qk = dense({"w": w[..., : 2 * d], "b": b[..., : 2 * d]}, x)  # (S?, B, T, 2D)
    v = dense({"w": w[..., 2 * d :], "b": b[..., 2 * d :]}, x)  # (S?, B, T, D)
    return qk.reshape(-1, t, 2, heads, d // heads), v.reshape(-1, t, heads, d // heads)


def _plain(q, k, v):
    scale = 1.0 / jnp.sqrt(jnp.float32(q.shape[-1]))
    logits = jnp.einsum("bqhk,bthk->bhqt", q, k).astype(jnp.float32) * scale
    probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    return jnp.einsum("bhqt,bthk->bqhk", probs, v)


def _fused(q, k, v):
    on_gpu = jax.default_backend() == "gpu"
    # cuDNN's kernel for bf16 on a GPU; XLA's own attention under deterministic kernels, as
    # XLA 0.11.2 cannot compile a step with cuDNN attention under that flag
    cudnn = on_gpu and q.dtype in (jnp.bfloat16, jnp.float16) and not xla_deterministic()
    impl = "cudnn" if cudnn else ("xla" if on_gpu else None)
    return jax.nn.dot_product_attention(q, k, v, implementation=impl)


FLASH_BLOCK = 16  # the Pallas kernel's smallest block: T is padded to a multiple of it


def _flash(q, k, v):
    from jax.experimental.pallas.ops.gpu import attention as pallas_attention

    b, t, _, head_dim = q.shape
    pad = -t % FLASH_BLOCK
    segments = None
    if pad:  # padded keys are another segment, so no real query attends to them
        q, k, v = (jnp.pad(a, ((0, 0), (0, pad), (0, 0), (0, 0))) for a in (q, k, v))
        segments = jnp.broadcast_to((jnp.arange(t + pad) < t).astype(jnp.int32), (b, t + pad))
    forward = next(n for n in (128, 64, 32, 16) if (t + pad) % n == 0)
    backward = min(forward, 32)
    blocks = pallas_attention.BlockSizes(
        block_q=forward,
        block_k=forward,
        block_q_dkv=backward,
        block_kv_dkv=backward,
        block_q_dq=backward,
        block_kv_dq=backward,
    )
    scale = float(np.float32(1.0) / np.sqrt(np.float32(head_dim)))  # as _plain rounds it
    out = pallas_attention.mha(
        q,
        k,
        v,
        segments,
        sm_scale=scale,
        block_sizes=blocks,
        interpret=jax.default_backend() != "gpu",
    )
    return out[:, :t]


KERNELS = {"plain": _plain, "fused": _fused, "flash": _flash}


def attention(params, x, cos, sin, heads: int, impl: str = "plain", split_qkv: bool = False):
    """x (B, T, D) → (B, T, D); ``params`` holds ``qkv`` (D, 3D) and ``proj`` (D, D).

    ``cos``/``sin`` None: no rotation (a model with learned absolute positions).
    """
    if split_qkv:  # q and k rotated together, in the (B, T, heads, K) layout of the kernel
        qk, v = project_qkv(params["qkv"], x, heads)
        if cos is not None:
            qk = apply_rope(qk, cos, sin)
        q, k = qk[:, :, 0], qk[:, :, 1]
    else:
        qkv = dense(params["qkv"], x)  # (S?, B, T, 3D)
        q, k, v = split_heads(qkv.reshape(-1, *qkv.shape[-2:]), heads)
        if cos is not None:
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    out = KERNELS[impl](q, k, v)
    out = checkpoint_name(out, "attention")  # remat "dots_attn" keeps it
    return dense(params["proj"], out.reshape(x.shape))
