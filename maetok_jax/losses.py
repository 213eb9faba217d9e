"""Loss terms (docs/design.md §4–5): L_rec, L_mask, the adaptive adversarial weight, and the totals.

The perceptual pyramid and the discriminator's own losses live in ``perceptual`` and
``discriminator``; this module combines them into the Stage-1 and Stage-2 objectives:

    L_tok = L_rec + λ1·L_percep + λ2·L_adv          Stage 1: L_tok + L_mask     Stage 2: L_tok
"""

import jax
import jax.numpy as jnp

from maetok.numerics import ADV_WEIGHT_EPS, ADV_WEIGHT_MAX
from maetok_jax.discriminator import discriminator, generator_adv_loss
from maetok_jax.patches import patchify
from maetok_jax.perceptual import perceptual_loss


def reconstruction_loss(images, recon, kind: str = "mse"):
    """Mean over every pixel and channel of (I − Î)² (``mse``) or |I − Î| (``l1``)."""
    diff = recon - images
    return jnp.mean(jnp.abs(diff)) if kind == "l1" else jnp.mean(jnp.square(diff))


def mask_loss(preds, targets, mask, lo):
    """L_mask = Σ_j γ_j · mean over masked tokens of the per-token mean squared error.

    preds/targets: {name: (B, N, D_j)}; mask (B, N), 1 = masked. The per-token error is
    averaged over D_j so targets of different widths weigh alike; with no masked token the
    term is 0. Returns (total, {name: term}).
    """
    with jax.named_scope("mask_loss"):
        count = jnp.maximum(jnp.sum(mask), 1.0)
        terms = {}
        for name, pred in preds.items():
            per_token = jnp.mean(jnp.square(pred - targets[name]), axis=-1)  # (B, N)
            terms[name] = jnp.sum(per_token * mask) / count
        total = sum(lo.gamma_for(name) * term for name, term in terms.items())
        return jnp.asarray(total, jnp.float32), terms


def rec_percep_loss(images, recon, m, lo, percep_scale=1.0):
    """The non-adversarial part of L_tok: L_rec + s·λ1·L_percep → (total, rec, percep), s the
    perceptual warm-up's ``percep_scale``."""
    rec = reconstruction_loss(images, recon, lo.rec)
    percep = perceptual_loss(images, recon, m) if lo.lambda_percep > 0 else jnp.zeros(())
    return rec + lo.lambda_percep * percep_scale * percep, rec, percep


def adaptive_adv_weight(images, recon, feats, disc_params, m, lo, percep_scale=1.0):
    """‖∇_W L_rec_percep‖ / (‖∇_W L_adv‖ + ADV_WEIGHT_EPS), clipped to [0, ADV_WEIGHT_MAX],
    W the decoder's last dense and L_rec_percep = L_rec + s·λ1·L_percep (``rec_percep_loss``).

    With Î = unpatchify(feats @ W + b), ∇_W L = featsᵀ · patchify(∂L/∂Î), so only the loss
    networks are differentiated, not the decoder. The weight carries no gradient.
    """
    recon = jax.lax.stop_gradient(recon)
    feats = jax.lax.stop_gradient(feats).astype(jnp.float32)
    disc_params = jax.lax.stop_gradient(disc_params)
    g_rec_percep = jax.grad(lambda r: rec_percep_loss(images, r, m, lo, percep_scale)[0])(recon)
    g_adv = jax.grad(lambda r: generator_adv_loss(discriminator(disc_params, r, m)))(recon)

    def weight_grad_norm(g):
        gw = jnp.einsum("bnd,bno->do", feats, patchify(g, m.patch_size))
        return jnp.sqrt(jnp.sum(jnp.square(gw)))

    w = weight_grad_norm(g_rec_percep) / (weight_grad_norm(g_adv) + ADV_WEIGHT_EPS)
    return jax.lax.stop_gradient(jnp.clip(w, 0.0, ADV_WEIGHT_MAX))
