"""Pre-norm transformer blocks, stacked along a leading depth axis (docs/design.md §3.3).

``x ← x + Attn(LN₁(x)); x ← x + MLP(LN₂(x))``. The stack runs under ``lax.scan`` so the
compiled program holds one block, not ``depth`` copies; ``unroll`` trades compile time for
scheduling freedom. ``remat`` (``model.remat``) chooses what the backward pass recomputes:
"full" everything inside a block, "dots" all but the outputs of the dense matmuls (named
``dense``) and the bf16 LayerNorm's statistics (``norm_stats``), "dots_attn" all but those
and the attention output, "dots_gelu" all but those and the MLP's GELU output. The numbers
are the same in every mode; only memory and time change.

A stack of S same-shaped transformers (``stack_aux``) runs as one: leaves (depth, S, ...)
and x (S, B, T, D); each dense is then one batched matmul.
"""

import jax

from maetok_jax.attention import attention
from maetok_jax.layers import layer_norm, mlp

# every "dots" mode also keeps the bf16 LayerNorm's mean and 1/σ (one float32 pair a row):
# recomputed, they made each LayerNorm backward a row reduction that wrote its scale
# gradient's product to memory and read it back (benchmarks/NOTES.md, +3.7 % at ``base``)
_STATS = ("norm_stats",)
_SAVED = {
    "dots": ("dense", *_STATS),
    "dots_attn": ("dense", "attention", *_STATS),
    "dots_gelu": ("dense", "gelu", *_STATS),
}


def block(
    params,
    x,
    cos,
    sin,
    heads: int,
    eps: float,
    impl: str = "plain",
    lowp: bool = False,
    split_qkv: bool = False,
):
    """One block on x (B, T, D); ``params`` is one depth slice of the stacked tree.

    Everything but attention runs on rows, (B·T, D) or stacked (S, B·T, D): a saved
    activation then has one layout on the GPU, not the batch-minor one XLA chose for 3-D
    arrays whose weight gradients contract over batch and tokens, which took a transpose
    before and after each LayerNorm backward (benchmarks/NOTES.md).
    """
    shape = x.shape
    rows = x.reshape(*shape[:-3], -1, shape[-1])
    attn_params = {"qkv": params["qkv"], "proj": params["proj"]}
    h = layer_norm(params["ln1"], rows, eps, lowp).reshape(shape)
    rows = rows + attention(attn_params, h, cos, sin, heads, impl, split_qkv).reshape(rows.shape)
    mlp_params = {"fc1": params["fc1"], "fc2": params["fc2"]}
    rows = rows + mlp(mlp_params, layer_norm(params["ln2"], rows, eps, lowp), lowp)
    return rows.reshape(shape)


def remat_policy(mode: str):
    """The ``jax.checkpoint`` policy of a ``model.remat`` mode ("full": save nothing)."""
    if mode == "full":
        return None
    return jax.checkpoint_policies.save_only_these_names(*_SAVED[mode])


def transformer(
    blocks,
    x,
    cos,
    sin,
    heads: int,
    eps: float,
    impl: str = "plain",
    unroll: int = 1,
    remat: str = "none",
    lowp: bool = False,
    split_qkv: bool = False,
):
    """Run every block of the stacked tree ``blocks`` (leaves (depth, ...)) over x (B, T, D)."""

    def body(h, layer_params):
        return block(layer_params, h, cos, sin, heads, eps, impl, lowp, split_qkv), None

    if remat != "none":
        body = jax.checkpoint(body, policy=remat_policy(remat))

    x, _ = jax.lax.scan(body, x, blocks, unroll=unroll)
    return x
