"""Pre-norm transformer blocks, stacked along a leading depth axis (docs/design.md §3.3).

``x ← x + Attn(LN₁(x)); x ← x + MLP(LN₂(x))``. Mirrors ``maetok_jax/transformer.py``; where
JAX scans over the stacked tree, this loops over the depth index and slices every leaf.

``remat`` (``model.remat``) recomputes in the backward pass (``torch.utils.checkpoint``):
"full" the whole block; "dots" all but the matmul outputs, "dots_attn" all but those and
the attention output, "dots_gelu" all but the matmul outputs and the MLP's GELU output
(selective checkpointing, the counterpart of the JAX policies). JAX's "dots" modes also keep
the LayerNorm statistics; torch's LayerNorm is one operator whose output and statistics are
kept or recomputed together, so here they are recomputed. The numbers are the same in every
mode.

Inside ``maetok_torch.compiled.compiling()`` (``model.compile_scope`` "block" or "parts")
every block runs through one ``torch.compile``d function, built once and reused across depth
and stacks.
"""

import functools

import torch
from torch.utils.checkpoint import (
    CheckpointPolicy,
    checkpoint,
    create_selective_checkpoint_contexts,
)

from maetok.tree import map_tree
from maetok_torch.attention import attention
from maetok_torch.compiled import blocks_compiled, compiled
from maetok_torch.layers import layer_norm, mlp

_MATMULS = {
    torch.ops.aten.mm.default,
    torch.ops.aten.addmm.default,
    torch.ops.aten.bmm.default,
    torch.ops.aten.baddbmm.default,
}
_ATTENTION = {
    torch.ops.aten._scaled_dot_product_flash_attention.default,
    torch.ops.aten._scaled_dot_product_efficient_attention.default,
    torch.ops.aten._scaled_dot_product_cudnn_attention.default,
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default,
}
_GELU = {torch.ops.aten.gelu.default}
_SAVED = {"dots": _MATMULS, "dots_attn": _MATMULS | _ATTENTION, "dots_gelu": _MATMULS | _GELU}


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

    JAX's block runs on (B·T, D) rows for XLA's layouts on the GPU; torch's kernels take
    (B, T, D) as it is, and the numbers are the same."""
    attn_params = {"qkv": params["qkv"], "proj": params["proj"]}
    h = layer_norm(params["ln1"], x, eps, lowp)
    x = x + attention(attn_params, h, cos, sin, heads, impl, split_qkv)
    mlp_params = {"fc1": params["fc1"], "fc2": params["fc2"]}
    return x + mlp(mlp_params, layer_norm(params["ln2"], x, eps, lowp), lowp)


def _policy(saved, ctx, op, *args, **kwargs):
    return CheckpointPolicy.MUST_SAVE if op in saved else CheckpointPolicy.PREFER_RECOMPUTE


@functools.cache  # one function per mode: each mode is compiled once
def remat_block(mode: str):
    """``block`` recomputed in the backward pass as ``model.remat`` mode ``mode`` says."""
    if mode == "none":
        return block
    extra = {}
    if mode != "full":
        policy = functools.partial(_policy, _SAVED[mode])
        extra["context_fn"] = functools.partial(create_selective_checkpoint_contexts, policy)

    def run(*args):
        return checkpoint(block, *args, use_reentrant=False, **extra)

    return run


def _block_fn(mode: str):
    return compiled(remat_block(mode)) if blocks_compiled() else remat_block(mode)


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
    remat: str = "none",
    lowp: bool = False,
    split_qkv: bool = False,
):
    """Run every block of the stacked tree ``blocks`` (leaves (depth, ...)) over x (B, T, D).

    ``unroll`` is accepted for the JAX signature and has no effect: eager torch and
    ``torch.compile`` both unroll a Python loop.
    """
    depth = blocks["qkv"]["w"].shape[0]
    mode = remat if x.requires_grad else "none"  # nothing to recompute without a backward
    fn = _block_fn(mode)
    for i in range(depth):
        x = fn(_slice(blocks, i), x, cos, sin, heads, eps, impl, lowp, split_qkv)
    return x
