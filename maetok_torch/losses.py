"""Loss terms (docs/design.md §4–5): L_rec, L_mask, the adaptive adversarial weight, and the totals.

Mirrors ``maetok_jax/losses.py``. The perceptual pyramid and the discriminator's own
losses live in ``perceptual`` and ``discriminator``; this module combines them into the
Stage-1 and Stage-2 objectives:

    L_tok = L_rec + λ1·L_percep + λ2·L_adv          Stage 1: L_tok + L_mask     Stage 2: L_tok
"""

import torch

from maetok.numerics import ADV_WEIGHT_EPS, ADV_WEIGHT_MAX
from maetok_torch.compiled import compiled_part
from maetok_torch.discriminator import discriminator, generator_adv_loss
from maetok_torch.patches import patchify
from maetok_torch.perceptual import perceptual_loss


def reconstruction_loss(images, recon, kind: str = "mse"):
    """Mean over every pixel and channel of (I − Î)² (``mse``) or |I − Î| (``l1``)."""
    diff = recon - images
    return torch.mean(torch.abs(diff)) if kind == "l1" else torch.mean(torch.square(diff))


@compiled_part
def mask_loss(preds, targets, mask, lo, count=None):
    """L_mask = Σ_j γ_j · mean over masked tokens of the per-token mean squared error.

    preds/targets: {name: (B, N, D_j)}; mask (B, N), 1 = masked. The per-token error is
    averaged over D_j so targets of different widths weigh alike; with no masked token the
    term is 0. Returns (total, {name: term}). ``count`` replaces the denominator
    ``max(1, Σ mask)``: a data-parallel rank, holding a slice of the batch, passes the
    global count divided by the number of ranks (torch only: JAX sees the global batch).
    """
    if count is None:
        count = torch.clamp(torch.sum(mask), min=1.0)
    terms = {}
    for name, pred in preds.items():
        per_token = torch.mean(torch.square(pred - targets[name]), dim=-1)  # (B, N)
        terms[name] = torch.sum(per_token * mask) / count
    total = sum(lo.gamma_for(name) * term for name, term in terms.items())
    return torch.as_tensor(total, dtype=torch.float32, device=mask.device), terms


@compiled_part
def rec_percep_loss(images, recon, m, lo, percep_scale=1.0):
    """The non-adversarial part of L_tok: L_rec + s·λ1·L_percep → (total, rec, percep), s the
    perceptual warm-up's ``percep_scale``."""
    rec = reconstruction_loss(images, recon, lo.rec)
    percep = (
        perceptual_loss(images, recon, m)
        if lo.lambda_percep > 0
        else torch.zeros((), device=recon.device)
    )
    return rec + lo.lambda_percep * percep_scale * percep, rec, percep


def adaptive_adv_weight(images, recon, feats, disc_params, m, lo, mean=None, percep_scale=1.0):
    """‖∇_W L_rec_percep‖ / (‖∇_W L_adv‖ + ADV_WEIGHT_EPS), clipped to [0, ADV_WEIGHT_MAX],
    W the decoder's last dense and L_rec_percep = L_rec + s·λ1·L_percep (``rec_percep_loss``).

    With Î = unpatchify(feats @ W + b), ∇_W L = featsᵀ · patchify(∂L/∂Î), so only the loss
    networks are differentiated, not the decoder. The weight carries no gradient: both
    inner gradients (``torch.func.grad``, which nests inside the step's own) are taken
    with respect to a detached copy of Î. ``mean`` averages the two ∇_W over data-parallel
    ranks before their norms are taken (torch only: JAX sees the global batch).
    """
    feats = feats.detach().to(torch.float32)
    disc_params = {k: {n: v.detach() for n, v in layer.items()} for k, layer in disc_params.items()}
    recon = recon.detach()

    def rec_percep(r):
        return rec_percep_loss(images, r, m, lo, percep_scale)[0]

    g_rec_percep = torch.func.grad(rec_percep)(recon)
    g_adv = torch.func.grad(lambda r: generator_adv_loss(discriminator(disc_params, r, m)))(recon)

    def weight_grad_norm(g):
        gw = torch.einsum("bnd,bno->do", feats, patchify(g, m.patch_size))
        if mean is not None:
            gw = mean(gw)
        return torch.sqrt(torch.sum(torch.square(gw)))

    w = weight_grad_norm(g_rec_percep) / (weight_grad_norm(g_adv) + ADV_WEIGHT_EPS)
    return torch.clamp(w, 0.0, ADV_WEIGHT_MAX).detach()
