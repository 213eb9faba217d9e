"""Elementary layers: dense, LayerNorm, GELU MLP (docs/design.md §3.3).

Mirrors ``maetok_jax/layers.py``.

Plain functions over dicts of tensors (no ``nn.Module``). Pinned numerics (LayerNorm
statistics, exact GELU): ``maetok.numerics``; LayerNorm is written out rather than
``F.layer_norm``, whose fused kernel orders the operations differently, and GELU states
torch's default ``approximate="none"`` explicitly.
"""

import torch
import torch.nn.functional as F

from maetok.tree import map_tree


def dense(params, x):
    """(..., D_in) → (..., D_out) as ``x @ w + b`` with ``w`` stored (D_in, D_out)."""
    return x @ params["w"] + params["b"]


def layer_norm(params, x, eps: float):
    """LayerNorm over the last axis, computed in float32 and returned in ``x``'s dtype."""
    xf = x.to(torch.float32)
    mean = torch.mean(xf, dim=-1, keepdim=True)
    var = torch.mean(torch.square(xf - mean), dim=-1, keepdim=True)
    y = (xf - mean) * torch.rsqrt(var + eps)
    y = y * params["scale"].to(torch.float32) + params["bias"].to(torch.float32)
    return y.to(x.dtype)


def gelu(x):
    return F.gelu(x, approximate="none")


def mlp(params, x):
    """Transformer MLP: (B, T, D) → (B, T, D) through ``fc1 → GELU → fc2``."""
    return dense(params["fc2"], gelu(dense(params["fc1"], x)))


def cast_tree(tree, dtype):
    """Cast every floating leaf (the bf16 compute copy of float32 parameters).

    ``Tensor.to`` returns the tensor itself when the dtype already matches, so the float32
    path keeps the autograd leaves untouched.
    """
    return map_tree(lambda a: a.to(dtype), tree)
