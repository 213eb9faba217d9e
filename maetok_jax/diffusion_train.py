"""Training the latent diffusion model: state, the compiled step, and the loop.

The state is a plain dict pytree ``{"step", "params", "ema", "opt"}``; parameters, EMA and
Adam moments are float32 (the master copy) while the DiT computes in
``cfg.compute_dtype``. The optimiser is the project's AdamW (``maetok_jax.optim``), with the
``DiffusionConfig`` itself as its settings, and the learning rate comes from
``maetok.schedules.learning_rate`` on the host.

The whole training set of normalised latents (N, L, h) and labels (N,) stays on the device;
each step draws its batch and all its randomness inside the compiled step from
``fold_in(key(seed), step)``: B indices uniformly with replacement, then times, noise and
label drops. A step's inputs are therefore a pure function of (seed, step), and a resumed
run continues bit for bit as an uninterrupted one.

Output folder::

    out/diffusion.safetensors   the state, the latent statistics, config and tokenizer
    out/metrics.jsonl           one JSON object per step, written at each log interval
    out/curves.png              loss curves, written at the end
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from maetok import checkpoint as ckpt
from maetok.errors import CheckpointError
from maetok.params import init_dit
from maetok.schedules import due, learning_rate
from maetok.trainer import check_finite
from maetok_jax.flow import flow_loss
from maetok_jax.optim import clip_by_global_norm, ema_update, make_optimizer
from maetok_jax.train import state_from_numpy, state_to_numpy

CHECKPOINT_NAME = "diffusion.safetensors"
STD_FLOOR = 1e-6  # a channel with (near) zero spread is scaled by this instead of 0


def init_state(cfg, params=None):
    """A fresh state from the shared numpy initialiser (or from given ``params``)."""
    if params is None:
        params = init_dit(cfg, cfg.seed)
    params = jax.tree_util.tree_map(lambda a: jnp.asarray(a, jnp.float32), params)
    return {
        "step": jnp.zeros((), jnp.int32),
        "params": params,
        "ema": jax.tree_util.tree_map(jnp.array, params),
        "opt": make_optimizer(cfg)[0](params),
    }


def make_train_step(cfg):
    """``step(state, latents (N, L, h), labels (N,), lr) → (state, metrics)``, compiled.

    The state's buffers are donated; metrics stay on the device until the caller pulls them.
    """
    root = jax.random.key(cfg.seed)
    _, opt_update = make_optimizer(cfg)

    def step(state, latents, labels, lr):
        key = jax.random.fold_in(root, state["step"])
        k_batch, k_loss = jax.random.split(key)
        idx = jax.random.randint(k_batch, (cfg.batch_size,), 0, latents.shape[0])
        x, y = latents[idx], labels[idx]  # (B, L, h), (B,)
        loss, grads = jax.value_and_grad(flow_loss)(state["params"], x, y, k_loss, cfg)
        grads, gnorm = clip_by_global_norm(grads, cfg.grad_clip)
        params, opt = opt_update(grads, state["opt"], state["params"], lr)
        ema = ema_update(state["ema"], params, cfg.ema_decay)
        new_state = {"step": state["step"] + 1, "params": params, "ema": ema, "opt": opt}
        return new_state, {"loss": loss, "grad_norm": gnorm}

    return jax.jit(step, donate_argnums=(0,))


def latent_norm(latents: np.ndarray) -> dict[str, np.ndarray]:
    """Per-channel statistics of latents (N, L, h) over N and L: {"mean", "std"}, (h,) float32."""
    flat = np.asarray(latents, np.float64).reshape(-1, latents.shape[-1])
    return {
        "mean": flat.mean(0).astype(np.float32),
        "std": np.maximum(flat.std(0), STD_FLOOR).astype(np.float32),
    }


def expected_layout(cfg) -> dict:
    """Flat key → (shape, dtype) that a diffusion checkpoint of ``cfg`` must have."""
    norm = {"mean": np.zeros(cfg.token_dim, np.float32), "std": np.zeros(cfg.token_dim, np.float32)}
    shapes = jax.eval_shape(lambda: init_state(cfg))
    return ckpt.layout(
        {
            **state_to_numpy(jax.tree_util.tree_map(lambda s: np.zeros(s.shape, s.dtype), shapes)),
            "norm": norm,
        }
    )


def fit(
    cfg,
    latents: np.ndarray,
    labels: np.ndarray,
    norm: dict,
    out_dir,
    meta: dict,
    resume: bool = False,
    stop_at: int | None = None,
    progress: bool = True,
) -> dict:
    """Train on normalised ``latents`` (N, L, h) and ``labels`` (N,) up to ``cfg.steps``.

    ``norm`` ({"mean", "std"} (h,)) and ``meta`` (tokenizer path and sha256) are written
    into every checkpoint. With ``resume`` the state is read from ``out_dir``; ``stop_at``
    ends early (as an interruption would). Returns the last logged metrics.
    """
    from tqdm import tqdm

    from maetok.viz import plot_curves

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / CHECKPOINT_NAME
    if resume:
        tree, _, _ = ckpt.load_diffusion(path, expected_layout(cfg))
        tree.pop("norm")
        state = state_from_numpy(tree)
    else:
        state = init_state(cfg)
    start = int(state["step"])
    end = cfg.steps if stop_at is None else min(stop_at, cfg.steps)
    data = jnp.asarray(latents, jnp.float32), jnp.asarray(labels, jnp.int32)
    train_step = make_train_step(cfg)

    def save(step_done: int) -> None:  # written on the saver's thread while training goes on
        tree = {**state_to_numpy(state), "norm": norm}
        saver.save(path, tree, cfg, {**meta, "step": step_done}, write=ckpt.save_diffusion)

    last_saved, host, pending = None, {}, []
    t0, done = time.perf_counter(), 0
    with (
        open(out / "metrics.jsonl", "a") as log,
        tqdm(
            total=end - start,
            desc="diffusion",
            unit="step",
            disable=not progress,
            dynamic_ncols=True,
        ) as bar,
        ckpt.BackgroundSaver() as saver,  # exits first: the last write is on disk after it
    ):
        for step in range(start, end):
            lr = learning_rate(step, cfg)
            state, metrics = train_step(state, *data, np.float32(lr))
            pending.append((step, lr, metrics))
            done += 1
            last = step + 1 == end
            checkpoint_now = due(step + 1, cfg.ckpt_every) or last
            if due(step + 1, cfg.log_every) or checkpoint_now:
                pulled = jax.device_get([m for _, _, m in pending])  # the one host sync
                rate = done * cfg.batch_size / max(time.perf_counter() - t0, 1e-9)
                for (s, lr_s, _), values in zip(pending, pulled):
                    host = {k: float(v) for k, v in values.items()}
                    where = (
                        f"the last good checkpoint (step {last_saved}) is {path}"
                        if last_saved is not None
                        else "no checkpoint had been written yet"
                    )
                    check_finite(host, f"step {s}", f"{where}; try a lower lr or more warm-up")
                    host.update(step=s, lr=lr_s, samples_per_s=rate)
                    log.write(json.dumps(host) + "\n")
                log.flush()
                pending.clear()
                bar.set_postfix(loss=f"{host['loss']:.4f}", samples_s=f"{rate:.0f}")
                if checkpoint_now:
                    save(step + 1)
                    last_saved = step + 1
                t0, done = time.perf_counter(), 0
            bar.update(1)
    if (out / "metrics.jsonl").stat().st_size:
        plot_curves(out / "metrics.jsonl", out / "curves.png")
    if start >= end and not path.exists():
        raise CheckpointError(f"nothing to train: steps {cfg.steps} and no checkpoint in {out}")
    return host
