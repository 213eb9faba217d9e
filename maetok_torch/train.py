"""Train state and the Stage-1 / Stage-2 train steps (docs/design.md §5–7).

Mirrors ``maetok_jax/train.py``.

The train state is a plain dict of tensors, all on one device::

    {"step": int32, "params": {...}, "opt": OptState, "ema": {...}?,
     "disc": {...}?, "disc_opt": OptState?, "lecam": {"real", "fake"}?}

``make_train_step(cfg)`` returns the eager step; ``compile_train_step`` wraps it with
``torch.compile`` at the edge (STYLE habit 6). Learning rates and the ``adv_on`` switch
enter as 0-d float32 tensors on the device and masks as tensors of a fixed shape, so the
step never reads a value back to the host (no ``.item()``, no Python branch on a tensor)
and a compiled step does not recompile when they change.

Gradients come from ``torch.autograd.grad`` over the leaves of the trainable groups
(``value_and_grad``, the counterpart of ``jax.value_and_grad(..., has_aux=True)``); the
optimiser then runs under ``torch.no_grad`` and returns new tensors, so a step is a pure
function of its inputs like the JAX one (the old state stays valid).

The optimiser state and the EMA cover the stage's trainable groups only
(``maetok.train_state``). Stage 1 trains encoder, decoder and auxiliary decoders on
``L_tok + L_mask``. Stage 2 differentiates the decoder only: the encoder runs under
``torch.no_grad`` (JAX: ``stop_gradient``), its parameters are carried through as the very
same tensors, and the auxiliary decoders are not evaluated.
"""

import functools

import numpy as np
import torch

from maetok import params as param_spec
from maetok.train_state import trainable_keys
from maetok.tree import flatten, map_tree, unflatten
from maetok_torch.compiled import compiled, compiling
from maetok_torch.discriminator import (
    discriminator,
    generator_adv_loss,
    hinge_d_loss,
    lecam_loss,
    update_lecam,
)
from maetok_torch.distributed import LOCAL
from maetok_torch.losses import adaptive_adv_weight, mask_loss, rec_percep_loss
from maetok_torch.model import aux_predict, decode, encode
from maetok_torch.optim import (
    OptState,
    clip_by_global_norm,
    ema_decay_at,
    ema_update,
    fused_adam_leaf,
    fused_adam_update,
    make_optimizer,
)
from maetok_torch.targets import compute_targets


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def select_device(name: str | None) -> torch.device:
    """The torch device ``name`` (``cpu``, ``cuda``, ``cuda:N``, ...; None: the best one);
    MAETokError when torch cannot use it here."""
    from maetok.errors import MAETokError

    if name is None:
        return torch.device(default_device())
    try:
        device = torch.device(name)
    except RuntimeError:
        raise MAETokError(f"--device {name} is not a torch device; use cpu or cuda") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise MAETokError(f"--device {name}, but torch sees no CUDA device; use --device cpu")
    try:
        torch.empty(0, device=device)
    except Exception as e:  # noqa: BLE001 - torch raises several types for an unusable device
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise MAETokError(f"--device {name}: torch cannot use it ({reason})") from None
    return device


def _to_tensor(a, device) -> torch.Tensor:
    """numpy / scalar / tensor → tensor on ``device``; 64-bit numbers become 32-bit as in
    JAX (x64 off), so both backends hold the same dtypes."""
    if isinstance(a, torch.Tensor):
        return a.to(device)
    a = np.asarray(a)
    if a.dtype == np.float64:
        a = a.astype(np.float32)
    elif a.dtype == np.int64:
        a = a.astype(np.int32)
    return torch.tensor(a, device=device)  # a copy: checkpoint arrays may be read-only


def init_state(cfg, seed: int, params=None, device=None):
    """A fresh train state from the shared numpy initialiser (or from given ``params``)."""
    device = torch.device(device or default_device())
    if params is None:
        params = param_spec.init_params(cfg, seed)
    params = map_tree(lambda a: _to_tensor(a, device), params)
    trainable = {k: params[k] for k in trainable_keys(cfg.train.stage)}
    opt_init, _ = make_optimizer(cfg.train)
    state = {
        "step": torch.zeros((), dtype=torch.int32, device=device),
        "params": params,
        "opt": opt_init(trainable),
    }
    if cfg.train.ema_decay > 0:
        state["ema"] = map_tree(torch.clone, trainable)
    if cfg.loss.use_adv:
        disc = map_tree(lambda a: _to_tensor(a, device), param_spec.init_disc(cfg, seed))
        state["disc"] = disc
        state["disc_opt"] = opt_init(disc)
        state["lecam"] = {
            "real": torch.zeros((), device=device),
            "fake": torch.zeros((), device=device),
        }
    return state


def value_and_grad(fn, tree, *args, autograd: bool = False):
    """``jax.value_and_grad(fn, has_aux=True)(tree, *args)``: → ((value, aux), grads).

    ``fn(tree, *args) → (scalar, aux)``, ``aux`` a tuple of trees; ``grads`` has the structure
    of ``tree``, with zeros for leaves that do not reach the value, as in JAX. Built on
    ``torch.func`` so that
    ``torch.compile`` traces the backward pass into the step's graph; ``autograd=True`` uses
    ``torch.autograd.grad`` instead, which rematerialised blocks (``model.remat``, through
    ``torch.utils.checkpoint``'s saved-tensor hooks) need.
    """
    if autograd:
        inputs = {k: v.detach().requires_grad_(True) for k, v in flatten(tree).items()}
        with torch.enable_grad():
            value, aux = fn(unflatten(inputs), *args)
        found = torch.autograd.grad(value, list(inputs.values()), allow_unused=True)
        grads = {
            k: torch.zeros_like(v) if g is None else g for (k, v), g in zip(inputs.items(), found)
        }
        detach = lambda a: a.detach() if isinstance(a, torch.Tensor) else a
        return (value.detach(), tuple(map_tree(detach, a) for a in aux)), unflatten(grads)

    def inner(t):
        value, aux = fn(t, *args)
        return value, (value, aux)

    grads, (value, aux) = torch.func.grad(inner, has_aux=True)(tree)
    return (value, aux), grads


def generator_loss(
    trainable, frozen, disc, images, mask, targets, adv_on, cfg, reduce=LOCAL, percep_scale=1.0
):
    """The stage's total loss over the trainable groups → (total, (metrics, recon));
    ``percep_scale`` is the perceptual warm-up's share of λ1 (``schedules.percep_scale``).

    ``reduce`` (``maetok_torch.distributed``) averages over data-parallel ranks the two
    quantities of the loss that are not means over the batch: the adaptive weight's
    gradient norms and the number of masked tokens.
    """
    m, lo, stage = cfg.model, cfg.loss, cfg.train.stage
    params = {**frozen, **trainable}
    if stage == 2:
        with torch.no_grad():
            h = encode(params["encoder"], images, mask, m)
    else:
        h = encode(params["encoder"], images, mask, m)
    recon, feats = decode(params["decoder"], h, m)
    rec_percep, rec, percep = rec_percep_loss(images, recon, m, lo, percep_scale)
    total, metrics = rec_percep, {"rec": rec, "percep": percep}
    if lo.use_adv:
        g_adv = generator_adv_loss(discriminator(disc, recon, m))
        weight = lo.lambda_adv * adv_on
        if lo.adaptive_weight:
            mean = reduce.mean if reduce.world > 1 else None
            weight = weight * adaptive_adv_weight(
                images, recon, feats, disc, m, lo, mean, percep_scale
            )
        total = total + weight * g_adv
        metrics.update(adv=g_adv, adv_weight=weight)
    if stage == 1:
        preds = aux_predict(params["aux"], h, feats, m)
        count = None
        if reduce.world > 1:  # max(1, global count) / N, so the ranks' terms average to L_mask
            count = torch.clamp(reduce.mean(torch.sum(mask)) * reduce.world, min=1.0) / reduce.world
        l_mask, terms = mask_loss(preds, targets, mask, lo, count)
        total = total + l_mask
        metrics["mask"] = l_mask
        metrics.update({f"aux/{name}": term for name, term in terms.items()})
    metrics["loss"] = total
    return total, (metrics, recon)


def disc_loss(disc, images, recon, lecam, lo, m):
    """Hinge loss + LeCAM on real images and (gradient-free) reconstructions."""
    real = discriminator(disc, images, m)
    fake = discriminator(disc, recon.detach(), m)
    hinge = hinge_d_loss(real, fake)
    reg = lecam_loss(real, fake, lecam["real"], lecam["fake"])
    return hinge + lo.lecam_weight * reg, (hinge, reg, real, fake)


def _scalar(x, device) -> torch.Tensor:
    """A float or 0-d tensor → 0-d float32 tensor on ``device`` (no host round trip)."""
    return torch.as_tensor(x, dtype=torch.float32, device=device)


def make_train_step(cfg, reduce=LOCAL, block_backend=None, parts: bool = False):
    """``step(state, images (B,H,W,C), mask (B,N), lr, disc_lr, adv_on, percep_scale)
    → (state, metrics)``: the scalars are ``step_inputs``' (``schedules.step_scalars``).

    ``lr``, ``disc_lr``, ``adv_on`` and ``percep_scale`` are floats or 0-d float32 tensors;
    ``metrics`` is a dict of 0-d float32 tensors still on the device. Under data parallelism
    ``reduce`` is a ``maetok_torch.distributed`` reducer, the batch is this rank's slice of
    the global one, and the update is the one-process update on the global batch.
    ``block_backend``: a ``torch.compile`` backend the transformer blocks run compiled with
    (``model.compile_scope = "block"``), and with ``parts`` the step's other parts, each
    compiled once (``"parts"``, ``maetok_torch.compiled``); None: eager.
    """
    m, lo, t = cfg.model, cfg.loss, cfg.train
    keys = trainable_keys(t.stage)
    _, opt_update = make_optimizer(t)

    fused = parts and t.optimizer in ("adam", "adamw")
    leaf = functools.partial(fused_adam_leaf, t_cfg=t)  # one object: compiled once

    def update(grads, opt, trainable, lr, ema, decay):
        """Clip, optimiser step and EMA (None without one) → (trainable, opt, ema, ‖g‖);
        scope "parts": Adam leaf by leaf through one compiled function."""
        if fused:
            return fused_adam_update(
                grads, opt, trainable, lr, ema, decay, t, compiled(leaf, dynamic=True)
            )
        grads, gnorm = clip_by_global_norm(grads, t.grad_clip)
        trainable, opt = opt_update(grads, opt, trainable, lr)
        return trainable, opt, None if ema is None else ema_update(ema, trainable, decay), gnorm

    def step(*args):
        if block_backend is None:
            return eager_step(*args)
        with compiling(block_backend, parts):
            return eager_step(*args)

    def eager_step(state, images, mask, lr, disc_lr, adv_on, percep_scale):
        dev = images.device
        lr, disc_lr, adv_on, percep_scale = (
            _scalar(x, dev) for x in (lr, disc_lr, adv_on, percep_scale)
        )
        params = state["params"]
        trainable = {k: params[k] for k in keys}
        frozen = {k: v for k, v in params.items() if k not in keys}
        targets = compute_targets(images, m) if t.stage == 1 else {}
        (_, (metrics, recon)), grads = value_and_grad(
            generator_loss,
            trainable,
            frozen,
            state.get("disc"),
            images,
            mask,
            targets,
            adv_on,
            cfg,
            reduce,
            percep_scale,
            # compiled blocks are autograd Functions, which torch.func does not trace
            autograd=m.remat != "none" or reduce.world > 1 or block_backend is not None,
        )
        metrics = {k: v.detach() for k, v in metrics.items()}
        recon = recon.detach()
        with torch.no_grad():
            ema = state.get("ema")
            decay = ema_decay_at(state["step"], t) if ema is not None else None
            trainable, opt, ema, gnorm = update(
                reduce.tree_mean(grads), state["opt"], trainable, lr, ema, decay
            )
            new_state = {**state, "params": {**params, **trainable}, "opt": opt}
            if ema is not None:
                new_state["ema"] = ema
            metrics["grad_norm"] = gnorm
        if lo.use_adv:
            new_state.update(disc_update(state, images, recon, disc_lr, adv_on, metrics))
        new_state["step"] = state["step"] + 1
        return new_state, reduce.metrics({k: _scalar(v, dev).detach() for k, v in metrics.items()})

    def disc_update(state, images, recon, disc_lr, adv_on, metrics):
        (d_total, (hinge, reg, real, fake)), d_grads = value_and_grad(
            disc_loss, state["disc"], images, recon, state["lecam"], lo, m
        )
        with torch.no_grad():
            d_grads, _ = clip_by_global_norm(reduce.tree_mean(d_grads), t.grad_clip)
            disc, disc_opt = opt_update(d_grads, state["disc_opt"], state["disc"], disc_lr)
            if reduce.world > 1:  # the EMAs follow the mean logits of the global batch
                real, fake = reduce.mean(torch.mean(real)), reduce.mean(torch.mean(fake))
            ema_real, ema_fake = update_lecam(
                state["lecam"]["real"], state["lecam"]["fake"], real, fake, lo.lecam_decay
            )
            on = adv_on > 0  # before disc_start the discriminator and its EMA stay as they are

            def keep(new, old):
                if isinstance(new, OptState):
                    return OptState(*(keep(a, b) for a, b in zip(new, old)))
                return map_tree(lambda a, b: torch.where(on, a, b), new, old)

            metrics.update(disc=d_total, disc_hinge=hinge.detach(), lecam=reg.detach())
            return {
                "disc": keep(disc, state["disc"]),
                "disc_opt": keep(disc_opt, state["disc_opt"]),
                "lecam": keep({"real": ema_real, "fake": ema_fake}, state["lecam"]),
            }

    return step


def compile_train_step(cfg, backend: str = "inductor"):
    """The train step under ``torch.compile`` (optional; eager is the default path):
    ``model.compile_scope`` "step" compiles the whole step, "block" only the transformer
    block, once for all stacks of one shape (the rest of the step runs eagerly), "parts"
    the block and each of the step's other parts once (targets, losses, and the optimiser
    update leaf by leaf through one dynamic-shape graph).

    The returned callable has a ``graphs`` attribute: how many graphs the compiler has
    built so far (a graph break counts as one more graph, a recompilation as one more).
    """
    from torch._dynamo import lookup_backend

    compiler = lookup_backend(backend)

    def counting(gm, example_inputs):
        compiled.graphs += 1
        return compiler(gm, example_inputs)

    if cfg.model.compile_scope in ("block", "parts"):
        parts = cfg.model.compile_scope == "parts"
        fn = make_train_step(cfg, block_backend=counting, parts=parts)
    else:
        fn = torch.compile(make_train_step(cfg), backend=counting, dynamic=False)

    def compiled(*args):
        return fn(*args)

    compiled.graphs = 0
    return compiled


def step_inputs(batch, cfg, step: int, device):
    """Host-side arguments of one step, on ``device``: images, mask, then ``step_scalars``
    (lr, disc_lr, the adv switch, the perceptual warm-up's share) as 0-d float32 tensors
    (one host→device copy for the four)."""
    from maetok.schedules import step_scalars

    scalars = _put(np.asarray(step_scalars(step, cfg), np.float32), device)
    images = _put(batch["images"], device)
    mask = _put(batch["mask"], device)
    return images, mask, *scalars.unbind()


def _put(x, device) -> torch.Tensor:
    """A host array as a float32 tensor on ``device`` (a copy). To a GPU through pinned memory
    and a non-blocking copy, as JAX's transfers are: a copy from pageable memory waits for
    every kernel queued before it, so the host could not queue the next step while the
    device ran this one. A tensor (``train_step.py --resident``) is only moved to ``device``
    as float32, a no-op where it already is."""
    if isinstance(x, torch.Tensor):
        return x.to(device, torch.float32)
    if torch.device(device).type != "cuda":
        return torch.tensor(np.asarray(x, np.float32), device=device)
    host = torch.empty(np.shape(x), dtype=torch.float32, pin_memory=True)
    host.numpy()[...] = x  # one host copy, into a block torch's pinned-memory cache reuses
    return host.to(device, non_blocking=True)


def state_to_numpy(state) -> dict:
    """The state as a nested dict of numpy arrays (OptState → {count, mu, nu}) for checkpoints.

    Exactly the JAX backend's tree: same keys, float32 parameters, int32 counts and step.
    """

    def conv(x):
        if isinstance(x, OptState):
            return map_tree(conv, x._asdict())
        return x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)

    return map_tree(conv, state)


def state_from_numpy(tree: dict, device=None) -> dict:
    """Inverse of ``state_to_numpy``, onto ``device``."""
    device = torch.device(device or default_device())
    state = map_tree(lambda a: _to_tensor(a, device), tree)
    for key in ("opt", "disc_opt") & state.keys():
        state[key] = OptState(state[key]["count"], state[key]["mu"], state[key].get("nu", {}))
    return state
