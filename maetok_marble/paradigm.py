"""MAETok as a learning-paradigm plugin for Marble (Brain + Wanderer), docs/design.md §9.

The tokenizer trains alongside a Marble walk: one MAETok iteration per Wanderer step, on
the Wanderer's device, with its own parameters and hand-written optimiser. The walk's own
learning is left exactly as it would be without the plugin: nothing here consumes
``w.rng``, touches the Wanderer's optimiser or loss, seeds torch's global generator, or
lets an autograd graph reach the host's tensors (the train step is a pure function of
its own detached state; ``out_value`` is never read).

Usage (see ``examples/marble_maetok.py``)::

    from maetok_marble import register
    register()                                    # registers the class under "maetok"
    brain.load_paradigm("maetok", {"preset": "tiny", "train.batch_size": 8, "stage2_start": 500})

Hooks, per ``MARBLE_PROTOCOL.md``:

- ``on_wanderer(w)``: builds the train state on ``w._device`` the first time; again for
  the same Wanderer it does nothing (idempotent); a later Wanderer on another device
  receives the state moved there, never re-initialised.
- ``on_init(w)``: records the seeds of the paradigm's own streams (data order and masks
  derive from ``train.seed``); it never draws from ``w.rng`` nor seeds torch.
- ``before_walk(w, start)``: runs ``pretrain_steps`` iterations, once, before the first walk.
- ``on_step(...)``: one iteration per call, the dead-end call (``syn=None``,
  ``direction="none"``) included, so the count of iterations equals the count of calls.
  The mask is a pure function of ``(train.seed, w._global_step_counter)``, drawn by the
  trainer's schedule (``maetok.masks.mask_for_step``, with ``substream_seed`` for repeated
  steps); the batch follows the paradigm's own iteration counter. At iteration
  ``stage2_start`` Stage 2 begins: encoder frozen, mask ratio annealed, started exactly as
  ``maetok train --stage 2 --init-from`` starts it (``maetok.train_state.start_stage2``):
  parameters, discriminator and LeCAM statistics kept; step, optimisers and EMA afresh.
- ``on_walk_end(w, stats)``: averages over the walk's iterations, reported and kept in
  ``self.walks``. Should a host skip it, the next ``before_walk`` closes the walk instead.

The host swallows exceptions from hooks, so every hook here catches its own: the error is
logged, reported under ``<name>/errors``, kept in ``last_error`` (with a short traceback)
and counted in ``error_count``, and training stops (``stopped``): later calls return at
once until ``clear_error()``. A rejected config cannot reach an instance at all (the host
then builds ``cls()``), so the failure is parked in ``LAST_CONFIG_ERROR`` and the fallback
instance reports it at ``on_wanderer`` and refuses to train with defaults.
"""

from __future__ import annotations

import functools
import logging
import threading
import time
import traceback
from pathlib import Path

import numpy as np
import torch

from maetok import checkpoint as ckpt
from maetok.errors import CheckpointError, ConfigError, MAETokError
from maetok.masks import mask_for_step, substream_seed
from maetok.schedules import due, learning_rate
from maetok.train_state import ema_params, expected_layout, start_stage2
from maetok.trainer import check_finite
from maetok_marble.settings import (
    Settings,
    as_images,
    latent_summary,
    parse_settings,
    walk_averages,
)

log = logging.getLogger("maetok.marble")

# The last config the constructor rejected: the host retries ``cls()`` right after, and that
# fallback instance claims it (same thread, within a few seconds) and reports it.
LAST_CONFIG_ERROR: dict | None = None
_CLAIM_WINDOW_S = 5.0


class MarbleNotInstalledError(ImportError, MAETokError):
    """``register()`` could not import ``marble.marblemain``."""


def register(name: str = "maetok"):
    """Register ``MAETokParadigm`` with Marble under ``name``; returns the class."""
    import importlib

    try:
        marblemain = importlib.import_module("marble.marblemain")
    except ImportError as e:
        if getattr(e, "name", None) in ("marble", "marble.marblemain"):
            raise MarbleNotInstalledError(
                "Marble is not installed, so the MAETok paradigm cannot be registered. Marble "
                "is not on the package index: clone its repository (the one providing "
                "marble/marblemain.py, github.com/FreddyE1982/_marble at the time of writing) "
                "and `pip install -e .` inside it, or put its folder on PYTHONPATH."
            ) from e
        raise MarbleNotInstalledError(
            f"Marble is installed but `import marble.marblemain` failed: {e}"
        ) from e
    marblemain.register_learning_paradigm_type(name, MAETokParadigm)
    return MAETokParadigm


def _hook(fn):
    """Run a hook under the paradigm's lock; an exception is recorded, never raised."""

    @functools.wraps(fn)
    def guarded(self, *args):
        with self._lock:
            if self.stopped and fn.__name__ != "on_walk_end":
                return None
            try:
                return fn(self, *args)
            except Exception as e:  # noqa: BLE001 - the host would swallow it silently
                self._record_error(fn.__name__, e)
                return None

    return guarded


class MAETokParadigm:
    """The MAETok tokenizer trained by Marble's walks; options: ``settings.parse_settings``."""

    def __init__(self, config=None):
        global LAST_CONFIG_ERROR
        self._lock = threading.RLock()
        self.history: list[dict] = []  # one record per iteration
        self.walks: list[dict] = []  # one summary per walk
        self.last_error: str | None = None
        self.error_count = 0
        self.stopped = False
        self._claimed_config_error = None
        if config is None:
            self._claimed_config_error = _claim_config_error()
        try:
            self.settings: Settings = parse_settings(config)
        except Exception as e:
            keys = sorted(map(str, config)) if hasattr(config, "keys") else []
            LAST_CONFIG_ERROR = {
                "message": f"{type(e).__name__}: {e}",
                "keys": keys,
                "time": time.monotonic(),
                "thread": threading.get_ident(),
            }
            log.error("MAETokParadigm: config rejected: %s", e)
            raise
        self.name = self.settings.name
        self.iteration = 0  # iterations run so far (the batch index)
        self.stage = 1
        self.stage_start = 0  # iteration at which the current stage began
        self.pretrained = self.settings.pretrain_steps == 0
        self._backends: dict = {}
        self._state = None
        self._device: str | None = None
        self._attached: set[int] = set()
        self._mask_key = (None, -1)  # (last Wanderer step, calls seen at it)
        self._walk: dict | None = None
        self._reporter = None  # Marble's report(), looked up once; False: absent

    # ------------------------------------------------------------------ Marble hooks
    @_hook
    def on_wanderer(self, w):
        if self._claimed_config_error is not None:
            err, self._claimed_config_error = self._claimed_config_error, None
            raise ConfigError(
                f"the config given to load_paradigm was rejected ({err['message']}); "
                "the host fell back to a default instance, which will not train"
            )
        key = f"maetok:{id(self)}"
        store = getattr(w, "_plugin_state", None)
        if (store.get(key) is not None) if isinstance(store, dict) else id(w) in self._attached:
            return  # the same Wanderer again: keep the state as it is
        self._unique_name(w)
        self._ensure_state(self.settings.device or str(getattr(w, "_device", None) or "cpu"))
        if isinstance(store, dict):
            store[key] = {"paradigm": "maetok", "name": self.name}
        self._attached.add(id(w))

    @_hook
    def on_init(self, w):
        self._ensure_state(self.settings.device or str(getattr(w, "_device", None) or "cpu"))
        t = self.settings.cfg.train
        self._report(
            self.name,
            "events",
            {
                "init": {
                    "seed": t.seed,
                    "iteration": self.iteration,
                    "stage": self.stage,
                    "device": self._device,
                }
            },
        )

    @_hook
    def before_walk(self, w, start_neuron):
        if self._walk is not None:  # the host skipped on_walk_end: close that walk now
            self._close_walk(None)
        if not self.pretrained:
            for i in range(self.settings.pretrain_steps):
                self._iterate(("pretrain", i), dead_end=False)
            self.pretrained = True
            self._report(
                self.name, "pretrain", walk_averages(self.history[-self.settings.pretrain_steps :])
            )
        self._walk = {"index": len(self.walks) + 1, "first": self.iteration}

    @_hook
    def on_step(self, w, current, syn, direction, step_index, out_value):
        if self._walk is None:  # a host that calls on_step without before_walk
            self._walk = {"index": len(self.walks) + 1, "first": self.iteration}
        g = getattr(w, "_global_step_counter", None)
        if not isinstance(g, (int, np.integer)) or isinstance(g, bool):
            g = self.iteration  # no counter on this host: the paradigm's own
        self._iterate(("walk", int(g)), dead_end=syn is None)

    @_hook
    def on_walk_end(self, w, stats):
        if self._walk is not None:
            self._close_walk(stats if isinstance(stats, dict) else None)

    # ------------------------------------------------------------------ state
    @property
    def cfg(self):
        """The config of the current stage."""
        return self.settings.stage_cfg(self.stage)

    def _backend(self, stage: int | None = None):
        from maetok_torch.backend import Backend

        stage = self.stage if stage is None else stage
        key = (stage, self._device)
        if key not in self._backends:
            self._backends[key] = Backend(self.settings.stage_cfg(stage), self._device)
        return self._backends[key]

    def _ensure_state(self, device: str | None = None):
        """Build the state once (on ``device``), or move it there; never re-initialise."""
        from maetok_torch.train import default_device

        device = str(device or self._device or self.settings.device or default_device())
        if self._state is None:
            self._device = device
            self._state = self._backend().init_state(self.settings.cfg.train.seed, self._weights())
        elif device != self._device:
            tree = self._backend().state_to_numpy(self._state)
            self._device = device
            self._state = self._backend().state_from_numpy(tree)
        return self._state

    def _weights(self) -> dict | None:
        """The parameters to start from: ``init_from``'s encoder and decoder (the rest as a
        fresh start makes them), or None for a fresh start."""
        if self.settings.init_from is None:
            return None
        from maetok.params import init_params
        from maetok.pretrained import INFERENCE_GROUPS, load_params

        _, weights = load_params(self.settings.init_from, model=self.settings.cfg)
        params = init_params(self.settings.cfg, self.settings.cfg.train.seed)
        return {**params, **{g: weights[g] for g in INFERENCE_GROUPS}}

    def numpy_state(self) -> dict:
        """The whole train state as numpy (the checkpoint's tree)."""
        return self._backend().state_to_numpy(self._ensure_state())

    def _enter_stage2(self):
        """Stage 2 starts as ``maetok train --stage 2 --init-from`` starts it (``start_stage2``)."""
        tree = self.numpy_state()
        self.stage, self.stage_start = 2, self.iteration
        self._state = start_stage2(self._backend(2), tree, self.cfg)
        self._report(self.name, "events", {"stage2": {"iteration": self.iteration}})

    # ------------------------------------------------------------------ one iteration
    def _mask_for(self, key, batch: int, stage_step: int):
        """The mask of ``key``; a repeated Wanderer step gets the next sub-stream."""
        kind, g = key
        if kind == "walk":
            sub = self._mask_key[1] + 1 if self._mask_key[0] == g else 0
            self._mask_key = (g, sub)
        else:
            sub = -1 - g  # pretraining iteration g: sub-streams no walk uses
        step = g if kind == "walk" else 0
        seed = substream_seed(self.cfg.train.seed, sub)
        n = self.cfg.model.num_patches
        return mask_for_step(step, self.cfg.train, n, seed, stage_step, batch)

    def _iterate(self, key, dead_end: bool):
        s = self.settings
        if s.stage2_start is not None and self.stage == 1 and self.iteration >= s.stage2_start:
            self._enter_stage2()
        state = self._ensure_state()
        backend, t = self._backend(), self.cfg.train
        stage_step = self.iteration - self.stage_start
        images = s.source.batch(self.iteration)  # (B, H, W, C)
        mask, ratio = self._mask_for(key, images.shape[0], stage_step)
        with torch.enable_grad(), _no_autocast(self._device):
            new_state, metrics = backend.train_step(
                state, {"images": images, "mask": mask}, stage_step
            )
        values = backend.metrics_to_host(metrics)
        # on a NaN the last good state is kept (save() still writes it)
        check_finite(values, f"iteration {self.iteration}", "try a lower lr or more warm-up")
        self._state = new_state
        record = {
            "iteration": self.iteration,
            "stage": self.stage,
            "stage_step": stage_step,
            "wanderer_step": key[1] if key[0] == "walk" else None,
            "pretrain": key[0] == "pretrain",
            "dead_end": dead_end,
            "walk": self._walk["index"] if self._walk else 0,
            "mask_ratio": ratio,
            "lr": learning_rate(stage_step, t),
            **values,
        }
        self.history.append(record)
        if len(self.history) > s.history_limit:
            del self.history[: len(self.history) - s.history_limit]
        self._report("training", f"step_{self.iteration}", dict(record), self.name)
        aux = {k.split("/", 1)[1]: v for k, v in values.items() if k.startswith("aux/")}
        if aux:
            self._report(self.name, "aux", {**aux, "iteration": self.iteration})
        if due(self.iteration, s.stats_every):
            self._report(self.name, "tokens", self.token_stats(images))
        self.iteration += 1

    def token_stats(self, images) -> dict:
        """Latent statistics of ``images`` (see ``settings.latent_summary``)."""
        x = as_images(images, self.cfg.model.channels)
        h = self._backend().encode(self._ensure_state()["params"], x)  # (B, L, latent_dim)
        return {**latent_summary(h), "iteration": self.iteration}

    # ------------------------------------------------------------------ walks and reports
    def _close_walk(self, stats: dict | None):
        walk, self._walk = self._walk, None
        records = [r for r in self.history if r["iteration"] >= walk["first"] and not r["pretrain"]]
        summary = {
            "walk": walk["index"],
            "iterations": len(records),
            "stage": self.stage,
            "first_iteration": walk["first"],
            "end_iteration": self.iteration,
            "dead_ends": sum(r["dead_end"] for r in records),
            **walk_averages(records),
        }
        if stats is not None:
            summary.update(host_loss=_float(stats.get("loss")), host_steps=stats.get("steps"))
        self.walks.append(summary)
        self._report(self.name, f"walk_{walk['index']}", summary, "walks")

    def _unique_name(self, w):
        """A second MAETok paradigm on the same brain reports under ``<name>_2`` etc."""
        brain = getattr(w, "brain", None)
        others = [
            p
            for p in (getattr(brain, "_paradigms", None) or [])
            if p is not self and isinstance(p, MAETokParadigm)
        ]
        taken = {p.name for p in others if p._state is not None}
        if self.name in taken:
            k = 2
            while f"{self.settings.name}_{k}" in taken:
                k += 1
            log.warning(
                "MAETokParadigm: report name %r is taken on this brain; using %r",
                self.name,
                f"{self.settings.name}_{k}",
            )
            self.name = f"{self.settings.name}_{k}"

    def _report(self, group: str, item: str, data: dict, *subgroups: str) -> None:
        if self._reporter is None:
            try:
                from marble.marblemain import report

                self._reporter = report
            except Exception:  # noqa: BLE001 - no Marble (or a broken one): history only
                self._reporter = False
        if self._reporter:
            try:
                self._reporter(group, item, data, *subgroups)
            except Exception:  # a failing reporter must not stop training
                log.debug("Marble's report() failed for %s/%s", group, item, exc_info=True)

    def _record_error(self, hook: str, e: BaseException) -> None:
        tb = "".join(traceback.format_exception(type(e), e, e.__traceback__, limit=-6))
        self.last_error = f"{hook}: {type(e).__name__}: {e}\n{tb}"
        self.error_count += 1
        self.stopped = True
        log.error(
            "MAETokParadigm %r: %s in %s at iteration %d: %s; training stopped (see .last_error)",
            self.name,
            type(e).__name__,
            hook,
            self.iteration,
            e,
        )
        self._report(
            self.name,
            "errors",
            {
                "count": self.error_count,
                "hook": hook,
                "error": f"{type(e).__name__}: {e}",
                "iteration": self.iteration,
                "traceback": tb,
            },
        )

    def summary(self) -> dict:
        """Where training stands: iteration, stage, the last iteration's metrics, errors."""
        last = self.history[-1] if self.history else {}
        return {
            "name": self.name,
            "device": self._device,
            "iteration": self.iteration,
            "stage": self.stage,
            "walks": len(self.walks),
            "stopped": self.stopped,
            "error_count": self.error_count,
            "last_error": self.last_error,
            **{k: v for k, v in last.items() if isinstance(v, float)},
        }

    def clear_error(self) -> None:
        """Resume training after an error (``last_error`` and ``error_count`` stay)."""
        self.stopped = False

    # ------------------------------------------------------------------ checkpoints
    def save(self, path) -> Path:
        """Write the state in the project's checkpoint format (usable by ``maetok`` and JAX)."""
        with self._lock:
            meta = {
                "backend": "torch",
                "stage": self.stage,
                "iteration": self.iteration,
                "stage_start": self.stage_start,
                "pretrained": self.pretrained,
                "mask_key": list(self._mask_key),
                "paradigm": self.settings.summary,
            }
            return ckpt.save_checkpoint(path, self.numpy_state(), self.cfg, meta)

    def load(self, path) -> MAETokParadigm:
        """Restore a checkpoint (this paradigm's or ``maetok train``'s): state, stage, iteration."""
        with self._lock:
            return self._restore(path, *ckpt.load_checkpoint(path, self.settings.cfg))

    def _restore(self, path, tree: dict, file_cfg, meta: dict) -> MAETokParadigm:
        from maetok_torch.train import default_device

        stage = int(meta.get("stage", file_cfg.train.stage))
        self._device = self._device or str(self.settings.device or default_device())
        backend = self._backend(stage)
        want = expected_layout(self.settings.stage_cfg(stage))
        have = ckpt.layout(tree)
        if have != want:
            diff = sorted(set(have) ^ set(want)) + sorted(
                k for k in set(have) & set(want) if have[k] != want[k]
            )
            raise CheckpointError(
                f"{path} does not fit this paradigm's stage-{stage} state "
                f"(e.g. {diff[:5]}); check loss.use_adv, train.ema_decay, train.optimizer"
            )
        self.stage, self._state = stage, backend.state_from_numpy(tree)
        step = int(np.asarray(tree["step"]))
        self.iteration = int(meta.get("iteration", step))
        self.stage_start = int(meta.get("stage_start", self.iteration - step))
        self.pretrained = bool(meta.get("pretrained", True))
        g, sub = meta.get("mask_key", [None, -1])
        self._mask_key = (g, int(sub))
        return self

    @classmethod
    def from_checkpoint(cls, path, config=None) -> MAETokParadigm:
        """A paradigm built from the checkpoint's config and options (``config`` overrides)."""
        tree, file_cfg, meta = ckpt.load_checkpoint(path)
        sections = file_cfg.replace(train={"stage": 1}).to_dict()
        saved = meta.get("paradigm") if isinstance(meta.get("paradigm"), dict) else {}
        options = {
            **{k: v for k, v in saved.items() if k != "preset"},
            "model": sections["model"],
            "loss": sections["loss"],
            "train": sections["train"],
            **dict(config or {}),
        }
        return cls(options)._restore(path, tree, file_cfg, meta)

    # ------------------------------------------------------------------ inference
    def _params(self, use_ema: bool):
        state = self._ensure_state()
        if use_ema and "ema" not in state:
            raise MAETokError("this tokenizer keeps no EMA (ema_decay = 0)")
        return ema_params(state) if use_ema else state["params"]

    def reconstruct(self, images, mask=None, use_ema: bool = False) -> np.ndarray:
        """images ((B,H,W,C) or NCHW; uint8 or [-1, 1]) → reconstructions (B,H,W,C) in [-1, 1]."""
        with self._lock:
            x = as_images(images, self.cfg.model.channels)
            return self._backend().reconstruct(self._params(use_ema), x, mask)

    def encode(self, images, use_ema: bool = False) -> np.ndarray:
        """images → latent tokens (B, L, latent_dim)."""
        with self._lock:
            x = as_images(images, self.cfg.model.channels)
            return self._backend().encode(self._params(use_ema), x)

    def decode(self, latents, use_ema: bool = False) -> np.ndarray:
        """latent tokens (B, L, latent_dim) → images (B, H, W, C)."""
        with self._lock:
            return self._backend().decode(self._params(use_ema), np.asarray(latents, np.float32))

    def __repr__(self) -> str:
        return (
            f"MAETokParadigm(name={self.name!r}, stage={self.stage}, "
            f"iteration={self.iteration}, stopped={self.stopped})"
        )


def _claim_config_error() -> dict | None:
    """The config error the host's ``cls()`` retry follows, if it is that retry."""
    global LAST_CONFIG_ERROR
    err = LAST_CONFIG_ERROR
    if (
        err
        and err["thread"] == threading.get_ident()
        and time.monotonic() - err["time"] < _CLAIM_WINDOW_S
    ):
        LAST_CONFIG_ERROR = None
        return err
    return None


def _no_autocast(device: str | None):
    """The host may run its own passes under autocast; the tokenizer stays in its dtype."""
    kind = torch.device(device or "cpu").type
    return torch.autocast(device_type=kind, enabled=False)


def _float(x):
    try:
        return float(x)
    except (TypeError, ValueError):
        return None
