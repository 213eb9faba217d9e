"""Elementary layers: dense, LayerNorm, GELU MLP (docs/design.md §3.3).

Pinned numerics (LayerNorm statistics, exact GELU): ``maetok.numerics``.

Every layer also takes a *stack* of S same-shaped layers at once (``stack_aux``): a stacked
dense has ``w`` (S, D_in, D_out) and acts on x (S, ..., D_in); stacked LayerNorm affines
are (S, D). The S computations are one batched matmul, never a loop.

``lowp=True`` (``model.lowp_norm``) changes what LayerNorm and GELU keep for the backward
pass when the activations are bf16: only their bf16 input (and LayerNorm's float32 mean
and 1/σ, one number per token), instead of the float32 intermediates autodiff would save.
The forward values are the same as the reference path's; float32 inputs always take the
reference path.
"""

import functools
import math

import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name


def dense(params, x):
    """(..., D_in) → (..., D_out) as ``x @ w + b`` with ``w`` stored (D_in, D_out).

    Stacked: ``w`` (S, D_in, D_out), ``b`` (S, D_out), x (S, ..., D_in) → (S, ..., D_out).
    """
    w, b = params["w"], params["b"]
    if w.ndim == 2:
        y = add_bias(x @ w, b)
    else:
        s, lead = w.shape[0], x.shape[1:-1]
        y = jnp.einsum("snd,sde->sne", x.reshape(s, -1, x.shape[-1]), w)  # one batched matmul
        y = add_bias(y.reshape(s, *lead, w.shape[-1]), b.reshape(s, *(1,) * len(lead), -1))
    return checkpoint_name(y, "dense")  # what remat "dots" keeps (maetok_jax.transformer)


def add_bias(y, b):
    """``y + b``: a parameter b broadcast over y's rows (``broadcast``), added in y's dtype."""
    return y + broadcast(b.astype(y.dtype), y.shape)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def broadcast(a, shape):
    """A parameter ``a`` broadcast to ``shape``, as ``jnp.broadcast_to``, whose gradient (the
    cotangent summed over the broadcast axes) is summed in float32.

    Autodiff's transpose of a bf16 broadcast sums in bf16, which over the 98,304 rows of a
    ``base`` batch loses about 1 % (torch sums in float32). Here only the sum's accumulator
    changes: the forward pass, and what XLA fuses around it, are those of a plain broadcast.
    """
    return jnp.broadcast_to(a, shape)


def _broadcast_fwd(a, shape):
    return jnp.broadcast_to(a, shape), a


def _broadcast_bwd(shape, a, g):
    return (_sum_to(_widen(g), a.shape).astype(a.dtype),)


def _sum_to(g, shape):
    """Sum g over the axes a broadcast of ``shape`` added or stretched (the gradient of a
    broadcast), keeping float32."""
    lead = g.ndim - len(shape)
    axes = tuple(range(lead)) + tuple(
        lead + i for i, n in enumerate(shape) if n == 1 and g.shape[lead + i] != 1
    )
    return jnp.sum(g, axis=axes).reshape(shape)


def _widen(x):
    """``x`` as float32, for a float32 sum; a bf16 ``x`` through its bits.

    Both give the same values. But XLA (its default ``xla_allow_excess_precision``) replaces
    a float32 → bf16 → float32 pair of converts by the float32 value it started from, so a
    sum of ``x.astype(float32)`` would read the float32 value that the producer of a bf16
    cotangent rounds, and the producer, now with two readers, is no longer fused into the
    sum: it writes that float32 value out (measured: 4 % of the ``base`` Stage-1 step).
    """
    if x.dtype != jnp.bfloat16:
        return x.astype(jnp.float32)
    bits = jax.lax.bitcast_convert_type(x, jnp.uint16).astype(jnp.uint32) << 16
    return jax.lax.bitcast_convert_type(bits, jnp.float32)


broadcast.defvjp(_broadcast_fwd, _broadcast_bwd)


def _affine(a, x):
    """A LayerNorm scale or bias, (D,) or stacked (S, D), broadcast against x (S?, ..., D)."""
    return a if a.ndim == 1 else a.reshape(a.shape[0], *(1,) * (x.ndim - 2), a.shape[-1])


def _stats(xf, eps):
    mean = jnp.mean(xf, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(xf - mean), axis=-1, keepdims=True)
    return mean, jax.lax.rsqrt(var + eps)


def layer_norm(params, x, eps: float, lowp: bool = False):
    """LayerNorm over the last axis, computed in float32 and returned in ``x``'s dtype.

    ``params`` None: no affine (adaLN modulates the normalised values instead).
    """
    if lowp and params is not None and x.dtype != jnp.float32:
        # as rows (N, D), or (S, N, D) stacked: the saved input then has one layout, row-major
        scale, bias = params["scale"], params["bias"]
        rows = x.reshape(*scale.shape[:-1], -1, x.shape[-1])
        y = _ln_lowp(rows, _affine(scale, rows), _affine(bias, rows), eps)
        return y.reshape(x.shape)
    xf = x.astype(jnp.float32)
    mean, rstd = _stats(xf, eps)
    y = (xf - mean) * rstd
    if params is not None:
        scale, bias = _affine(params["scale"], x), _affine(params["bias"], x)
        y = y * scale.astype(jnp.float32) + bias.astype(jnp.float32)
    return y.astype(x.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _ln_lowp(x, scale, bias, eps):
    return _ln_lowp_fwd(x, scale, bias, eps)[0]


def _ln_lowp_fwd(x, scale, bias, eps):
    xf = x.astype(jnp.float32)
    # named for the remat policies (maetok_jax.transformer): kept, the backward pass reads
    # them instead of recomputing a row reduction over x
    mean, rstd = (checkpoint_name(s, "norm_stats") for s in _stats(xf, eps))
    y = (xf - mean) * rstd * scale.astype(jnp.float32) + bias.astype(jnp.float32)
    return y.astype(x.dtype), (x, mean, rstd, scale, bias)


def _ln_lowp_bwd(eps, res, dy):
    x, mean, rstd, scale, bias = res
    # the statistics as stored values: XLA would otherwise recompute the mean inside the
    # backward's row-reduction kernel, which then cannot also feed the scale gradient's
    # column sum and writes dy·x̂ to memory in float32 for a second kernel to sum
    mean, rstd = jax.lax.optimization_barrier((mean, rstd))
    xhat = (x.astype(jnp.float32) - mean) * rstd
    dyf = dy.astype(jnp.float32)
    g = dyf * scale.astype(jnp.float32)
    dx = rstd * (
        g - jnp.mean(g, axis=-1, keepdims=True) - xhat * jnp.mean(g * xhat, axis=-1, keepdims=True)
    )
    dscale = _sum_to(dyf * xhat, scale.shape)
    dbias = _sum_to(dyf, bias.shape)
    return dx.astype(x.dtype), dscale.astype(scale.dtype), dbias.astype(bias.dtype)


_ln_lowp.defvjp(_ln_lowp_fwd, _ln_lowp_bwd)


def gelu(x, lowp: bool = False):
    """Exact (erf) GELU; ``lowp`` with a bf16 x: the backward pass keeps only x."""
    if lowp and x.dtype != jnp.float32:
        return _gelu_lowp(x)
    return _gelu_erf(x)


def normal_cdf(x, erf=jax.lax.erf):
    """Φ(x) = ½(1 + erf(x/√2)). XLA computes a float32 erf as one rational polynomial;
    ``jax.nn.gelu``'s erfc evaluates both pieces of a piecewise expansion, with an exponential
    and a division, for every element, and made the MLP's GELU fusions the costliest
    elementwise kernels of the ``base`` step on the GPU. ``erf``: :func:`erf_rational` where
    ``lax.erf`` has no lowering (Pallas' Triton kernels)."""
    return 0.5 * (1.0 + erf(x * (1.0 / math.sqrt(2.0))))


# erf(x) ≈ x·P(x²)/Q(x²) on [-4, 4], ±1 beyond (|error| < 5e-7 in float32)
_ERF_P = (
    -2.72614225801306e-10,
    2.77068142495902e-08,
    -2.10102402082508e-06,
    -5.69250639462346e-05,
    -7.34990630326855e-04,
    -2.95459980854025e-03,
    -1.60960333262415e-02,
)
_ERF_Q = (
    -1.45660718464996e-05,
    -2.13374055278905e-04,
    -1.68282697438203e-03,
    -7.37332916720468e-03,
    -1.42647390514189e-02,
)


def erf_rational(x):
    """A float32 erf from multiplies, adds, one division and a clamp (the kind of rational
    form XLA evaluates for ``lax.erf``, within 6e-7 of it), for kernels that have only those."""

    def horner(t, coefficients):
        acc = jnp.full_like(t, coefficients[0])
        for c in coefficients[1:]:
            acc = acc * t + c
        return acc

    x = jnp.clip(x, -4.0, 4.0)
    x2 = x * x
    return x * horner(x2, _ERF_P) / horner(x2, _ERF_Q)


def _gelu_erf(x):
    """``x · Φ(x)``, the formula torch uses."""
    return x * normal_cdf(x)


@jax.custom_vjp
def _gelu_lowp(x):
    return _gelu_erf(x.astype(jnp.float32)).astype(x.dtype)


def _gelu_lowp_fwd(x):
    return _gelu_lowp(x), x


def gelu_derivative(x, erf=jax.lax.erf):
    """GELU'(x) = Φ(x) + x·φ(x) of a float32 x (``erf``: as in :func:`normal_cdf`)."""
    pdf = jnp.exp(-0.5 * x * x) * (1.0 / math.sqrt(2.0 * math.pi))
    return normal_cdf(x, erf) + x * pdf


def _gelu_lowp_bwd(x, dy):
    return ((dy.astype(jnp.float32) * gelu_derivative(x.astype(jnp.float32))).astype(x.dtype),)


_gelu_lowp.defvjp(_gelu_lowp_fwd, _gelu_lowp_bwd)


def mlp(params, x, lowp: bool = False):
    """Transformer MLP: (..., D) → (..., D) through ``fc1 → GELU → fc2``."""
    h = checkpoint_name(gelu(dense(params["fc1"], x), lowp), "gelu")  # remat "dots_gelu" keeps it
    return dense(params["fc2"], h)


def cast_tree(tree, dtype):
    """Cast every floating leaf (the bf16 compute copy of float32 parameters)."""
    return jax.tree_util.tree_map(lambda a: a.astype(dtype), tree)
