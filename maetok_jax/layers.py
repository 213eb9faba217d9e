"""Elementary layers: dense, LayerNorm, GELU MLP (docs/design.md §3.3).

Pinned numerics (LayerNorm statistics, exact GELU): ``maetok.numerics``.
"""

import jax
import jax.numpy as jnp


def dense(params, x):
    """(..., D_in) → (..., D_out) as ``x @ w + b`` with ``w`` stored (D_in, D_out)."""
    return x @ params["w"] + params["b"]


def layer_norm(params, x, eps: float):
    """LayerNorm over the last axis, computed in float32 and returned in ``x``'s dtype.

    ``params`` None: no affine (adaLN modulates the normalised values instead).
    """
    xf = x.astype(jnp.float32)
    mean = jnp.mean(xf, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(xf - mean), axis=-1, keepdims=True)
    y = (xf - mean) * jax.lax.rsqrt(var + eps)
    if params is not None:
        y = y * params["scale"].astype(jnp.float32) + params["bias"].astype(jnp.float32)
    return y.astype(x.dtype)


def gelu(x):
    return jax.nn.gelu(x, approximate=False)


def mlp(params, x):
    """Transformer MLP: (B, T, D) → (B, T, D) through ``fc1 → GELU → fc2``."""
    return dense(params["fc2"], gelu(dense(params["fc1"], x)))


def cast_tree(tree, dtype):
    """Cast every floating leaf (the bf16 compute copy of float32 parameters)."""
    return jax.tree_util.tree_map(lambda a: a.astype(dtype), tree)
