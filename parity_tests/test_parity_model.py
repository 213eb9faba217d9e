"""JAX vs torch, forward pass, unit by unit: patch embed, RoPE, attention, blocks, encoder,
decoders, auxiliary heads, and every loss term of the generator objective.

Parameters come from ``maetok.params.init_params`` (numpy) and go to both backends; every
check draws fresh seeded inputs. The JAX side runs under ``jax.jit`` as a train step
would; torch runs eagerly. Errors are relative to the JAX value (``assert_close(torch,
jax, …)``: max|torch − jax| / max|jax|) and held to ``TOL["forward_fp32"]``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from conftest import TOL, assert_close, to_jax, to_torch

import maetok_jax.attention as ja
import maetok_jax.losses as jl
import maetok_jax.model as jm
import maetok_jax.rope as jr
import maetok_jax.train as jt
import maetok_jax.transformer as jtr
import maetok_torch.attention as ta
import maetok_torch.losses as tl
import maetok_torch.model as tm
import maetok_torch.rope as tr
import maetok_torch.train as tt
import maetok_torch.transformer as ttr
from maetok.config import preset
from maetok.params import init_disc, init_params
from maetok.parity import disc_off_margin
from maetok.targets import target_dim

TINY = preset("tiny")
CONFIGS = {
    "tiny": TINY,
    "mlp": TINY.replace(model={"aux_kind": "mlp"}),
    "adv": TINY.replace(loss={"use_adv": True, "adaptive_weight": True}),
}
FWD = TOL["forward_fp32"]
B = 2


def _images(rng, m, b=B) -> np.ndarray:
    return rng.uniform(-1, 1, (b, m.image_size, m.image_size, m.channels)).astype(np.float32)


def _mask(rng, m, b=B) -> np.ndarray:
    mask = (rng.random((b, m.num_patches)) < rng.uniform(0.3, 0.7)).astype(np.float32)
    mask[0, :2] = (1.0, 0.0)  # never all-masked or all-visible
    return mask


def _normal(rng, *shape, scale=1.0) -> np.ndarray:
    return (scale * rng.standard_normal(shape)).astype(np.float32)


def _params(rng, cfg) -> dict:
    return init_params(cfg, int(rng.integers(1 << 30)))


def _block0(blocks: dict) -> dict:
    return jax.tree_util.tree_map(lambda a: a[0], blocks)


def _tables(m, width, heads, device):
    cj, sj = jr.rope_for(m, width, heads, m.num_latent_tokens)
    ct, st = tr.rope_for(m, width, heads, m.num_latent_tokens, device)
    np.testing.assert_array_equal(np.asarray(cj), ct.cpu().numpy())  # one numpy source
    np.testing.assert_array_equal(np.asarray(sj), st.cpu().numpy())
    return (to_jax(np.asarray(cj)), to_jax(np.asarray(sj))), (ct, st)


# ------------------------------------------------------------------------------ layers


def test_patch_embed_and_unembed(rng, device):
    m = TINY.model
    p = _params(rng, TINY)
    x = _images(rng, m)
    emb_j = jax.jit(jm.patch_embed, static_argnums=2)(
        to_jax(p["encoder"]["patch_embed"]), to_jax(x), m
    )
    emb_t = tm.patch_embed(to_torch(p["encoder"]["patch_embed"], device), to_torch(x, device), m)
    assert_close(emb_t, emb_j, FWD, "patch_embed")
    tokens = _normal(rng, B, m.num_patches, m.dec_width)
    out_j = jax.jit(jm.patch_unembed, static_argnums=2)(
        to_jax(p["decoder"]["head"]), to_jax(tokens), m
    )
    out_t = tm.patch_unembed(to_torch(p["decoder"]["head"], device), to_torch(tokens, device), m)
    assert tuple(out_t.shape) == x.shape
    assert_close(out_t, out_j, FWD, "patch_unembed")


def test_apply_mask(rng, device):
    m = TINY.model
    x, mask = _normal(rng, B, m.num_patches, m.enc_width), _mask(rng, m)
    token = _normal(rng, m.enc_width)
    out_j = jax.jit(jm.apply_mask)(to_jax(x), to_jax(mask), to_jax(token))
    out_t = tm.apply_mask(to_torch(x, device), to_torch(mask, device), to_torch(token, device))
    assert_close(out_t, out_j, 0.0, "apply_mask")  # a blend with 0/1 weights: exact


def test_apply_rope(rng, device):
    m = TINY.model
    (cj, sj), (ct, st) = _tables(m, m.enc_width, m.enc_heads, device)
    k = m.enc_width // m.enc_heads
    q = _normal(rng, B, m.num_patches + m.num_latent_tokens, m.enc_heads, k)
    out_j = jax.jit(jr.apply_rope)(to_jax(q), cj, sj)
    out_t = tr.apply_rope(to_torch(q, device), ct, st)
    assert_close(out_t, out_j, FWD, "apply_rope")
    # latent tokens (after the N image tokens) are not rotated
    np.testing.assert_array_equal(out_t[:, m.num_patches :].cpu().numpy(), q[:, m.num_patches :])


def test_attention_plain(rng, device):
    m = TINY.model
    (cj, sj), (ct, st) = _tables(m, m.enc_width, m.enc_heads, device)
    blk = _block0(_params(rng, TINY)["encoder"]["blocks"])
    attn = {"qkv": blk["qkv"], "proj": blk["proj"]}
    x = _normal(rng, B, m.num_patches + m.num_latent_tokens, m.enc_width)
    out_j = jax.jit(ja.attention, static_argnums=(4, 5))(
        to_jax(attn), to_jax(x), cj, sj, m.enc_heads, "plain"
    )
    out_t = ta.attention(to_torch(attn, device), to_torch(x, device), ct, st, m.enc_heads, "plain")
    assert_close(out_t, out_j, FWD, "attention/plain")


@pytest.mark.parametrize("backend", ["jax", "torch"])
def test_attention_fused_matches_plain(backend, rng, device):
    """Within each backend: the framework kernel computes the pinned plain attention."""
    m = TINY.model
    (cj, sj), (ct, st) = _tables(m, m.enc_width, m.enc_heads, device)
    blk = _block0(_params(rng, TINY)["encoder"]["blocks"])
    attn = {"qkv": blk["qkv"], "proj": blk["proj"]}
    x = _normal(rng, B, m.num_patches + m.num_latent_tokens, m.enc_width)
    if backend == "jax":
        f = jax.jit(ja.attention, static_argnums=(4, 5))
        plain = f(to_jax(attn), to_jax(x), cj, sj, m.enc_heads, "plain")
        fused = f(to_jax(attn), to_jax(x), cj, sj, m.enc_heads, "fused")
    else:
        pt, xt = to_torch(attn, device), to_torch(x, device)
        plain = ta.attention(pt, xt, ct, st, m.enc_heads, "plain")
        fused = ta.attention(pt, xt, ct, st, m.enc_heads, "fused")
    assert_close(fused, plain, FWD, f"{backend}: fused vs plain")


def test_block_and_transformer(rng, device):
    m = TINY.model
    (cj, sj), (ct, st) = _tables(m, m.enc_width, m.enc_heads, device)
    blocks = _params(rng, TINY)["encoder"]["blocks"]
    x = _normal(rng, B, m.num_patches + m.num_latent_tokens, m.enc_width)
    args = (m.enc_heads, m.ln_eps, "plain")
    out_j = jax.jit(jtr.block, static_argnums=(4, 5, 6))(
        to_jax(_block0(blocks)), to_jax(x), cj, sj, *args
    )
    out_t = ttr.block(to_torch(_block0(blocks), device), to_torch(x, device), ct, st, *args)
    assert_close(out_t, out_j, FWD, "block")
    out_j = jax.jit(jtr.transformer, static_argnums=(4, 5, 6))(
        to_jax(blocks), to_jax(x), cj, sj, *args
    )
    out_t = ttr.transformer(to_torch(blocks, device), to_torch(x, device), ct, st, *args)
    assert_close(out_t, out_j, FWD, "transformer")


# ------------------------------------------------------------------------------ model


def test_encode(rng, device):
    m = TINY.model
    enc = _params(rng, TINY)["encoder"]
    x, mask = _images(rng, m), _mask(rng, m)
    h_j = jax.jit(jm.encode, static_argnums=3)(to_jax(enc), to_jax(x), to_jax(mask), m)
    h_t = tm.encode(to_torch(enc, device), to_torch(x, device), to_torch(mask, device), m)
    assert h_t.dtype == torch.float32 and tuple(h_t.shape) == (B, m.num_latent_tokens, m.latent_dim)
    assert_close(h_t, h_j, FWD, "encode")


@pytest.mark.parametrize("query_pos", [False, True])
def test_decode(query_pos, rng, device):
    cfg = TINY.replace(model={"query_pos": query_pos})
    m = cfg.model
    dec = _params(rng, cfg)["decoder"]
    assert ("query_pos" in dec) == query_pos
    h = _normal(rng, B, m.num_latent_tokens, m.latent_dim)
    (img_j, feats_j) = jax.jit(jm.decode, static_argnums=2)(to_jax(dec), to_jax(h), m)
    img_t, feats_t = tm.decode(to_torch(dec, device), to_torch(h, device), m)
    assert_close(img_t, img_j, FWD, "decode/images")
    assert_close(feats_t, feats_j, FWD, "decode/features")


def test_decode_latents_aux_decoder(rng, device):
    m = TINY.model
    name = m.aux_targets[0]
    aux = _params(rng, TINY)["aux"][name]
    h = _normal(rng, B, m.num_latent_tokens, m.latent_dim)
    out_j, feats_j = jax.jit(jm.decode_latents, static_argnums=(2, 3))(
        to_jax(aux), to_jax(h), m, m.aux_heads
    )
    out_t, feats_t = tm.decode_latents(to_torch(aux, device), to_torch(h, device), m, m.aux_heads)
    assert tuple(out_t.shape) == (B, m.num_patches, target_dim(name, m))
    assert_close(out_t, out_j, FWD, f"decode_latents/{name}")
    assert_close(feats_t, feats_j, FWD, f"decode_latents/{name}/features")


def test_aux_mlp(rng, device):
    m = CONFIGS["mlp"].model
    name = m.aux_targets[-1]
    p = _params(rng, CONFIGS["mlp"])["aux"][name]
    feats = _normal(rng, B, m.num_patches, m.dec_width)
    out_j = jax.jit(jm.aux_mlp, static_argnums=2)(to_jax(p), to_jax(feats), m)
    out_t = tm.aux_mlp(to_torch(p, device), to_torch(feats, device), m)
    assert_close(out_t, out_j, FWD, f"aux_mlp/{name}")


@pytest.mark.parametrize("kind", ["tiny", "mlp"])
def test_aux_predict(kind, rng, device):
    cfg = CONFIGS[kind]
    m = cfg.model
    aux = _params(rng, cfg)["aux"]
    h = _normal(rng, B, m.num_latent_tokens, m.latent_dim)
    feats = _normal(rng, B, m.num_patches, m.dec_width)
    out_j = jax.jit(jm.aux_predict, static_argnums=3)(to_jax(aux), to_jax(h), to_jax(feats), m)
    out_t = tm.aux_predict(to_torch(aux, device), to_torch(h, device), to_torch(feats, device), m)
    assert list(out_t) == list(m.aux_targets)
    assert_close(out_t, out_j, FWD, f"aux_predict/{kind}")


# ------------------------------------------------------------------------------ losses


def test_mask_loss(rng, device):
    m = TINY.model
    lo = TINY.replace(loss={"gamma": {"hog": 0.5, "pixel": 2.0}}).loss
    dims = {n: target_dim(n, m) for n in m.aux_targets}
    preds = {n: _normal(rng, B, m.num_patches, d) for n, d in dims.items()}
    targets = {n: _normal(rng, B, m.num_patches, d) for n, d in dims.items()}
    mask = _mask(rng, m)
    total_j, terms_j = jax.jit(jl.mask_loss, static_argnums=3)(
        to_jax(preds), to_jax(targets), to_jax(mask), lo
    )
    total_t, terms_t = tl.mask_loss(
        to_torch(preds, device), to_torch(targets, device), to_torch(mask, device), lo
    )
    assert_close(terms_t, terms_j, FWD, "mask_loss/terms")
    assert_close(total_t, total_j, FWD, "mask_loss/total")
    # no masked token → exactly 0 in both
    zero = np.zeros_like(mask)
    assert (
        float(
            tl.mask_loss(
                to_torch(preds, device), to_torch(targets, device), to_torch(zero, device), lo
            )[0]
        )
        == 0.0
    )
    assert float(jl.mask_loss(to_jax(preds), to_jax(targets), to_jax(zero), lo)[0]) == 0.0


@pytest.mark.parametrize("kind", ["mse", "l1"])
def test_reconstruction_loss(kind, rng, device):
    m = TINY.model
    x = _images(rng, m)
    r = (x + 0.3 * _normal(rng, *x.shape)).astype(np.float32)
    out_j = jax.jit(jl.reconstruction_loss, static_argnums=2)(to_jax(x), to_jax(r), kind)
    out_t = tl.reconstruction_loss(to_torch(x, device), to_torch(r, device), kind)
    assert_close(out_t, out_j, FWD, f"reconstruction_loss/{kind}")


@pytest.mark.parametrize("rec", ["mse", "l1"])
def test_nll_loss(rec, rng, device):
    cfg = TINY.replace(loss={"rec": rec, "lambda_percep": 0.7})
    x = _images(rng, cfg.model)
    r = np.clip(x + 0.2 * _normal(rng, *x.shape), -1, 1).astype(np.float32)
    out_j = jax.jit(jl.nll_loss, static_argnums=(2, 3))(to_jax(x), to_jax(r), cfg.model, cfg.loss)
    out_t = tl.nll_loss(to_torch(x, device), to_torch(r, device), cfg.model, cfg.loss)
    assert_close(list(out_t), list(out_j), FWD, f"nll_loss/{rec}")


def test_adaptive_adv_weight(rng, device):
    cfg = CONFIGS["adv"]
    m, lo = cfg.model, cfg.loss
    x = _images(rng, m)
    r = np.clip(x + 0.2 * _normal(rng, *x.shape), -1, 1).astype(np.float32)
    feats = _normal(rng, B, m.num_patches, m.dec_width)
    disc = init_disc(cfg, int(rng.integers(1 << 30)))
    w_j = jax.jit(jl.adaptive_adv_weight, static_argnums=(4, 5))(
        to_jax(x), to_jax(r), to_jax(feats), to_jax(disc), m, lo
    )
    w_t = tl.adaptive_adv_weight(
        to_torch(x, device),
        to_torch(r, device),
        to_torch(feats, device),
        to_torch(disc, device),
        m,
        lo,
    )
    assert 0 < float(w_t) < 1e4
    assert_close(w_t, w_j, FWD, "adaptive_adv_weight")


@pytest.mark.parametrize("name", list(CONFIGS))
def test_generator_loss_stage1(name, rng, device):
    """The full Stage-1 objective and every entry of its metrics dict."""
    cfg = CONFIGS[name]
    m = cfg.model
    params = _params(rng, cfg)
    x, mask = _images(rng, m), _mask(rng, m)
    disc = disc_off_margin(init_disc(cfg, 1), x, m) if cfg.loss.use_adv else None
    targets = {n: _normal(rng, B, m.num_patches, target_dim(n, m)) for n in m.aux_targets}

    def loss_j(p, d, x, k, tg):
        return jt.generator_loss(p, {}, d, x, k, tg, jnp.float32(1.0), cfg)

    disc_j = to_jax(disc) if disc else None
    disc_t = to_torch(disc, device) if disc else None
    total_j, (metrics_j, recon_j) = jax.jit(loss_j)(
        to_jax(params), disc_j, to_jax(x), to_jax(mask), to_jax(targets)
    )
    with torch.no_grad():
        total_t, (metrics_t, recon_t) = tt.generator_loss(
            to_torch(params, device),
            {},
            disc_t,
            to_torch(x, device),
            to_torch(mask, device),
            to_torch(targets, device),
            torch.ones((), device=device),
            cfg,
        )
    assert set(metrics_t) == set(metrics_j)
    assert_close(recon_t, recon_j, FWD, f"{name}/recon")
    assert_close(total_t, total_j, FWD, f"{name}/total")
    assert_close(metrics_t, dict(metrics_j), FWD, f"{name}/metrics")
