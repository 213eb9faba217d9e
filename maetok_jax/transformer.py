"""Pre-norm transformer blocks, stacked along a leading depth axis (docs/design.md §3.3).

``x ← x + Attn(LN₁(x)); x ← x + MLP(LN₂(x))``. The stack runs under ``lax.scan`` so the
compiled program holds one block, not ``depth`` copies; ``unroll`` trades compile time for
scheduling freedom. ``remat`` keeps only the outputs of the dense matmuls of each block for
the backward pass and recomputes the rest (LayerNorms, GELU, RoPE, attention): less
memory for a little more compute, with identical numbers.
"""

import jax

from maetok_jax.attention import attention
from maetok_jax.layers import layer_norm, mlp


def block(params, x, cos, sin, heads: int, eps: float, impl: str = "plain"):
    """One block on x (B, T, D); ``params`` is one depth slice of the stacked tree."""
    attn_params = {"qkv": params["qkv"], "proj": params["proj"]}
    x = x + attention(attn_params, layer_norm(params["ln1"], x, eps), cos, sin, heads, impl)
    mlp_params = {"fc1": params["fc1"], "fc2": params["fc2"]}
    return x + mlp(mlp_params, layer_norm(params["ln2"], x, eps))


def transformer(
    blocks,
    x,
    cos,
    sin,
    heads: int,
    eps: float,
    impl: str = "plain",
    unroll: int = 1,
    remat: bool = False,
):
    """Run every block of the stacked tree ``blocks`` (leaves (depth, ...)) over x (B, T, D)."""

    def body(h, layer_params):
        return block(layer_params, h, cos, sin, heads, eps, impl), None

    if remat:
        body = jax.checkpoint(body, policy=jax.checkpoint_policies.dots_with_no_batch_dims_saveable)

    x, _ = jax.lax.scan(body, x, blocks, unroll=unroll)
    return x
