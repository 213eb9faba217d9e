"""The latent diffusion transformer: a DiT with adaLN-Zero blocks (docs/design.md §11).

Over ``maetok.params.spec_dit``. Shapes: B batch, L latent tokens, h channels per token,
D width. The network reads the interpolated latents x (B, L, h), the time t (B,) in [0, 1]
and the class y (B,) (``num_classes`` is the null class) and returns the velocity
(B, L, h), float32::

    c  = t_mlp(sinusoid(t)) + y_embed[y]                         (B, D)
    z  = x_embed(x) + pos                                        (B, L, D)
    z ← z + gate₁ · Attn(LN(z)·(1 + scale₁) + shift₁)            per block, modulations
    z ← z + gate₂ · MLP(LN(z)·(1 + scale₂) + shift₂)             from ada(SiLU(c))
    v  = head(LN(z)·(1 + scale) + shift)                         from final_ada(SiLU(c))

LayerNorms have no affine (adaLN sets shift and scale); attention has no RoPE (positions
are learned). The time MLP uses SiLU, the block MLPs the project's exact GELU. With
``compute_dtype = "bfloat16"`` parameters are cast once per call; LayerNorm, softmax and
the sinusoid run in float32.
"""

import jax
import jax.numpy as jnp

from maetok_jax.attention import attention
from maetok_jax.layers import add_bias, cast_tree, dense, layer_norm, mlp

# t ∈ [0, 1] is spread over the sinusoid's periods like a diffusion step index in [0, 1000].
TIME_SCALE = 1000.0
MAX_PERIOD = 10000.0


def compute_dtype(cfg):
    return jnp.bfloat16 if cfg.compute_dtype == "bfloat16" else jnp.float32


def timestep_embedding(t, dim: int):
    """t (B,) → (B, dim) float32: [cos(s·t·f_k) | sin(s·t·f_k)], s = TIME_SCALE,

    with frequencies f_k = MAX_PERIOD^(−k/(dim/2)), k < dim/2.
    """
    half = dim // 2
    freqs = jnp.exp(-jnp.log(MAX_PERIOD) * jnp.arange(half, dtype=jnp.float32) / half)
    args = (TIME_SCALE * t.astype(jnp.float32))[:, None] * freqs[None]  # (B, dim/2)
    return jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)


def modulate(x, shift, scale):
    """x (B, L, D) with per-sample shift/scale (B, D): ``x·(1 + scale) + shift``."""
    return x * (1 + scale[:, None]) + shift[:, None]


def dit_block(params, z, c, cfg):
    """One adaLN-Zero block on z (B, L, D), conditioned on c = SiLU(cond) (B, D)."""
    mods = jnp.split(dense(params["ada"], c), 6, axis=-1)  # six (B, D)
    shift1, scale1, gate1, shift2, scale2, gate2 = mods
    attn_params = {"qkv": params["qkv"], "proj": params["proj"]}
    u = modulate(layer_norm(None, z, cfg.ln_eps), shift1, scale1)
    z = z + gate1[:, None] * attention(attn_params, u, None, None, cfg.heads, cfg.attention)
    u = modulate(layer_norm(None, z, cfg.ln_eps), shift2, scale2)
    mlp_params = {"fc1": params["fc1"], "fc2": params["fc2"]}
    return z + gate2[:, None] * mlp(mlp_params, u)


def condition(params, t, y, cfg):
    """The conditioning vector SiLU(time embedding + class embedding), (B, D)."""
    dt = params["y_embed"].dtype
    temb = timestep_embedding(t, cfg.time_freq_dim).astype(dt)  # (B, F)
    temb = dense(params["t_mlp"]["fc2"], jax.nn.silu(dense(params["t_mlp"]["fc1"], temb)))
    return jax.nn.silu(temb + params["y_embed"][y])


def dit(params, x, t, y, cfg):
    """Velocity v (B, L, h) float32 of latents x (B, L, h) at times t (B,), classes y (B,)."""
    p = cast_tree(params, compute_dtype(cfg))
    c = condition(p, t, y, cfg)  # (B, D)
    z = add_bias(dense(p["x_embed"], x.astype(c.dtype)), p["pos"])  # (B, L, D)

    def body(h, block_params):
        return dit_block(block_params, h, c, cfg), None

    z, _ = jax.lax.scan(body, z, p["blocks"])
    shift, scale = jnp.split(dense(p["final_ada"], c), 2, axis=-1)
    z = modulate(layer_norm(None, z, cfg.ln_eps), shift, scale)
    return dense(p["head"], z).astype(jnp.float32)
