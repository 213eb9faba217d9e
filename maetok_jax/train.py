"""Train state and the Stage-1 / Stage-2 train steps (docs/design.md §5–7).

The train state is a plain dict pytree::

    {"step": int32, "params": {...}, "opt": OptState, "ema": {...}?,
     "disc": {...}?, "disc_opt": OptState?, "lecam": {"real", "fake"}?}

``make_train_step(cfg)`` returns the un-jitted step; callers compile it at the edge with
``jax.jit(step, donate_argnums=0)`` (``jit_train_step`` does exactly that). Learning
rates and the ``adv_on`` switch are traced scalars, masks are arrays of a fixed shape, so
no step with a new mask ratio, learning rate or GAN phase recompiles.

The optimiser state and the EMA cover the stage's trainable groups only
(``maetok.train_state``). Stage 1 trains encoder, decoder and auxiliary decoders on
``L_tok + L_mask``. Stage 2 differentiates the decoder only: the encoder runs forward under
``stop_gradient``, its parameters are carried through untouched, and the auxiliary
decoders are not evaluated.
"""

import jax
import jax.numpy as jnp
import numpy as np

from maetok import params as param_spec
from maetok.train_state import trainable_keys
from maetok.tree import map_tree
from maetok_jax.discriminator import (
    discriminator,
    generator_adv_loss,
    hinge_d_loss,
    lecam_loss,
    update_lecam,
)
from maetok_jax.losses import adaptive_adv_weight, mask_loss, rec_percep_loss
from maetok_jax.model import aux_predict, decode, encode
from maetok_jax.optim import (
    OptState,
    clip_by_global_norm,
    ema_decay_at,
    ema_update,
    make_optimizer,
)
from maetok_jax.targets import compute_targets


def init_state(cfg, seed: int, params=None):
    """A fresh train state from the shared numpy initialiser (or from given ``params``)."""
    if params is None:
        params = param_spec.init_params(cfg, seed)
    params = jax.tree_util.tree_map(jnp.asarray, params)
    trainable = {k: params[k] for k in trainable_keys(cfg.train.stage)}
    opt_init, _ = make_optimizer(cfg.train)
    state = {"step": jnp.zeros((), jnp.int32), "params": params, "opt": opt_init(trainable)}
    if cfg.train.ema_decay > 0:
        state["ema"] = jax.tree_util.tree_map(jnp.array, trainable)
    if cfg.loss.use_adv:
        disc = jax.tree_util.tree_map(jnp.asarray, param_spec.init_disc(cfg, seed))
        state["disc"] = disc
        state["disc_opt"] = opt_init(disc)
        state["lecam"] = {"real": jnp.zeros(()), "fake": jnp.zeros(())}
    return state


def generator_loss(trainable, frozen, disc, images, mask, targets, adv_on, cfg, percep_scale=1.0):
    """The stage's total loss over the trainable groups → (total, (metrics, recon));
    ``percep_scale`` is the perceptual warm-up's share of λ1 (``schedules.percep_scale``)."""
    m, lo, stage = cfg.model, cfg.loss, cfg.train.stage
    params = {**frozen, **trainable}
    h = encode(params["encoder"], images, mask, m)
    if stage == 2:
        h = jax.lax.stop_gradient(h)
    recon, feats = decode(params["decoder"], h, m)
    rec_percep, rec, percep = rec_percep_loss(images, recon, m, lo, percep_scale)
    total, metrics = rec_percep, {"rec": rec, "percep": percep}
    if lo.use_adv:
        g_adv = generator_adv_loss(discriminator(disc, recon, m))
        weight = lo.lambda_adv * adv_on
        if lo.adaptive_weight:
            weight = weight * adaptive_adv_weight(images, recon, feats, disc, m, lo, percep_scale)
        total = total + weight * g_adv
        metrics.update(adv=g_adv, adv_weight=weight)
    if stage == 1:
        preds = aux_predict(params["aux"], h, feats, m)
        l_mask, terms = mask_loss(preds, targets, mask, lo)
        total = total + l_mask
        metrics["mask"] = l_mask
        metrics.update({f"aux/{name}": term for name, term in terms.items()})
    metrics["loss"] = total
    return total, (metrics, recon)


def disc_loss(disc, images, recon, lecam, lo, m):
    """Hinge loss + LeCAM on real images and (gradient-free) reconstructions."""
    real = discriminator(disc, images, m)
    fake = discriminator(disc, jax.lax.stop_gradient(recon), m)
    hinge = hinge_d_loss(real, fake)
    reg = lecam_loss(real, fake, lecam["real"], lecam["fake"])
    return hinge + lo.lecam_weight * reg, (hinge, reg, real, fake)


def make_train_step(cfg):
    """``step(state, images (B,H,W,C), mask (B,N), lr, disc_lr, adv_on, percep_scale)
    → (state, metrics)``: the scalars are ``step_inputs``' (``schedules.step_scalars``)."""
    m, lo, t = cfg.model, cfg.loss, cfg.train
    keys = trainable_keys(t.stage)
    _, opt_update = make_optimizer(t)

    def step(state, images, mask, lr, disc_lr, adv_on, percep_scale):
        params = state["params"]
        trainable = {k: params[k] for k in keys}
        frozen = {k: v for k, v in params.items() if k not in keys}
        targets = compute_targets(images, m) if t.stage == 1 else {}
        grad_fn = jax.value_and_grad(generator_loss, has_aux=True)
        (_, (metrics, recon)), grads = grad_fn(
            trainable, frozen, state.get("disc"), images, mask, targets, adv_on, cfg, percep_scale
        )
        with jax.named_scope("optimiser"):  # a GPU profile's name for the update
            grads, gnorm = clip_by_global_norm(grads, t.grad_clip)
            trainable, opt = opt_update(grads, state["opt"], trainable, lr)
        new_state = {**state, "params": {**params, **trainable}, "opt": opt}
        if "ema" in state:
            decay = ema_decay_at(state["step"], t)
            new_state["ema"] = ema_update(state["ema"], trainable, decay)
        metrics["grad_norm"] = gnorm
        if lo.use_adv:
            new_state.update(disc_update(state, images, recon, disc_lr, adv_on, metrics))
        new_state["step"] = state["step"] + 1
        return new_state, {k: jnp.asarray(v, jnp.float32) for k, v in metrics.items()}

    def disc_update(state, images, recon, disc_lr, adv_on, metrics):
        grad_fn = jax.value_and_grad(disc_loss, has_aux=True)
        (d_total, (hinge, reg, real, fake)), d_grads = grad_fn(
            state["disc"], images, recon, state["lecam"], lo, m
        )
        d_grads, _ = clip_by_global_norm(d_grads, t.grad_clip)
        disc, disc_opt = opt_update(d_grads, state["disc_opt"], state["disc"], disc_lr)
        ema_real, ema_fake = update_lecam(
            state["lecam"]["real"], state["lecam"]["fake"], real, fake, lo.lecam_decay
        )
        on = adv_on > 0  # before disc_start the discriminator and its EMA stay as they are
        keep = lambda new, old: jax.tree_util.tree_map(lambda a, b: jnp.where(on, a, b), new, old)
        metrics.update(disc=d_total, disc_hinge=hinge, lecam=reg)
        return {
            "disc": keep(disc, state["disc"]),
            "disc_opt": keep(disc_opt, state["disc_opt"]),
            "lecam": keep({"real": ema_real, "fake": ema_fake}, state["lecam"]),
        }

    return step


def jit_train_step(cfg):
    """The train step compiled once, with the state's buffers donated."""
    return jax.jit(make_train_step(cfg), donate_argnums=0)


def step_inputs(batch, cfg, step: int, put=jnp.asarray):
    """Host-side arguments of one step: arrays from the batch (placed by ``put``; data
    parallel: split over the mesh), then ``step_scalars`` (lr, disc_lr, the adv switch, the
    perceptual warm-up's share) as float32 scalars."""
    from maetok.schedules import step_scalars

    scalars = [np.float32(x) for x in step_scalars(step, cfg)]
    return (put(batch["images"]), put(batch["mask"]), *scalars)


def state_to_numpy(state) -> dict:
    """The state as a nested dict of numpy arrays (OptState → {count, mu, nu}) for checkpoints."""

    def conv(x):
        return map_tree(conv, x._asdict()) if isinstance(x, OptState) else np.asarray(x)

    return map_tree(conv, state)


def state_from_numpy(tree: dict) -> dict:
    """Inverse of ``state_to_numpy``."""
    state = map_tree(jnp.asarray, tree)
    for key in ("opt", "disc_opt") & state.keys():
        state[key] = OptState(state[key]["count"], state[key]["mu"], state[key].get("nu", {}))
    return state
