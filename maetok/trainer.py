"""The training loop, written once for every backend.

It owns what is not numerics: batches from the data pipeline (prefetched), the learning
rate and mask schedules (through ``maetok.masks``/``schedules``), progress, the metrics log,
atomic checkpoints, reconstruction pictures, and stopping cleanly on a NaN loss. The
backend (``maetok_jax.backend`` or ``maetok_torch.backend``) runs the compiled step.

Output folder layout::

    out/checkpoint.safetensors   latest good state (atomic: a crash never leaves half a file)
    out/metrics.jsonl            one JSON object per logged step
    out/samples/step_XXXXXX.png  originals / masked input / reconstructions
    out/curves.png               loss curves, written at the end
"""

from __future__ import annotations

import importlib
import json
import math
import os
import time
from pathlib import Path

import numpy as np

from maetok import checkpoint as ckpt
from maetok.config import Config
from maetok.data import BatchSource, Prefetcher
from maetok.errors import CheckpointError, NonFiniteLossError
from maetok.schedules import learning_rate

CHECKPOINT_NAME = "checkpoint.safetensors"


def get_backend(name: str):
    """The ``Backend`` class of ``jax`` or ``torch`` (imported on demand)."""
    if name not in ("jax", "torch"):
        raise ValueError(f"unknown backend {name!r}; use jax or torch")
    return importlib.import_module(f"maetok_{name}.backend").Backend


def expected_layout(backend, cfg: Config) -> dict:
    """The flat key → (shape, dtype) layout a checkpoint of ``cfg`` must have."""
    return ckpt.layout(backend.state_to_numpy(backend.init_state(0)))


def load_state(backend, path, cfg: Config):
    """Load a full train state written by either backend, checking it against ``cfg``."""
    tree, _, _ = ckpt.load_checkpoint(path, cfg, expected_layout(backend, cfg))
    return backend.state_from_numpy(tree)


def params_from_checkpoint(path, cfg: Config, use_ema: bool = False) -> dict:
    """Only the tokenizer parameters (or their EMA) of a checkpoint, as numpy, checked."""
    tree, file_cfg, _ = ckpt.load_checkpoint(path, cfg)
    key = "ema" if use_ema else "params"
    if key not in tree:
        raise CheckpointError(f"{path} holds no {key!r} (EMA was off when it was trained)")
    from maetok.params import flatten, spec_params
    want = {k: v.shape for k, v in flatten(spec_params(cfg.model)).items()}
    have = {k: v.shape for k, v in flatten(tree[key]).items()}
    if want != have:
        missing = sorted(set(want) - set(have))[:5]
        wrong = sorted(k for k in set(want) & set(have) if want[k] != have[k])[:5]
        raise CheckpointError(f"{path}: parameters do not match the config "
                              f"(missing {missing}, wrong shape {wrong})")
    return tree[key]


def init_from_checkpoint(backend, path, cfg: Config):
    """A fresh train state (step 0, fresh optimiser) starting from a checkpoint's weights.

    The tokenizer parameters seed both ``params`` and the EMA; a discriminator and its
    LeCAM statistics are carried over too when the checkpoint has them and ``cfg`` uses one.
    """
    params = params_from_checkpoint(path, cfg)
    state = backend.state_to_numpy(backend.init_state(cfg.train.seed, params))
    if "ema" in state:
        state["ema"] = params
    if cfg.loss.use_adv:
        tree, _, _ = ckpt.load_checkpoint(path, cfg)
        for key in ("disc", "lecam"):
            if key in tree:
                state[key] = tree[key]
    return backend.state_from_numpy(state)


def _check_finite(metrics: dict, step: int, out: Path, last_saved: int | None):
    bad = {k: v for k, v in metrics.items() if not math.isfinite(v)}
    if bad:
        where = (f"the last good checkpoint (step {last_saved}) is {out / CHECKPOINT_NAME}"
                 if last_saved is not None else "no checkpoint had been written yet")
        raise NonFiniteLossError(
            f"non-finite loss at step {step} ({', '.join(f'{k}={v}' for k, v in bad.items())}); "
            f"training stopped and {where}. Try a lower --lr or more warm-up.")


def train(cfg: Config, dataset, out_dir, backend_name: str = "jax", init_from=None,
          resume: bool = False, stop_at: int | None = None, progress: bool = True,
          device: str | None = None, compile: bool = False, devices: int | None = None,
          shard_params: bool = False) -> dict:
    """Train ``cfg.train.steps`` steps (or up to ``stop_at``) and return the last metrics.

    ``compile`` puts the torch step under ``torch.compile``; the JAX step is jit-compiled
    either way. ``devices``: data parallelism (JAX: the mesh size, default every local
    device; torch: the world size of ``torchrun``, which it must equal); ``shard_params``
    shards the JAX state over the devices (FSDP). Only one process writes to ``out_dir``.
    """
    from tqdm import tqdm

    from maetok.viz import plot_curves, save_grid

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    backend_cls = get_backend(backend_name)
    devices = backend_cls.default_devices() if devices is None else devices
    backend = backend_cls(cfg, device, compile=compile, devices=devices, shard_params=shard_params)
    path = out / CHECKPOINT_NAME
    if resume:
        if not path.exists():
            raise CheckpointError(f"--resume: no checkpoint at {path}")
        state = load_state(backend, path, cfg)
    elif init_from is not None:
        state = init_from_checkpoint(backend, init_from, cfg)
    else:
        state = backend.init_state(cfg.train.seed)
    start = int(backend.state_to_numpy({"step": state["step"]})["step"])
    end = cfg.train.steps if stop_at is None else min(stop_at, cfg.train.steps)

    t = cfg.train
    source = BatchSource(dataset, cfg, train=True, rows=backend.rows)
    preview = BatchSource(dataset, cfg, train=False).batch(0)
    writer = backend.is_writer  # data parallel: one process writes, all compute
    log = open(out / "metrics.jsonl" if writer else os.devnull, "a")
    last_saved, host = None, {}
    pending = []  # (step, device metrics) not yet pulled: no host sync inside the loop
    t0, seen = time.perf_counter(), 0
    bar = tqdm(total=end - start, initial=0, desc=f"stage {t.stage}",
               disable=not (progress and writer), unit="step", dynamic_ncols=True)
    try:
        workers = min(8, os.cpu_count() or 2)  # decoding and cropping run in numpy threads
        with Prefetcher(source, start, end, depth=2 * workers, workers=workers) as batches:
            for step, batch in zip(range(start, end), batches):
                state, device_metrics = backend.train_step(state, batch, step)
                pending.append((step, batch["mask_ratio"], device_metrics))
                seen += t.batch_size
                last = step + 1 == end
                if (step + 1) % t.log_every == 0 or last or (step + 1) % t.ckpt_every == 0:
                    pulled = [(s, r, backend.metrics_to_host(dm)) for s, r, dm in pending]
                    # throughput over the interval since the last pull (the pull above waits
                    # for the device), so compilation and checkpoints stay out of later ones
                    rate = seen / max(time.perf_counter() - t0, 1e-9)
                    for s, ratio, host in pulled:
                        _check_finite(host, s, out, last_saved)
                        host.update(step=s, mask_ratio=ratio, lr=learning_rate(s, t),
                                    images_per_s=rate)
                        log.write(json.dumps(host) + "\n")
                    pending.clear()
                    log.flush()
                    t0, seen = time.perf_counter(), 0
                    bar.set_postfix(loss=f"{host['loss']:.4f}", rec=f"{host['rec']:.4f}",
                                    img_s=f"{host['images_per_s']:.1f}")
                bar.update(1)
                if (step + 1) % t.ckpt_every == 0 or last:
                    tree = backend.state_to_numpy(state)
                    if writer:
                        ckpt.save_checkpoint(path, tree, cfg,
                                             {"backend": backend.name, "stage": t.stage})
                    last_saved = step + 1
                if (step + 1) % t.sample_every == 0 or last:
                    recon = backend.reconstruct(state["params"], preview["images"],
                                                preview["mask"])
                    if writer:
                        save_grid(out / "samples" / f"step_{step + 1:06d}.png",
                                  preview["images"], recon, masks=preview["mask"],
                                  patch_size=cfg.model.patch_size)
                if (step + 1) % t.ckpt_every == 0 or (step + 1) % t.sample_every == 0:
                    t0 = time.perf_counter()
    finally:
        bar.close()
        log.close()
    peak = getattr(backend, "peak_memory_bytes", lambda: None)()
    if peak is not None:
        host["peak_memory_gib"] = peak / 2 ** 30
    if writer and (out / "metrics.jsonl").stat().st_size:
        plot_curves(out / "metrics.jsonl", out / "curves.png")
    return host
