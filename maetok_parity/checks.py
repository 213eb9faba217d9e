"""The JAX-vs-torch checks: each a small function ``check(case) → [(name, error, tolerance)]``.

A check reads ``case.cfg`` (the config, compute dtype included), draws its inputs from
``case.rng``, runs the same numpy inputs and ``maetok.params`` parameters through both
backends — the JAX side under ``jax.jit`` as a train step would, torch eagerly — and returns
one row per comparison, the error relative to the JAX value. Facts that are not a matter of
tolerance (shapes, dtypes, key sets, a group the stage must not touch) are asserted.

``parity_tests/`` runs every check on its configs and asserts each row; ``maetok parity``
runs ``REPORT`` on a preset (``run``). Section numbers of docs/design.md describe what each
unit computes.
"""

from __future__ import annotations

import dataclasses
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import torch

import maetok_jax.attention as ja
import maetok_jax.backend as jb
import maetok_jax.discriminator as jd
import maetok_jax.losses as jl
import maetok_jax.model as jm
import maetok_jax.optim as jo
import maetok_jax.perceptual as jp
import maetok_jax.rope as jr
import maetok_jax.targets as jtg
import maetok_jax.train as jt
import maetok_jax.transformer as jtr
import maetok_torch.attention as ta
import maetok_torch.backend as tb
import maetok_torch.discriminator as td
import maetok_torch.losses as tl
import maetok_torch.model as tm
import maetok_torch.optim as to
import maetok_torch.perceptual as tp
import maetok_torch.rope as tr
import maetok_torch.targets as ttg
import maetok_torch.train as tt
import maetok_torch.transformer as ttr
from maetok.data import BatchSource
from maetok.filters import PERCEP_LEVELS
from maetok.parity import TOL, TRAJECTORY_STEPS, parity_config, tree_err, worst_update
from maetok.synthetic import SyntheticImages
from maetok.targets import target_dim
from maetok.train_state import start_stage2, trainable_keys
from maetok.tree import flatten
from maetok_parity.harness import (
    Case,
    exact,
    jax_device,
    jax_step,
    max_abs,
    pinned_precision,
    row,
)

# ------------------------------------------------------------------------------ layers


def _block0(blocks: dict) -> dict:
    return jax.tree_util.tree_map(lambda a: a[0], blocks)


def _rope_tables(case: Case, width: int, heads: int):
    """The RoPE tables of both backends, placed, and a row saying they are one numpy table."""
    m = case.cfg.model
    cj, sj = jr.rope_for(m, width, heads, m.num_latent_tokens)
    ct, st = tr.rope_for(m, width, heads, m.num_latent_tokens, torch.device(case.device))
    same = max(max_abs(ct.cpu(), cj), max_abs(st.cpu(), sj))
    return (case.jax(np.asarray(cj)), case.jax(np.asarray(sj))), (ct, st), same


def patch_embed(case: Case):
    """Patchify + linear embedding, and its inverse head (design §3.1)."""
    m = case.cfg.model
    p = case.params()
    x = case.images()
    emb_j = jax.jit(jm.patch_embed, static_argnums=2)(
        case.jax(p["encoder"]["patch_embed"], True), case.jax(x, True), m
    )
    emb_t = tm.patch_embed(case.torch(p["encoder"]["patch_embed"], True), case.torch(x, True), m)
    tokens = case.normal(x.shape[0], m.num_patches, m.dec_width)
    out_j = jax.jit(jm.patch_unembed, static_argnums=2)(
        case.jax(p["decoder"]["head"], True), case.jax(tokens, True), m
    )
    out_t = tm.patch_unembed(case.torch(p["decoder"]["head"], True), case.torch(tokens, True), m)
    assert tuple(out_t.shape) == x.shape
    return [
        row("forward/patch_embed", emb_t, emb_j, case.forward_tol),
        row("forward/patch_unembed", out_t, out_j, case.forward_tol),
    ]


def apply_mask(case: Case):
    """Masked tokens replaced by the mask token: a blend with 0/1 weights, exact."""
    m = case.cfg.model
    x, mask = case.normal(2, m.num_patches, m.enc_width), case.mask()
    token = case.normal(m.enc_width)
    out_j = jax.jit(jm.apply_mask)(case.jax(x), case.jax(mask), case.jax(token))
    out_t = tm.apply_mask(case.torch(x), case.torch(mask), case.torch(token))
    return [row("forward/apply_mask", out_t, out_j, 0.0)]


def rope(case: Case):
    """Axial 2D RoPE on the image tokens; the latent tokens after them are not rotated."""
    m = case.cfg.model
    (cj, sj), (ct, st), same = _rope_tables(case, m.enc_width, m.enc_heads)
    k = m.enc_width // m.enc_heads
    q = case.normal(2, m.num_patches + m.num_latent_tokens, m.enc_heads, k)
    out_j = jax.jit(jr.apply_rope)(case.jax(q, True), cj, sj)
    out_t = tr.apply_rope(case.torch(q, True), ct, st)
    latents = out_t[:, m.num_patches :].float().cpu().numpy()
    want = case.torch(q, True)[:, m.num_patches :].float().cpu().numpy()
    return [
        ("forward/rope tables (one numpy source)", same, 0.0),
        row("forward/rope", out_t, out_j, case.forward_tol),
        exact("forward/rope: latent tokens unrotated", latents, want),
    ]


def _attention_inputs(case: Case):
    m = case.cfg.model
    (cj, sj), (ct, st), _ = _rope_tables(case, m.enc_width, m.enc_heads)
    blk = _block0(case.params()["encoder"]["blocks"])
    attn = {"qkv": blk["qkv"], "proj": blk["proj"]}
    x = case.normal(2, m.num_patches + m.num_latent_tokens, m.enc_width)
    return attn, x, (cj, sj), (ct, st)


def attention(case: Case):
    """Multi-head self-attention with RoPE, with the config's kernel (design §3.2)."""
    m = case.cfg.model
    attn, x, (cj, sj), (ct, st) = _attention_inputs(case)
    out_j = jax.jit(ja.attention, static_argnums=(4, 5))(
        case.jax(attn, True), case.jax(x, True), cj, sj, m.enc_heads, m.attention
    )
    out_t = ta.attention(
        case.torch(attn, True), case.torch(x, True), ct, st, m.enc_heads, m.attention
    )
    return [row(f"forward/attention ({m.attention})", out_t, out_j, case.forward_tol)]


def attention_kernels(case: Case):
    """Within each backend: each kernel ("fused", "flash") computes the pinned plain one."""
    m = case.cfg.model
    attn, x, (cj, sj), (ct, st) = _attention_inputs(case)
    f = jax.jit(ja.attention, static_argnums=(4, 5))
    pt, xt = case.torch(attn), case.torch(x)
    plain_j = f(case.jax(attn), case.jax(x), cj, sj, m.enc_heads, "plain")
    plain_t = ta.attention(pt, xt, ct, st, m.enc_heads, "plain")
    tol = TOL["forward_fp32"]
    rows = []
    for kernel in ("fused", "flash"):
        out_j = f(case.jax(attn), case.jax(x), cj, sj, m.enc_heads, kernel)
        out_t = ta.attention(pt, xt, ct, st, m.enc_heads, kernel)
        rows.append(row(f"jax: attention {kernel} vs plain", out_j, plain_j, tol))
        rows.append(row(f"torch: attention {kernel} vs plain", out_t, plain_t, tol))
    return rows


def transformer(case: Case):
    """One pre-LN block and the stacked blocks (design §3.2)."""
    m = case.cfg.model
    (cj, sj), (ct, st), _ = _rope_tables(case, m.enc_width, m.enc_heads)
    blocks = case.params()["encoder"]["blocks"]
    x = case.normal(2, m.num_patches + m.num_latent_tokens, m.enc_width)
    args = (m.enc_heads, m.ln_eps, m.attention)
    out = []
    for name, fj, ft, p in (
        ("block", jtr.block, ttr.block, _block0(blocks)),
        ("transformer", jtr.transformer, ttr.transformer, blocks),
    ):
        y_j = jax.jit(fj, static_argnums=(4, 5, 6))(case.jax(p), case.jax(x), cj, sj, *args)
        y_t = ft(case.torch(p), case.torch(x), ct, st, *args)
        out.append(row(f"forward/{name}", y_t, y_j, TOL["forward_fp32"]))
    return out


# ------------------------------------------------------------------------------ model


def encoder(case: Case):
    """The encoder: images and a token mask → latent tokens h (design §3.3)."""
    m = case.cfg.model
    enc = case.params()["encoder"]
    x, mask = case.images(), case.mask()
    h_j = jax.jit(jm.encode, static_argnums=3)(case.jax(enc), case.jax(x), case.jax(mask), m)
    h_t = tm.encode(case.torch(enc), case.torch(x), case.torch(mask), m)
    assert h_t.dtype == torch.float32
    assert tuple(h_t.shape) == (x.shape[0], m.num_latent_tokens, m.latent_dim)
    return [row("forward/encoder", h_t, h_j, case.forward_tol)]


def decoder(case: Case):
    """The pixel decoder: latent tokens → images and the decoder's features (design §3.4)."""
    m = case.cfg.model
    dec = case.params()["decoder"]
    assert ("query_pos" in dec) == m.query_pos
    h = case.normal(2, m.num_latent_tokens, m.latent_dim)
    img_j, feats_j = jax.jit(jm.decode, static_argnums=2)(case.jax(dec), case.jax(h), m)
    img_t, feats_t = tm.decode(case.torch(dec), case.torch(h), m)
    return [
        row("forward/decoder", img_t, img_j, case.forward_tol),
        row("forward/decoder features", feats_t, feats_j, case.forward_tol),
    ]


def aux_decoder(case: Case):
    """One auxiliary ViT decoder on the latent tokens (``latent_decoder``)."""
    m = case.cfg.model
    name = m.aux_targets[0]
    aux = case.params()["aux"][name]
    h = case.normal(2, m.num_latent_tokens, m.latent_dim)
    out_j, feats_j = jax.jit(jm.latent_decoder, static_argnums=(2, 3))(
        case.jax(aux), case.jax(h), m, m.aux_heads
    )
    out_t, feats_t = tm.latent_decoder(case.torch(aux), case.torch(h), m, m.aux_heads)
    assert tuple(out_t.shape) == (2, m.num_patches, target_dim(name, m))
    return [
        row(f"forward/latent_decoder/{name}", out_t, out_j, case.forward_tol),
        row(f"forward/latent_decoder/{name} features", feats_t, feats_j, case.forward_tol),
    ]


def aux_mlp(case: Case):
    """One auxiliary MLP head on the decoder's features (``aux_kind = "mlp"``)."""
    cfg = case.cfg.replace(model={"aux_kind": "mlp"})
    m = cfg.model
    name = m.aux_targets[-1]
    p = case.params(cfg)["aux"][name]
    feats = case.normal(2, m.num_patches, m.dec_width)
    out_j = jax.jit(jm.aux_mlp, static_argnums=2)(case.jax(p), case.jax(feats), m)
    out_t = tm.aux_mlp(case.torch(p), case.torch(feats), m)
    return [row(f"forward/aux_mlp/{name}", out_t, out_j, case.forward_tol)]


def aux_predict(case: Case):
    """Every auxiliary head of the config, one row per target."""
    m = case.cfg.model
    aux = case.params()["aux"]
    h = case.normal(2, m.num_latent_tokens, m.latent_dim)
    feats = case.normal(2, m.num_patches, m.dec_width)
    out_j = jax.jit(jm.aux_predict, static_argnums=3)(
        case.jax(aux), case.jax(h), case.jax(feats, True), m
    )
    out_t = tm.aux_predict(case.torch(aux), case.torch(h), case.torch(feats, True), m)
    assert list(out_t) == list(m.aux_targets)
    return [row(f"forward/aux/{n}", out_t[n], out_j[n], case.forward_tol) for n in m.aux_targets]


# ------------------------------------------------------------------------------ fixed networks


def targets(case: Case):
    """The auxiliary targets of the config, each alone and all through ``compute_targets``
    (fp32 fixed filters, design §4)."""
    m = case.cfg.model
    x = case.images()
    xj, xt = case.jax(x), case.torch(x)
    rows = []
    for name in m.aux_targets:
        y_j = jax.jit(jtg.TARGETS[name], static_argnums=1)(xj, m)
        y_t = ttg.TARGETS[name](xt, m)
        rows.append(row(f"target/{name}", y_t, y_j, TOL["forward_fp32"]))
    all_j = jax.jit(jtg.compute_targets, static_argnums=1)(xj, m)
    all_t = ttg.compute_targets(xt, m)
    assert set(all_t) == set(m.aux_targets)
    rows.append(row("target/compute_targets", all_t, all_j, TOL["forward_fp32"]))
    return rows


def perceptual_features(case: Case):
    """The fixed perceptual pyramid, every level."""
    m = case.cfg.model
    x = case.images()
    f_j = jax.jit(jp.perceptual_features, static_argnums=1)(case.jax(x), m)
    f_t = tp.perceptual_features(case.torch(x), m)
    assert len(f_j) == len(f_t) == PERCEP_LEVELS
    return [
        row(f"perceptual/level{level}", f_t[level], f_j[level], TOL["forward_fp32"])
        for level in range(PERCEP_LEVELS)
    ]


def perceptual_loss(case: Case):
    """The perceptual loss and its gradient with respect to the reconstruction."""
    m = case.cfg.model
    x = case.images()
    r = np.clip(x + case.normal(*x.shape, scale=0.2), -1, 1).astype(np.float32)
    loss_j, grad_j = jax.jit(
        jax.value_and_grad(lambda a, b: jp.perceptual_loss(a, b, m), argnums=1)
    )(case.jax(x), case.jax(r))
    r_t = case.torch(r).requires_grad_(True)
    loss_t = tp.perceptual_loss(case.torch(x), r_t, m)
    loss_t.backward()
    return [
        row("perceptual", loss_t, loss_j, TOL["forward_fp32"]),
        row("grad/perceptual (d loss / d recon)", r_t.grad, grad_j, TOL["grad_fp32"]),
    ]


def discriminator(case: Case):
    """The patch-GAN discriminator's logits."""
    m = case.cfg.model
    x = case.images()
    disc = case.disc(x)
    y_j = jax.jit(jd.discriminator, static_argnums=2)(case.jax(disc), case.jax(x), m)
    y_t = td.discriminator(case.torch(disc), case.torch(x), m)
    side = m.image_size >> m.disc_depth
    assert tuple(y_t.shape) == tuple(y_j.shape) == (x.shape[0], side, side)
    return [row("discriminator", y_t, y_j, TOL["forward_fp32"])]


def gan_losses(case: Case):
    """Hinge, generator adversarial and LeCAM losses, and the LeCAM EMA update."""
    real, fake = case.normal(4, 8, 8, scale=2.0), case.normal(4, 8, 8, scale=2.0)
    ema_r, ema_f = float(case.rng.uniform(0, 1)), float(case.rng.uniform(-1, 0))
    rj, fj, rt, ft = case.jax(real), case.jax(fake), case.torch(real), case.torch(fake)
    tol = TOL["forward_fp32"]
    return [
        row("loss/hinge_d_loss", td.hinge_d_loss(rt, ft), jd.hinge_d_loss(rj, fj), tol),
        row("loss/generator_adv_loss", td.generator_adv_loss(ft), jd.generator_adv_loss(fj), tol),
        row(
            "loss/lecam_loss",
            td.lecam_loss(rt, ft, ema_r, ema_f),
            jd.lecam_loss(rj, fj, ema_r, ema_f),
            tol,
        ),
        row(
            "update_lecam",
            td.update_lecam(ema_r, ema_f, rt, ft, 0.999),
            jd.update_lecam(ema_r, ema_f, rj, fj, 0.999),
            tol,
        ),
    ]


def discriminator_hinge_grad(case: Case):
    """The hinge loss of the discriminator and its gradient, every leaf non-zero."""
    m = case.cfg.model
    real, fake = case.images(), case.images()
    params = case.disc(real)

    def loss_jax(p, a, b):
        return jd.hinge_d_loss(jd.discriminator(p, a, m), jd.discriminator(p, b, m))

    loss_j, grads_j = jax.jit(jax.value_and_grad(loss_jax))(
        case.jax(params), case.jax(real), case.jax(fake)
    )
    p_t = case.torch(params)
    for layer in p_t.values():
        for leaf in layer.values():
            leaf.requires_grad_(True)
    loss_t = td.hinge_d_loss(
        td.discriminator(p_t, case.torch(real), m), td.discriminator(p_t, case.torch(fake), m)
    )
    loss_t.backward()
    grads_t = {k: {n: v.grad for n, v in layer.items()} for k, layer in p_t.items()}
    assert all(torch.count_nonzero(g) for layer in grads_t.values() for g in layer.values())
    return [
        row("loss/hinge_d_loss (discriminator)", loss_t, loss_j, TOL["forward_fp32"]),
        row("grad/hinge_d_loss (discriminator)", grads_t, grads_j, TOL["grad_fp32"]),
    ]


# ------------------------------------------------------------------------------ losses


def mask_loss(case: Case):
    """The masked auxiliary loss (its terms and total); no masked token gives exactly 0."""
    m = case.cfg.model
    lo = case.cfg.replace(loss={"gamma": {"hog": 0.5, "pixel": 2.0}}).loss
    dims = {n: target_dim(n, m) for n in m.aux_targets}
    preds = {n: case.normal(2, m.num_patches, d) for n, d in dims.items()}
    tgts = {n: case.normal(2, m.num_patches, d) for n, d in dims.items()}
    mask = case.mask()
    total_j, terms_j = jax.jit(jl.mask_loss, static_argnums=3)(
        case.jax(preds), case.jax(tgts), case.jax(mask), lo
    )
    total_t, terms_t = tl.mask_loss(case.torch(preds), case.torch(tgts), case.torch(mask), lo)
    zero = np.zeros_like(mask)
    zero_t = tl.mask_loss(case.torch(preds), case.torch(tgts), case.torch(zero), lo)[0]
    zero_j = jl.mask_loss(case.jax(preds), case.jax(tgts), case.jax(zero), lo)[0]
    return [
        row("loss/mask terms", terms_t, terms_j, TOL["forward_fp32"]),
        row("loss/mask total", total_t, total_j, TOL["forward_fp32"]),
        exact("loss/mask with no masked token (torch) = 0", float(zero_t), 0.0),
        exact("loss/mask with no masked token (jax) = 0", float(zero_j), 0.0),
    ]


def reconstruction_loss(case: Case):
    """The pixel reconstruction loss of ``loss.rec`` (mse or l1)."""
    kind = case.cfg.loss.rec
    x = case.images()
    r = (x + case.normal(*x.shape, scale=0.3)).astype(np.float32)
    out_j = jax.jit(jl.reconstruction_loss, static_argnums=2)(case.jax(x), case.jax(r), kind)
    out_t = tl.reconstruction_loss(case.torch(x), case.torch(r), kind)
    return [row(f"loss/reconstruction ({kind})", out_t, out_j, TOL["forward_fp32"])]


def rec_percep_loss(case: Case):
    """Reconstruction + weighted perceptual loss, with ``lambda_percep = 0.7``, in full and
    a quarter into the perceptual warm-up (the share a traced scalar)."""
    cfg = case.cfg.replace(loss={"lambda_percep": 0.7})
    x = case.images()
    r = np.clip(x + case.normal(*x.shape, scale=0.2), -1, 1).astype(np.float32)
    fn_j = jax.jit(jl.rec_percep_loss, static_argnums=(2, 3))
    rows = []
    for share in (1.0, 0.25):
        out_j = fn_j(case.jax(x), case.jax(r), cfg.model, cfg.loss, jnp.float32(share))
        scale_t = torch.tensor(share, device=case.device)
        out_t = tl.rec_percep_loss(case.torch(x), case.torch(r), cfg.model, cfg.loss, scale_t)
        total, rec, percep = (float(v) for v in out_t)
        want = rec + share * cfg.loss.lambda_percep * percep
        assert abs(total - want) <= 1e-6 * max(1.0, abs(total))
        name = f"loss/rec_percep_loss ({cfg.loss.rec}, λ1 share {share})"
        rows.append(row(name, list(out_t), list(out_j), TOL["forward_fp32"]))
    return rows


def adaptive_adv_weight(case: Case):
    """The adaptive weight of the adversarial loss (a ratio of gradient norms)."""
    m, lo = case.cfg.model, case.cfg.loss
    x = case.images()
    r = np.clip(x + case.normal(*x.shape, scale=0.2), -1, 1).astype(np.float32)
    feats = case.normal(2, m.num_patches, m.dec_width)
    disc = case.disc(x)
    args_j = (case.jax(x), case.jax(r), case.jax(feats), case.jax(disc))
    w_j = jax.jit(jl.adaptive_adv_weight, static_argnums=(4, 5))(*args_j, m, lo)
    args_t = (case.torch(x), case.torch(r), case.torch(feats), case.torch(disc))
    w_t = tl.adaptive_adv_weight(*args_t, m, lo)
    assert 0 < float(w_t) < 1e4
    return [row("loss/adaptive_adv_weight", w_t, w_j, TOL["forward_fp32"])]


def generator_loss(case: Case):
    """The full Stage-1 objective: total, reconstruction and every entry of its metrics."""
    cfg = case.cfg.replace(train={"stage": 1})
    m = cfg.model
    params = case.params()
    x, mask = case.images(), case.mask()
    disc = case.disc(x) if cfg.loss.use_adv else None
    tgts = {n: case.normal(2, m.num_patches, target_dim(n, m)) for n in m.aux_targets}

    def loss_j(p, d, x, k, tg):
        return jt.generator_loss(p, {}, d, x, k, tg, jnp.float32(1.0), cfg)

    total_j, (metrics_j, recon_j) = jax.jit(loss_j)(
        case.jax(params),
        case.jax(disc) if disc else None,
        case.jax(x),
        case.jax(mask),
        case.jax(tgts),
    )
    with torch.no_grad():
        total_t, (metrics_t, recon_t) = tt.generator_loss(
            case.torch(params),
            {},
            case.torch(disc) if disc else None,
            case.torch(x),
            case.torch(mask),
            case.torch(tgts),
            torch.ones((), device=case.device),
            cfg,
        )
    assert set(metrics_t) == set(metrics_j)
    tol = case.forward_tol
    return [
        row("loss/recon (images)", recon_t, recon_j, tol),
        row("loss/total", total_t, total_j, tol),
        *(row(f"loss/{n}", metrics_t[n], metrics_j[n], tol) for n in metrics_j),
    ]


# ------------------------------------------------------------------------------ gradients


def _stage_grads(case: Case, stage: int):
    """(loss, metrics, grads) of the stage's ``generator_loss`` over its groups, both backends."""
    cfg = case.cfg.replace(train={"stage": stage})
    m = cfg.model
    keys = trainable_keys(stage)
    params = case.params()
    x, mask = case.images(), case.mask()
    disc = case.disc(x) if cfg.loss.use_adv else None

    def loss_j(trainable, frozen, d, x, k):
        tg = jtg.compute_targets(x, m) if stage == 1 else {}
        return jt.generator_loss(trainable, frozen, d, x, k, tg, jnp.float32(1.0), cfg)

    pj, xj, kj = case.jax(params), case.jax(x), case.jax(mask)
    (loss_jx, (met_j, _)), g_j = jax.jit(jax.value_and_grad(loss_j, has_aux=True))(
        {k: pj[k] for k in keys},
        {k: pj[k] for k in pj if k not in keys},
        case.jax(disc) if disc else None,
        xj,
        kj,
    )
    pt, xt, kt = case.torch(params), case.torch(x), case.torch(mask)
    tg = ttg.compute_targets(xt, m) if stage == 1 else {}
    (loss_t, (met_t, _)), g_t = tt.value_and_grad(
        tt.generator_loss,
        {k: pt[k] for k in keys},
        {k: pt[k] for k in pt if k not in keys},
        case.torch(disc) if disc else None,
        xt,
        kt,
        tg,
        torch.ones((), device=case.device),
        cfg,
        autograd=m.remat != "none",
    )
    assert set(g_t) == set(g_j) == set(keys)
    assert set(met_t) == set(met_j)
    for path, gj in flatten(jax.tree_util.tree_map(np.asarray, g_j)).items():
        gt = flatten(g_t)[path]
        assert gt.dtype == torch.float32 and tuple(gt.shape) == gj.shape, path
        assert case.bf16 or np.abs(gj).max() > 0, f"stage {stage}, {path}: zero gradient in JAX"
    rows = [
        row(f"stage{stage}/loss", loss_t, loss_jx, case.forward_tol),
        row(f"stage{stage}/metrics", dict(met_t), dict(met_j), case.forward_tol),
    ]
    for k in keys:
        if k == "aux":  # one row per auxiliary decoder
            for name in g_j["aux"]:
                rows.append(
                    row(f"grad/stage{stage}/aux/{name}", g_t[k][name], g_j[k][name], case.grad_tol)
                )
        else:
            rows.append(row(f"grad/stage{stage}/{k}", g_t[k], g_j[k], case.grad_tol))
    return rows, met_t, met_j


def stage1_grads(case: Case):
    """Gradients of the Stage-1 total w.r.t. every leaf of the encoder, decoder and aux heads."""
    return _stage_grads(case, 1)[0]


def stage2_grads(case: Case):
    """Gradients of the Stage-2 total w.r.t. the decoder (the aux heads are not evaluated)."""
    rows, met_t, met_j = _stage_grads(case, 2)
    assert "mask" not in met_t and "mask" not in met_j
    return rows


def disc_grads(case: Case):
    """The discriminator loss (hinge + LeCAM) and its gradient, every leaf."""
    m, lo = case.cfg.model, case.cfg.loss
    x = case.images()
    disc = case.disc(x)
    recon = np.clip(x + case.normal(*x.shape, scale=0.3), -1, 1).astype(np.float32)
    # EMAs away from 0 so both LeCAM branches are active and distinct.
    lecam = {
        "real": np.float32(case.rng.uniform(0.1, 0.5)),
        "fake": np.float32(case.rng.uniform(-0.5, -0.1)),
    }
    (tot_j, aux_j), g_j = jax.jit(
        jax.value_and_grad(jt.disc_loss, has_aux=True), static_argnums=(4, 5)
    )(case.jax(disc), case.jax(x), case.jax(recon), case.jax(lecam), lo, m)
    (tot_t, aux_t), g_t = tt.value_and_grad(
        tt.disc_loss,
        case.torch(disc),
        case.torch(x),
        case.torch(recon),
        case.torch(lecam),
        lo,
        m,
    )
    tol = TOL["forward_fp32"]  # the same fp32 inputs on both sides
    names = ("disc_hinge", "lecam", "disc logits (real)", "disc logits (fake)")
    return [
        row("loss/disc", tot_t, tot_j, tol),
        *(row(f"loss/{n}", a_t, a_j, tol) for n, a_t, a_j in zip(names, aux_t, aux_j)),
        row("grad/disc", g_t, g_j, TOL["grad_fp32"]),
    ]


# ------------------------------------------------------------------------------ optimisers

OPTIMIZER_STEPS = 5


def _opt_tree(case: Case, scale: float = 1.0) -> dict:
    return {
        "a": {"w": case.normal(6, 4, scale=scale), "b": case.normal(4, scale=scale)},
        "z": case.normal(3, 2, 5, scale=scale),
    }


def optimizer(case: Case):
    """``train.optimizer`` (with its clipping and momentum) from identical gradients, every
    step: parameters, count, moments and the global norm, each the worst over the steps.
    Each backend's ``make_optimizer`` binds the hyper-parameters once."""
    t = case.cfg.train
    init_j, update_j = jo.make_optimizer(t)
    init_t, update_t = to.make_optimizer(t)

    @jax.jit
    def step_j(g, state, p, lr):
        g, norm = jo.clip_by_global_norm(g, t.grad_clip)
        new_p, new_state = update_j(g, state, p, lr)
        return new_p, new_state, norm

    params = _opt_tree(case)
    pj, pt = case.jax(params), case.torch(params)
    sj, st = init_j(pj), init_t(pt)
    assert st.count.dtype == torch.int32 and (st.nu == {}) == (t.optimizer == "sgd")
    worst = dict.fromkeys(("global norm", "params", "mu", "nu"), 0.0)
    for i in range(OPTIMIZER_STEPS):
        grads = _opt_tree(case, scale=float(case.rng.uniform(0.2, 3.0)))  # clipped on some steps
        lr = np.float32(case.rng.uniform(1e-3, 1e-1))
        pj, sj, norm_j = step_j(case.jax(grads), sj, pj, lr)
        with torch.no_grad():
            g, norm_t = to.clip_by_global_norm(case.torch(grads), t.grad_clip)
            pt, st = update_t(g, st, pt, torch.tensor(lr, device=case.device))
        assert int(st.count) == int(sj.count) == i + 1
        for key, a, b in (
            ("global norm", norm_t, norm_j),
            ("params", pt, pj),
            ("mu", st.mu, sj.mu),
            ("nu", st.nu, sj.nu),
        ):
            worst[key] = max(worst[key], tree_err(a, b))
    assert np.abs(pt["z"].cpu().numpy() - params["z"]).max() > 1e-3  # the parameters moved
    name = f"optim/{t.optimizer} (clip {t.grad_clip}, momentum {t.momentum})"
    return [
        (f"{name}: {key}, {OPTIMIZER_STEPS} steps", err, TOL["forward_fp32"])
        for key, err in worst.items()
    ]


def optimizers(case: Case):
    """``optimizer`` for AdamW, Adam and SGD with the config's other settings."""
    return [
        r
        for name in ("adamw", "adam", "sgd")
        for r in optimizer(Case(case.cfg.replace(train={"optimizer": name}), case.device, case.rng))
    ]


def ema_update(case: Case):
    """The EMA of the parameters."""
    ema, params = _opt_tree(case), _opt_tree(case)
    out_j = jax.jit(jo.ema_update, static_argnums=2)(case.jax(ema), case.jax(params), 0.99)
    out_t = to.ema_update(case.torch(ema), case.torch(params), 0.99)
    steps = np.array([0, 1, 9, 100, 10**4, 10**6], np.int32)  # the warm-up, then the decay
    t = dataclasses.replace(case.cfg.train, ema_decay=0.999, ema_warmup=True)
    decay_j = np.array([jo.ema_decay_at(jnp.int32(s), t) for s in steps], np.float32)
    decay_t = np.array([to.ema_decay_at(torch.tensor(s), t).item() for s in steps], np.float32)
    return [
        row("optim/ema_update", out_t, out_j, TOL["forward_fp32"]),
        # within an ulp, not exact: a GPU's float32 division may round differently
        row("optim/ema_decay_at", decay_t, decay_j, TOL["forward_fp32"]),
    ]


# ------------------------------------------------------------------------------ trajectories


def fresh_states(case: Case, cfg=None, params=None, disc=None):
    """The same initial state in both backends on the case's devices. With ``params``, the
    stage starts from them as ``maetok.trainer`` starts ``--init-from``
    (``maetok.train_state.start_stage2``: fresh optimisers, the EMA reset to them)."""
    cfg = cfg or case.cfg
    bj, bt = jb.Backend(cfg), tb.Backend(cfg, case.device)
    if params is None:
        tree = jt.state_to_numpy(bj.init_state(cfg.train.seed))
    else:
        tree = jt.state_to_numpy(start_stage2(bj, {"params": params}, cfg))
    if disc is not None:
        tree["disc"] = disc
    return (
        jax.device_put(bj.state_from_numpy(tree), jax_device(case.device)),
        bt.state_from_numpy(tree),
    )


def _source(cfg):
    """Batches as ``maetok.trainer`` makes them: a pure function of (seed, step)."""
    return BatchSource(SyntheticImages(cfg.model.image_size, count=64, seed=cfg.train.seed), cfg)


def run_both(case: Case, cfg, state_j, state_t, start: int, steps: int, check=None):
    """``steps`` train steps from ``start`` in both backends → (state_j, state_t, the worst
    metric error over the steps). ``check(step, old_j, old_t, new_j, new_t)`` may inspect
    every transition."""
    source = _source(cfg)
    step_j, step_t = jax_step(cfg), tt.make_train_step(cfg)
    worst = 0.0
    for s in range(start, start + steps):
        batch = source.batch(s)
        new_j, met_j = step_j(state_j, *jt.step_inputs(batch, cfg, s))
        new_t, met_t = step_t(state_t, *tt.step_inputs(batch, cfg, s, case.device))
        assert set(met_t) == set(met_j)
        assert all(v.dtype == torch.float32 and v.dim() == 0 for v in met_t.values())
        worst = max(worst, tree_err(dict(met_t), dict(met_j)))
        if check:
            check(s, state_j, state_t, new_j, new_t)
        state_j, state_t = new_j, new_t
    return state_j, state_t, worst


def state_err(state_t, state_j) -> float:
    """The worst leaf of two states (numpy trees of the one checkpoint format)."""
    a, b = flatten(tt.state_to_numpy(state_t)), flatten(jt.state_to_numpy(state_j))
    assert set(a) == set(b), f"state keys differ {sorted(set(a) ^ set(b))[:5]}"
    for k in b:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
    return tree_err(a, b)


def trajectory(case: Case):
    """``TRAJECTORY_STEPS`` train steps from one state: the losses at every step and, in
    fp32, the parameters and discriminator by the L2 disagreement of their updates
    (``TOL["trajectory_early_fp32"]``); bf16 gradients differ by ~1e-2, which Adam turns
    into sign flips, so in bf16 the losses only. The perceptual loss warms up over those
    steps (``loss.percep_warmup``), so its share of λ1 enters each step as a traced scalar."""
    cfg = case.cfg.replace(loss={"percep_warmup": TRAJECTORY_STEPS})
    first = _source(cfg).batch(0)["images"]
    disc = case.disc(first) if cfg.loss.use_adv else None
    sj, st = fresh_states(case, cfg, disc=disc)
    start = jt.state_to_numpy(sj)
    sj, st, loss_err = run_both(case, cfg, sj, st, 0, TRAJECTORY_STEPS)
    name = f"trajectory/{TRAJECTORY_STEPS} steps"
    loss_tol = TOL["loss_bf16"] if case.bf16 else TOL["trajectory_fp32"]
    rows = [(f"{name}: losses", loss_err, loss_tol)]
    if not case.bf16:
        end_j, end_t = jt.state_to_numpy(sj), tt.state_to_numpy(st)
        for group in ("params", "disc") if disc is not None else ("params",):
            err = worst_update(end_t[group], end_j[group], start[group])[0]
            rows.append((f"{name}: {group} (L2 of update)", err, TOL["trajectory_early_fp32"]))
    return rows


STAGE_STEPS = 10


def _groups(state, keys):
    """The parameters of the groups ``keys``, which must have no moments and no EMA (the
    state follows the stage, ``maetok.train_state``)."""
    tree = (jt if isinstance(state["step"], jax.Array) else tt).state_to_numpy(state)
    for part in (tree["ema"], tree["opt"]["mu"], tree["opt"]["nu"]):
        assert not set(keys) & set(part), f"moments or EMA of {keys} in the state"
    return {k: flatten(tree["params"][k]) for k in keys}


def stages(case: Case):
    """``STAGE_STEPS`` Stage-1 steps, then as many Stage-2 steps started the way
    ``maetok.trainer`` starts ``--init-from`` (``maetok.train_state.start_stage2``: each
    backend's own Stage-1 parameters, a fresh optimiser over the decoder, the EMA reset to
    them): every metric after every step, every leaf of the state at the end of each stage
    (per leaf, relative to its max-abs: after 10 steps the first steps' fp32 noise of
    ``TOL["trajectory_early_fp32"]`` is diluted), and in Stage 2 the encoder and unused aux
    heads bit-identical, with no moments and no EMA."""
    tol = TOL["trajectory_fp32"]
    cfg = case.cfg.replace(train={"stage": 1})
    sj, st = fresh_states(case, cfg)
    sj, st, met1 = run_both(case, cfg, sj, st, 0, STAGE_STEPS)
    rows = [("stage 1: metrics", met1, tol), ("stage 1: state", state_err(st, sj), tol)]

    cfg2 = cfg.replace(train={"stage": 2})
    sj2, _ = fresh_states(case, cfg2, jt.state_to_numpy(sj)["params"])
    _, st2 = fresh_states(case, cfg2, tt.state_to_numpy(st)["params"])
    frozen_j, frozen_t = _groups(sj2, ("encoder", "aux")), _groups(st2, ("encoder", "aux"))
    sj2, st2, met2 = run_both(case, cfg2, sj2, st2, 0, STAGE_STEPS)
    rows += [("stage 2: metrics", met2, tol), ("stage 2: state", state_err(st2, sj2), tol)]
    changed = 0.0
    for before, state in ((frozen_j, sj2), (frozen_t, st2)):
        after = _groups(state, ("encoder", "aux"))
        for group in before:
            for k in before[group]:
                changed = max(changed, max_abs(after[group][k], before[group][k]))
    rows.append(("stage 2: encoder and aux heads unchanged", changed, 0.0))
    assert int(tt.state_to_numpy(st2)["opt"]["count"]) == STAGE_STEPS
    return rows


def adversarial_gating(case: Case):
    """Before ``loss.disc_start`` the discriminator state (parameters, optimiser, LeCAM EMAs)
    is kept bit for bit in both backends; for two steps after it, it trains alike."""
    cfg = case.cfg
    first = _source(cfg).batch(0)["images"]
    disc = case.disc(first)
    moved, kept = [], [0.0]

    def check(s, old_j, old_t, new_j, new_t):
        for old, new, conv in ((old_j, new_j, jt), (old_t, new_t, tt)):
            a, b = conv.state_to_numpy(old), conv.state_to_numpy(new)
            diff = max(
                max_abs(flatten(a[k])[p], flatten(b[k])[p])
                for k in ("disc", "disc_opt", "lecam")
                for p in flatten(a[k])
            )
            if s < cfg.loss.disc_start:
                kept[0] = max(kept[0], diff)
            moved.append(diff > 0)

    # Two steps past disc_start: a few more and a fake logit can land within rounding of the
    # hinge's corner, where the two backends may take different sides and part ways by ~1e-3
    sj, st = fresh_states(case, disc=disc)
    start = jt.state_to_numpy(sj)
    sj, st, met = run_both(case, cfg, sj, st, 0, cfg.loss.disc_start + 2, check)
    assert all(moved[2 * cfg.loss.disc_start :]), "the discriminator did not train after disc_start"
    rows = [
        ("adversarial: discriminator state unchanged before disc_start", kept[0], 0.0),
        ("adversarial: metrics", met, TOL["trajectory_fp32"]),
    ]
    end_j, end_t = jt.state_to_numpy(sj), tt.state_to_numpy(st)
    for group in ("params", "disc"):  # early steps: the L2 of the update, as in ``trajectory``
        err = worst_update(end_t[group], end_j[group], start[group])[0]
        rows.append((f"adversarial: {group} (L2 of update)", err, TOL["trajectory_early_fp32"]))
    return rows


# ------------------------------------------------------------------------------ the report

# What ``maetok parity`` runs, in this order.
REPORT = (
    patch_embed,
    rope,
    attention,
    encoder,
    decoder,
    aux_predict,
    targets,
    perceptual_features,
    perceptual_loss,
    discriminator,
    generator_loss,
    stage1_grads,
    stage2_grads,
    disc_grads,
    optimizers,
    ema_update,
    trajectory,
)


def run(preset_name: str = "tiny", device: str = "cpu", dtype: str = "float32") -> list:
    """``REPORT`` on ``parity_config(preset_name, dtype)`` → rows ``(name, error, tolerance)``.

    Each check draws its inputs from a generator seeded by its name. A check whose
    assertion fails gives one failing row naming it."""
    tt.select_device(device)  # one line, exit status 2, when torch cannot use it
    cfg = parity_config(preset_name, dtype)
    rows = []
    with pinned_precision():
        for check in REPORT:
            rng = np.random.default_rng(zlib.crc32(check.__name__.encode()))
            try:
                rows += check(Case(cfg, device, rng))
            except AssertionError as e:
                rows.append((f"{check.__name__}: {e}", float("inf"), 0.0))
    return rows
