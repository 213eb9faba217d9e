"""Pre-norm transformer blocks, stacked along a leading depth axis (docs/design.md §3.3).

``x ← x + Attn(LN₁(x)); x ← x + MLP(LN₂(x))``. Mirrors ``maetok_jax/transformer.py``; where
JAX scans over the stacked tree, this loops over the depth index and slices every leaf.
``remat`` recomputes each block in the backward pass (``torch.utils.checkpoint``): the
whole block, where JAX keeps the dense matmul outputs; the numbers are the same either way.
"""

from torch.utils.checkpoint import checkpoint

from maetok.tree import map_tree
from maetok_torch.attention import attention
from maetok_torch.layers import layer_norm, mlp


def block(params, x, cos, sin, heads: int, eps: float, impl: str = "plain"):
    """One block on x (B, T, D); ``params`` is one depth slice of the stacked tree."""
    attn_params = {"qkv": params["qkv"], "proj": params["proj"]}
    x = x + attention(attn_params, layer_norm(params["ln1"], x, eps), cos, sin, heads, impl)
    mlp_params = {"fc1": params["fc1"], "fc2": params["fc2"]}
    return x + mlp(mlp_params, layer_norm(params["ln2"], x, eps))


def _slice(tree, i: int):
    """Depth slice ``i`` of a stacked tree (leaves (depth, ...) → (...))."""
    return map_tree(lambda a: a[i], tree)


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
    """Run every block of the stacked tree ``blocks`` (leaves (depth, ...)) over x (B, T, D).

    ``unroll`` is accepted for the JAX signature and has no effect: eager torch and
    ``torch.compile`` both unroll a Python loop.
    """
    depth = blocks["qkv"]["w"].shape[0]
    for i in range(depth):
        if remat and x.requires_grad:
            x = checkpoint(
                block, _slice(blocks, i), x, cos, sin, heads, eps, impl, use_reentrant=False
            )
        else:
            x = block(_slice(blocks, i), x, cos, sin, heads, eps, impl)
    return x
