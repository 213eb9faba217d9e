"""The training loop, written once for every backend.

It owns what is not numerics: batches from the data pipeline (prefetched), the learning
rate and mask schedules (through ``maetok.masks``/``schedules``), progress, the metrics log,
atomic checkpoints, reconstruction pictures, and stopping cleanly on a NaN loss or on
SIGTERM/SIGINT (after saving a checkpoint at the next step boundary). The backend
(``maetok_jax.backend`` or ``maetok_torch.backend``) runs the compiled step; under data
parallelism only its writer process writes the output folder.

Output folder layout::

    out/config.json              the config, as ``--config`` reads it
    out/checkpoint.safetensors   latest good state (atomic: a crash never leaves half a file),
                                 with the run's identity and history (``maetok.run``)
    out/metrics.jsonl            one JSON object per logged step, up to the checkpoint's step
                                 when a run is resumed
    out/maetok.lock              while a run writes here: its PID and host
    out/samples/step_XXXXXX.png  originals / masked input / reconstructions
    out/curves.png               loss curves, written at the end
"""

from __future__ import annotations

import importlib
import json
import math
import os
import signal
import threading
import time
from contextlib import contextmanager
from pathlib import Path

from maetok import checkpoint as ckpt
from maetok import reproducible, run
from maetok.config import Config
from maetok.data import BatchSource, Prefetcher
from maetok.errors import CheckpointError, NonFiniteLossError, TrainingStopped
from maetok.params import spec_params
from maetok.run import CHECKPOINT_NAME
from maetok.schedules import due, learning_rate
from maetok.train_state import ema_params, expected_layout, start_stage2, trainable_keys
from maetok.tree import flatten


def get_backend(name: str):
    """The ``Backend`` class of ``jax`` or ``torch`` (imported on demand)."""
    if name not in ("jax", "torch"):
        raise ValueError(f"unknown backend {name!r}; use jax or torch")
    return importlib.import_module(f"maetok_{name}.backend").Backend


def load_state(backend, checkpoint: ckpt.Checkpoint, cfg: Config):
    """The full train state of a checkpoint (written by either backend), checked against
    ``cfg`` and the exact layout ``cfg`` implies (``maetok.train_state.expected_layout``)."""
    want = expected_layout(cfg)
    extra = set(checkpoint.flat) - set(want)
    frozen = sorted(set(trainable_keys(1)) - set(trainable_keys(cfg.train.stage)))
    stale = tuple(f"{part}/{g}/" for part in ("opt/mu", "opt/nu", "ema") for g in frozen)
    if extra and set(want) <= set(checkpoint.flat) and all(k.startswith(stale) for k in extra):
        raise CheckpointError(
            f"checkpoint {checkpoint.path} has the older train-state layout, with optimiser "
            f"moments and EMA also for the groups Stage {cfg.train.stage} freezes "
            f"({', '.join(frozen)}); --resume cannot continue it: start a new run from its "
            f"weights with --init-from {checkpoint.path}"
        )
    return backend.state_from_numpy(checkpoint.check(cfg, want))


def params_from_checkpoint(path, cfg: Config, use_ema: bool = False) -> dict:
    """Only the tokenizer parameters (or their EMA) of a checkpoint, as numpy, checked.

    Checkpoints of every train-state layout qualify: only ``params`` and ``ema`` are read.
    """
    checkpoint = ckpt.read_checkpoint(path)
    return params_of(checkpoint.path, checkpoint.check(cfg), cfg, use_ema)


def params_of(path, tree: dict, cfg: Config, use_ema: bool) -> dict:
    """The parameters (or their EMA) of a checked checkpoint ``tree`` read from ``path``."""
    if use_ema and "ema" not in tree:
        raise CheckpointError(f"{path} holds no 'ema' (EMA was off when it was trained)")
    params = ema_params(tree) if use_ema else tree["params"]
    check_params(path, params, spec_params(cfg.model))
    return params


def check_params(path, params: dict, spec: dict) -> None:
    """CheckpointError unless ``params`` has exactly the leaves and shapes of ``spec``."""
    want = {k: v.shape for k, v in flatten(spec).items()}
    have = {k: v.shape for k, v in flatten(params).items()}
    if want != have:
        missing = sorted(set(want) - set(have))[:5]
        wrong = sorted(k for k in set(want) & set(have) if want[k] != have[k])[:5]
        raise CheckpointError(
            f"{path}: parameters do not match the config (missing {missing}, wrong shape {wrong})"
        )


def init_from_checkpoint(backend, path, cfg: Config):
    """A fresh train state of ``cfg``'s stage from a checkpoint's weights, the file read
    once; ``maetok.train_state.start_stage2`` says what is kept and what starts afresh."""
    checkpoint = ckpt.read_checkpoint(path)
    tree = checkpoint.check(cfg)
    params = params_of(checkpoint.path, tree, cfg, use_ema=False)
    return start_stage2(backend, {**tree, "params": params}, cfg)


def check_finite(metrics: dict[str, float], at: str, advice: str) -> None:
    """The one finiteness check of a training loop's host-side metrics: NonFiniteLossError
    naming where (``at``, e.g. ``"step 12"``), the non-finite values and ``advice``."""
    bad = {k: v for k, v in metrics.items() if not math.isfinite(v)}
    if bad:
        raise NonFiniteLossError(
            f"non-finite loss at {at} ({', '.join(f'{k}={v}' for k, v in bad.items())}); "
            f"training stopped; {advice}"
        )


def _resume_advice(out: Path, last_saved: int | None, lr: float) -> str:
    """What to do after a NaN stopped ``maetok train``."""
    if last_saved is None:
        return (
            "no checkpoint had been written yet: start again with a lower --lr "
            "(and --overwrite) or more warm-up"
        )
    return (
        f"the last good checkpoint (step {last_saved}) is {out / CHECKPOINT_NAME}: "
        f"continue it with a lower learning rate, e.g. maetok train --resume "
        f"--out {out} --lr {lr / 10:g}"
    )


def _truncate_metrics(path: Path, start: int) -> None:
    """Keep only the rows of steps before ``start``: a resumed run logs the rest again.

    A last line cut short by a kill is dropped too. Rewritten atomically.
    """
    if not path.exists():
        return
    keep = []
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict) and isinstance(row.get("step"), int) and row["step"] < start:
            keep.append(line + "\n")
    ckpt.write_text(path, "".join(keep))


@contextmanager
def _stop_requests():
    """Within the block, SIGTERM and SIGINT only set ``requested[0]`` to the signal number;
    the loop saves and stops at the next step boundary. A second signal acts as usual."""
    requested: list[int | None] = [None]
    if threading.current_thread() is not threading.main_thread():
        yield requested  # signals reach the main thread only
        return
    previous = {}

    def handler(signum, frame):
        requested[0] = signum
        for sig, old in previous.items():  # the next one is not deferred
            signal.signal(sig, old)

    for sig in (signal.SIGTERM, signal.SIGINT):
        previous[sig] = signal.signal(sig, handler)
    try:
        yield requested
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def train(
    cfg: Config,
    dataset,
    out_dir,
    backend_name: str = "jax",
    init_from=None,
    resume: bool | ckpt.Checkpoint = False,
    stop_at: int | None = None,
    progress: bool = True,
    device: str | None = None,
    compile: bool = False,
    devices: int | None = None,
    shard_params: bool = False,
    changes: dict | None = None,
) -> dict:
    """Train ``cfg.train.steps`` steps (or up to ``stop_at``) and return the last metrics.

        ``compile`` puts the torch step under ``torch.compile``; the JAX step is jit-compiled
        either way. ``devices``: data parallelism (JAX: the mesh size, default every local
        device unless ``device`` names one; torch: the world size of ``torchrun``, which it must
        equal); ``shard_params`` shards the JAX state over the devices (FSDP). ``resume``: True to
    continue the run in ``out_dir``, or its checkpoint already read (``maetok.run.resume``
    reads it), so the file is read once. With ``resume``,
        ``changes`` (``{"what": [old, new]}``, see ``maetok.run.resume``) is recorded in the
        run's history.

        Only the writer process (``backend.is_writer``: the only one, or rank 0 of several)
        holds the output folder (``maetok.run.claim``) and writes to it; the others compute the
        same steps and leave it alone. SIGTERM or SIGINT to any process save a checkpoint at
        the next step boundary and raise ``TrainingStopped`` in every process, after the same
        step.
    """
    reproducible.request(backend_name, cfg.train.deterministic)  # before the backend starts
    backend_cls = get_backend(backend_name)
    if devices is None:
        devices = backend_cls.default_devices(device)
    backend = backend_cls(cfg, device, compile=compile, devices=devices, shard_params=shard_params)
    if not backend.is_writer:
        return _train(
            cfg, dataset, Path(out_dir), backend, init_from, resume, stop_at, progress, changes
        )
    with run.claim(out_dir) as out:
        return _train(cfg, dataset, out, backend, init_from, resume, stop_at, progress, changes)


def _train(cfg, dataset, out: Path, backend, init_from, resume, stop_at, progress, changes) -> dict:
    from tqdm import tqdm

    from maetok.viz import plot_curves, save_grid

    writer = backend.is_writer  # data parallel: one process writes, all compute
    if writer:
        (out / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2))
    path = out / CHECKPOINT_NAME
    history = []
    if resume:
        if resume is True:
            if not path.exists():
                raise CheckpointError(f"--resume: no checkpoint at {path}")
            resume = ckpt.read_checkpoint(path)
        state = load_state(backend, resume, cfg)
        history = list(resume.meta.get("history", []))
    elif init_from is not None:
        state = init_from_checkpoint(backend, init_from, cfg)
    else:
        state = backend.init_state(cfg.train.seed)
    start = int(backend.state_to_numpy({"step": state["step"]})["step"])
    end = cfg.train.steps if stop_at is None else min(stop_at, cfg.train.steps)
    if resume and changes:
        history.append(run.history_entry(start, changes))
    identity = {"backend": backend.name, "data": run.data_identity(dataset), "history": history}

    t = cfg.train
    source = BatchSource(dataset, cfg, train=True, rows=backend.rows)
    preview = BatchSource(dataset, cfg, train=False).batch(0)
    if writer:
        _truncate_metrics(out / "metrics.jsonl", start)
    log = open(out / "metrics.jsonl" if writer else os.devnull, "a")  # noqa: SIM115 - closed in the finally below
    last_saved, host = (start if resume else None), {}
    pending = []  # (step, device metrics) not yet pulled: no host sync inside the loop
    t0, seen = time.perf_counter(), 0
    bar = tqdm(
        total=end - start,
        initial=0,
        desc=f"stage {t.stage}",
        disable=not (progress and writer),
        unit="step",
        dynamic_ncols=True,
    )
    try:
        workers = min(8, os.cpu_count() or 2)  # decoding and cropping run in numpy threads
        with (
            _stop_requests() as stop,
            Prefetcher(source, start, end, depth=2 * workers, workers=workers) as batches,
            ckpt.BackgroundSaver() as saver,  # checkpoints are written while training goes on
        ):
            for step, batch in zip(range(start, end), batches):
                state, device_metrics = backend.train_step(state, batch, step)
                pending.append((step, batch["mask_ratio"], device_metrics))
                seen += t.batch_size  # the global batch, over every process
                done = step + 1
                last = done == end
                stopping = backend.agree_stop(stop[0])  # read once: it may change any time
                save = due(done, t.ckpt_every) or last or stopping is not None
                if due(done, t.log_every) or save:
                    pulled = [(s, r, backend.metrics_to_host(dm)) for s, r, dm in pending]
                    # throughput over the interval since the last pull (the pull above waits
                    # for the device), so compilation and checkpoints stay out of later ones
                    rate = seen / max(time.perf_counter() - t0, 1e-9)
                    for s, ratio, host in pulled:
                        try:
                            check_finite(host, f"step {s}", _resume_advice(out, last_saved, t.lr))
                        except NonFiniteLossError:
                            saver.wait()  # the checkpoint the advice names is on disk
                            raise
                        host.update(
                            step=s, mask_ratio=ratio, lr=learning_rate(s, t), images_per_s=rate
                        )
                        log.write(json.dumps(host) + "\n")
                    pending.clear()
                    log.flush()
                    t0, seen = time.perf_counter(), 0
                    bar.set_postfix(
                        loss=f"{host['loss']:.4f}",
                        rec=f"{host['rec']:.4f}",
                        img_s=f"{host['images_per_s']:.1f}",
                    )
                bar.update(1)
                if save:
                    tree = backend.state_to_numpy(state)  # every process: it may gather
                    if writer:
                        saver.save(
                            path, tree, cfg, {"stage": t.stage, "step": step + 1, **identity}
                        )
                    last_saved = step + 1
                if stopping is not None:
                    saver.wait()  # the checkpoint the message names is on disk
                    raise TrainingStopped(stopping, step + 1, path)
                if due(done, t.sample_every) or last:
                    recon = backend.reconstruct(state["params"], preview["images"], preview["mask"])
                    if writer:
                        save_grid(
                            out / "samples" / f"step_{step + 1:06d}.png",
                            preview["images"],
                            recon,
                            masks=preview["mask"],
                            patch_size=cfg.model.patch_size,
                        )
                if due(done, t.ckpt_every) or due(done, t.sample_every):
                    t0 = time.perf_counter()
    finally:
        bar.close()
        log.close()
    peak = getattr(backend, "peak_memory_bytes", lambda: None)()
    if peak is not None:
        host["peak_memory_gib"] = peak / 2**30
    if writer and (out / "metrics.jsonl").stat().st_size:
        plot_curves(out / "metrics.jsonl", out / "curves.png")
    return host
