"""The tokenizer: patch embed, masked encoder, pixel decoder, aux decoders (docs/design.md §3).

Shapes (docs/design.md §2): B batch, H×W×C image, p patch, N image tokens, L latent tokens,
D width. The encoder reads ``[x_masked ; z + pos_z]`` (N + L tokens, image tokens first,
so RoPE rotates positions ``< N`` only); the pixel decoder reads
``[e ; dense(h) + pos_h]`` and keeps the first N outputs.

Every function is deterministic: masks come in as arguments (STYLE habit 5). With
``compute_dtype = "bfloat16"`` the parameters are cast once per call and the outputs are
returned in float32; LayerNorm and softmax run in float32 either way.
"""

import jax.numpy as jnp

from maetok_jax.layers import cast_tree, dense, gelu, layer_norm
from maetok_jax.patches import patchify, unpatchify
from maetok_jax.rope import rope_for
from maetok_jax.transformer import transformer


def compute_dtype(m):
    return jnp.bfloat16 if m.compute_dtype == "bfloat16" else jnp.float32


def patch_embed(params, images, m):
    """P: (B, H, W, C) → (B, N, D_enc)."""
    return dense(params, patchify(images, m.patch_size))


def patch_unembed(params, tokens, m):
    """P⁻¹: (B, N, D) → (B, H, W, C) through the dense ``head`` to p·p·C."""
    h = w = m.image_size
    return unpatchify(dense(params, tokens), m.patch_size, h, w, m.channels)


def apply_mask(tokens, mask, mask_token):
    """Replace masked tokens (mask (B, N), 1 = masked) by the learnable ``mask_token`` (D,)."""
    keep = (1.0 - mask)[..., None].astype(tokens.dtype)
    return tokens * keep + mask_token.astype(tokens.dtype) * (1.0 - keep)


def encode(params, images, mask, m):
    """Encoder E: images (B, H, W, C), mask (B, N) → latent tokens h (B, L, latent_dim), float32."""
    dt = compute_dtype(m)
    p = cast_tree(params, dt)
    x = patch_embed(p["patch_embed"], images.astype(dt), m)  # (B, N, D)
    x = apply_mask(x, mask, p["mask_token"])
    b = x.shape[0]
    z = jnp.broadcast_to(p["latent_tokens"] + p["latent_pos"], (b, *p["latent_tokens"].shape))
    t = jnp.concatenate([x, z], axis=1)  # (B, N + L, D)
    cos, sin = rope_for(m, m.enc_width, m.enc_heads, m.num_latent_tokens)
    t = transformer(p["blocks"], t, cos, sin, m.enc_heads, m.ln_eps, m.attention, m.unroll, m.remat)
    t = layer_norm(p["norm"], t, m.ln_eps)
    h = dense(p["bottleneck"], t[:, m.num_patches :])  # (B, L, latent_dim)
    return h.astype(jnp.float32)


def latent_decoder(params, h, m, heads: int):
    """A latent decoder: h (B, L, latent_dim) → (head output (B, N, out), features (B, N, D)).

    Shared by the pixel decoder and the ViT auxiliary decoders; image positions start as
    the same learnable query ``e`` and are told apart by RoPE alone, unless
    ``m.query_pos`` adds a learnable absolute position (N, D) to each.
    """
    dt = compute_dtype(m)
    p = cast_tree(params, dt)
    b, n = h.shape[0], m.num_patches
    width = p["query"].shape[0]
    q = p["query"] + p["query_pos"] if m.query_pos else p["query"]  # (D,) or (N, D)
    e = jnp.broadcast_to(q, (b, n, width))
    lat = dense(p["latent_proj"], h.astype(dt)) + p["latent_pos"]  # (B, L, D)
    t = jnp.concatenate([e, lat], axis=1)  # (B, N + L, D)
    cos, sin = rope_for(m, width, heads, m.num_latent_tokens)
    t = transformer(p["blocks"], t, cos, sin, heads, m.ln_eps, m.attention, m.unroll, m.remat)
    feats = layer_norm(p["norm"], t, m.ln_eps)[:, :n]  # (B, N, D)
    return dense(p["head"], feats), feats


def decode(params, h, m):
    """Pixel decoder: h (B, L, latent_dim) → (images (B, H, W, C) float32, feats (B, N, D_dec))."""
    tokens, feats = latent_decoder(params, h, m, m.dec_heads)
    images = unpatchify(tokens, m.patch_size, m.image_size, m.image_size, m.channels)
    return images.astype(jnp.float32), feats


def aux_mlp(params, feats, m):
    """The seed's auxiliary head: 3-layer GELU MLP on decoder feats (B, N, D_dec) → (B, N, D_j)."""
    p = cast_tree(params, compute_dtype(m))
    x = gelu(dense(p["fc1"], feats))
    x = gelu(dense(p["fc2"], x))
    return dense(p["fc3"], x)


def aux_predict(params, h, dec_feats, m):
    """Every auxiliary decoder's prediction, {target: (B, N, D_j) float32}."""
    preds = {}
    for name in m.aux_targets:
        if m.aux_kind == "vit":
            out, _ = latent_decoder(params[name], h, m, m.aux_heads)
        else:
            out = aux_mlp(params[name], dec_feats, m)
        preds[name] = out.astype(jnp.float32)
    return preds


def forward(params, images, mask, m, with_aux: bool = True):
    """The whole tokenizer: → (reconstruction (B, H, W, C), h (B, L, latent_dim), aux preds)."""
    h = encode(params["encoder"], images, mask, m)
    recon, feats = decode(params["decoder"], h, m)
    preds = aux_predict(params["aux"], h, feats, m) if with_aux else {}
    return recon, h, preds
