"""Elementary layers: dense, LayerNorm, GELU MLP (docs/design.md §3.3).

Mirrors ``maetok_jax/layers.py``.

Plain functions over dicts of tensors (no ``nn.Module``). Pinned numerics (LayerNorm
statistics, exact GELU): ``maetok.numerics``; LayerNorm is written out rather than
``F.layer_norm``, whose fused kernel orders the operations differently, and GELU states
torch's default ``approximate="none"`` explicitly.

Every layer also takes a *stack* of S same-shaped layers (``stack_aux``): a stacked dense
has ``w`` (S, D_in, D_out) and acts on x (S, ..., D_in) as one ``bmm``; stacked LayerNorm
affines are (S, D).

``lowp=True`` (``model.lowp_norm``) with bf16 activations: LayerNorm is ``F.layer_norm``,
whose kernel keeps float32 statistics and saves only the bf16 input and the per-token
mean and 1/σ (the JAX backend's custom VJP does the same). torch's GELU already computes
bf16 in float32 and saves only its input, so ``gelu`` takes ``lowp`` for the JAX signature.
"""

import torch
import torch.nn.functional as F

from maetok.tree import map_tree


def dense(params, x):
    """(..., D_in) → (..., D_out) as ``x @ w + b`` with ``w`` stored (D_in, D_out).

    Stacked: ``w`` (S, D_in, D_out), ``b`` (S, D_out), x (S, ..., D_in) → (S, ..., D_out).
    """
    w, b = params["w"], params["b"]
    if w.dim() == 2:
        return x @ w + b
    s, lead = w.shape[0], x.shape[1:-1]
    y = torch.bmm(x.reshape(s, -1, x.shape[-1]), w)  # one batched matmul
    return y.reshape(s, *lead, w.shape[-1]) + b.reshape(s, *(1,) * len(lead), -1)


def _affine(a, x):
    """A LayerNorm scale or bias, (D,) or stacked (S, D), broadcast against x (S?, ..., D)."""
    return a if a.dim() == 1 else a.reshape(a.shape[0], *(1,) * (x.dim() - 2), a.shape[-1])


def layer_norm(params, x, eps: float, lowp: bool = False):
    """LayerNorm over the last axis, computed in float32 and returned in ``x``'s dtype."""
    scale, bias = _affine(params["scale"], x), _affine(params["bias"], x)
    if lowp and x.dtype != torch.float32:
        if scale.dim() == 1:
            return F.layer_norm(x, (x.shape[-1],), scale, bias, eps)
        return F.layer_norm(x, (x.shape[-1],), None, None, eps) * scale + bias
    xf = x.to(torch.float32)
    mean = torch.mean(xf, dim=-1, keepdim=True)
    var = torch.mean(torch.square(xf - mean), dim=-1, keepdim=True)
    y = (xf - mean) * torch.rsqrt(var + eps)
    y = y * scale.to(torch.float32) + bias.to(torch.float32)
    return y.to(x.dtype)


def gelu(x, lowp: bool = False):
    return F.gelu(x, approximate="none")


def mlp(params, x, lowp: bool = False):
    """Transformer MLP: (B, T, D) → (B, T, D) through ``fc1 → GELU → fc2``."""
    return dense(params["fc2"], gelu(dense(params["fc1"], x), lowp))


def cast_tree(tree, dtype):
    """Cast every floating leaf (the bf16 compute copy of float32 parameters).

    ``Tensor.to`` returns the tensor itself when the dtype already matches, so the float32
    path keeps the autograd leaves untouched.
    """
    return map_tree(lambda a: a.to(dtype), tree)
