"""The tokenizer: patch embed, masked encoder, pixel decoder, aux decoders (docs/design.md §3).

Shapes (docs/design.md §2): B batch, H×W×C image, p patch, N image tokens, L latent tokens,
D width. The encoder reads ``[x_masked ; z + pos_z]`` (N + L tokens, image tokens first,
so RoPE rotates positions ``< N`` only); the pixel decoder reads
``[e ; dense(h) + pos_h]`` and keeps the first N outputs.

Every function is deterministic: masks come in as arguments (STYLE habit 5). With
``compute_dtype = "bfloat16"`` the parameters are cast once per call and the outputs are
returned in float32; LayerNorm statistics and softmax run in float32 either way.

Each part runs under a ``jax.named_scope`` (encoder, decoder, aux_decoders) so a GPU
profile attributes its time. ``model.stack_aux``: the ViT auxiliary decoders, identical
but for their heads, run as one stacked decoder (``latent_decoder_stacked``); their
parameters are stacked at call time, so the parameter tree stays one subtree per target.
"""

import jax
import jax.numpy as jnp

from maetok_jax.layers import add_bias, broadcast, cast_tree, dense, gelu, layer_norm
from maetok_jax.patches import patchify, unpatchify
from maetok_jax.rope import rope_for
from maetok_jax.transformer import transformer


def compute_dtype(m):
    return jnp.bfloat16 if m.compute_dtype == "bfloat16" else jnp.float32


def stack_options(m) -> dict:
    """The compute-only switches every transformer stack takes (``maetok.config``)."""
    return dict(
        impl=m.attention, unroll=m.unroll, remat=m.remat, lowp=m.lowp_norm, split_qkv=m.split_qkv
    )


def patch_embed(params, images, m):
    """P: (B, H, W, C) → (B, N, D_enc)."""
    return dense(params, patchify(images, m.patch_size))


def patch_unembed(params, tokens, m):
    """P⁻¹: (B, N, D) → (B, H, W, C) through the dense ``head`` to p·p·C."""
    h = w = m.image_size
    return unpatchify(dense(params, tokens), m.patch_size, h, w, m.channels)


def apply_mask(tokens, mask, mask_token):
    """Replace masked tokens (mask (B, N), 1 = masked) by the learnable ``mask_token`` (D,)."""
    # the mask token's gradient, summed over every masked token, is summed in float32
    keep = (1.0 - mask)[..., None].astype(tokens.dtype)
    return tokens * keep + broadcast(mask_token.astype(tokens.dtype), tokens.shape) * (1.0 - keep)


def encode(params, images, mask, m):
    """Encoder E: images (B, H, W, C), mask (B, N) → latent tokens h (B, L, latent_dim), float32."""
    with jax.named_scope("encoder"):
        return _encode(params, images, mask, m)


def _encode(params, images, mask, m):
    dt = compute_dtype(m)
    p = cast_tree(params, dt)
    x = patch_embed(p["patch_embed"], images.astype(dt), m)  # (B, N, D)
    x = apply_mask(x, mask, p["mask_token"])
    b = x.shape[0]
    z = broadcast(p["latent_tokens"] + p["latent_pos"], (b, *p["latent_tokens"].shape))
    t = jnp.concatenate([x, z], axis=1)  # (B, N + L, D)
    cos, sin = rope_for(m, m.enc_width, m.enc_heads, m.num_latent_tokens)
    t = transformer(p["blocks"], t, cos, sin, m.enc_heads, m.ln_eps, **stack_options(m))
    t = layer_norm(p["norm"], t, m.ln_eps, m.lowp_norm)
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
    feats = _latent_trunk(p, h.astype(dt), m, heads)
    return dense(p["head"], feats), feats


def _latent_trunk(p, h, m, heads: int):
    """A latent decoder up to its final LayerNorm: → features (S?, B, N, D).

    ``p`` may hold S stacked decoders (leaves (S, ...), blocks (depth, S, ...)); h (B, L,
    latent_dim) is shared by all of them.
    """
    b, n = h.shape[0], m.num_patches
    width = p["query"].shape[-1]
    stack = p["query"].shape[:-1] if p["query"].ndim == 2 else ()  # (S,) or ()
    q = p["query"][..., None, :]  # (S?, 1, D)
    if m.query_pos:
        q = q + p["query_pos"]  # (S?, N, D)
    e = broadcast(q[..., None, :, :], (*stack, b, n, width))
    lat = dense(p["latent_proj"], jnp.broadcast_to(h, (*stack, *h.shape)))  # (S?, B, L, D)
    lat = add_bias(lat, p["latent_pos"][..., None, :, :])
    t = jnp.concatenate([e, lat], axis=-2)  # (S?, B, N + L, D)
    cos, sin = rope_for(m, width, heads, m.num_latent_tokens)
    t = transformer(p["blocks"], t, cos, sin, heads, m.ln_eps, **stack_options(m))
    return layer_norm(p["norm"], t, m.ln_eps, m.lowp_norm)[..., :n, :]  # (S?, B, N, D)


def stackable_aux(m) -> bool:
    """Whether the auxiliary decoders run as one stack: ViT decoders, two or more, switched on."""
    return m.stack_aux and m.aux_kind == "vit" and len(m.aux_targets) > 1


def latent_decoder_stacked(params, h, m, heads: int):
    """The latent decoders ``params`` {name: decoder} of equal shapes as one stacked
    computation: → {name: (head output (B, N, out_j), features (B, N, D))}.

    Every leaf but the per-target ``head`` is stacked along a new axis S (blocks: (depth,
    S, ...), so the depth scan still leads); each dense is then one batched matmul.
    """
    names = list(params)
    dt = compute_dtype(m)
    trunks = [{k: v for k, v in params[name].items() if k != "head"} for name in names]
    stacked = jax.tree_util.tree_map(lambda *a: jnp.stack(a).astype(dt), *trunks)
    stacked["blocks"] = jax.tree_util.tree_map(lambda a: jnp.swapaxes(a, 0, 1), stacked["blocks"])
    feats = _latent_trunk(stacked, h.astype(dt), m, heads)  # (S, B, N, D)
    heads_out = [dense(cast_tree(params[k]["head"], dt), feats[i]) for i, k in enumerate(names)]
    return {k: (heads_out[i], feats[i]) for i, k in enumerate(names)}


def decode(params, h, m):
    """Pixel decoder: h (B, L, latent_dim) → (images (B, H, W, C) float32, feats (B, N, D_dec))."""
    with jax.named_scope("decoder"):
        tokens, feats = latent_decoder(params, h, m, m.dec_heads)
    images = unpatchify(tokens, m.patch_size, m.image_size, m.image_size, m.channels)
    return images.astype(jnp.float32), feats


def aux_mlp(params, feats, m):
    """The seed's auxiliary head: 3-layer GELU MLP on decoder feats (B, N, D_dec) → (B, N, D_j)."""
    p = cast_tree(params, compute_dtype(m))
    x = gelu(dense(p["fc1"], feats), m.lowp_norm)
    x = gelu(dense(p["fc2"], x), m.lowp_norm)
    return dense(p["fc3"], x)


def aux_predict(params, h, dec_feats, m):
    """Every auxiliary decoder's prediction, {target: (B, N, D_j) float32}."""
    with jax.named_scope("aux_decoders"):
        if stackable_aux(m):
            out = latent_decoder_stacked({k: params[k] for k in m.aux_targets}, h, m, m.aux_heads)
            return {k: out[k][0].astype(jnp.float32) for k in m.aux_targets}
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
