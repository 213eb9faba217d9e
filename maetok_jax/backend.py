"""The JAX backend as the command line and the trainer see it.

Every backend module (``maetok_jax.backend``, ``maetok_torch.backend``) offers the same
``Backend`` class, so ``maetok.trainer`` and ``maetok.cli`` are written once. Inputs and
outputs at this boundary are numpy arrays; the state stays on the device.

``devices`` picks data parallelism (``maetok_jax.parallel``): ``None`` is the plain
single-device path; ``N`` puts the state and the batch on a mesh of N devices per process
(``N = 1`` included, so the two paths can be timed against each other), on the platform of
``device`` when one is named, and ``default_devices()`` is what training uses when not told.
``rows`` and ``is_writer`` tell the trainer which rows of the global batch this process feeds
and whether it writes the outputs.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from maetok.errors import ConfigError
from maetok_jax import enable_compilation_cache, model, parallel, train


def select_device(name: str | None):
    """The JAX device ``name`` names (a platform, ``cpu``/``cuda``/``tpu``, optionally
    ``:N``); the default device for None. MAETokError when JAX cannot use it here."""
    from maetok.errors import MAETokError

    if name is None:
        return jax.devices()[0]
    platform, _, index = name.partition(":")
    have = ", ".join(sorted({d.platform for d in jax.devices()}))
    try:
        devices = jax.devices(platform)
    except RuntimeError:
        raise MAETokError(
            f"--device {name}, but JAX has no {platform} device here (it has: "
            f"{have}); use --device {jax.default_backend()}"
        ) from None
    if index and not (index.isdigit() and int(index) < len(devices)):
        raise MAETokError(
            f"--device {name}: JAX sees {len(devices)} {platform} device(s), numbered from 0"
        )
    return devices[int(index or 0)]


def _check_deterministic_flag() -> None:
    """Warn when JAX's GPU client started without ``maetok.reproducible``'s flag: then
    ``train.deterministic`` cannot hold in this process (the flag is read at start-up)."""
    import warnings

    from maetok.reproducible import XLA_FLAG, xla_deterministic

    if not xla_deterministic():
        warnings.warn(
            "train.deterministic is on, but JAX's GPU client started without "
            f"XLA_FLAGS={XLA_FLAG}: results may differ run to run (set it before JAX "
            "starts, as `maetok train` does)",
            stacklevel=3,
        )


class Backend:
    name = "jax"

    def __init__(
        self,
        cfg,
        device: str | None = None,
        compile: bool = False,
        devices: int | None = None,
        shard_params: bool = False,
    ):
        # ``compile`` mirrors the torch Backend's switch; the JAX step is always jit-compiled.
        parallel.init_distributed()  # before anything asks JAX for its devices
        enable_compilation_cache()
        self.cfg = cfg
        self.device = select_device(device)
        if device is not None:  # arrays and programs go to the chosen platform from now on
            jax.config.update("jax_default_device", self.device)
        self._step = None
        self._apply = {}
        platform = self.device.platform
        if devices is None and shard_params:
            devices = len(jax.local_devices(backend=platform))
        if devices is not None and ":" in (device or ""):
            raise ConfigError(
                f"--device {device} names one device, but --devices takes a "
                f"platform: pass --device {device.partition(':')[0]} with "
                f"--devices {devices}, or leave out --devices"
            )
        self.dp = (
            parallel.DataParallel(cfg, devices, shard_params, platform)
            if devices is not None
            else None
        )
        self.rows = self.dp.rows if self.dp else slice(None)
        self.is_writer = self.dp.is_writer if self.dp else True

    @staticmethod
    def default_devices(device: str | None = None) -> int | None:
        """Every local device (per process); None for the plain path when there is only one,
        or when ``device`` names the one to use in a single process."""
        parallel.init_distributed()
        if jax.device_count() == 1 or (device is not None and jax.process_count() == 1):
            return None
        return jax.local_device_count()

    def describe(self) -> str:
        where = f"jax {jax.__version__} on {self.device.device_kind}"
        return f"{where}, {self.dp.describe()}" if self.dp else where

    # ------------------------------------------------------------------ state
    def init_state(self, seed: int, params: dict | None = None):
        state = train.init_state(self.cfg, seed, params)
        return self.dp.put(state) if self.dp else state

    def state_to_numpy(self, state) -> dict:
        return train.state_to_numpy(self.dp.fetch(state) if self.dp else state)

    def state_from_numpy(self, tree: dict):
        state = train.state_from_numpy(tree)
        return self.dp.put(state) if self.dp else state

    # ------------------------------------------------------------------ training
    def train_step(self, state, batch: dict, step: int):
        """One compiled step; returns the new state and device-side metrics (no host sync)."""
        if self._step is None and self.cfg.train.deterministic and self.device.platform == "gpu":
            _check_deterministic_flag()
        if self.dp:
            if self._step is None:
                self._step = self.dp.jit_step(train.make_train_step(self.cfg), state)
            return self._step(state, *train.step_inputs(batch, self.cfg, step, self.dp.put_rows))
        if self._step is None:
            self._step = train.jit_train_step(self.cfg)
        return self._step(state, *train.step_inputs(batch, self.cfg, step))

    def compiled_count(self) -> int:
        """How many programs the train step has compiled (1 after the first step)."""
        return 0 if self._step is None else self._step._cache_size()

    def metrics_to_host(self, metrics) -> dict[str, float]:
        if self.dp:
            metrics = self.dp.fetch(metrics)
        return {k: float(v) for k, v in jax.device_get(metrics).items()}

    def agree_stop(self, signum: int | None) -> int | None:
        """A stop request (a signal number) made to any process, the same in every process,
        so that all of them stop after the same step."""
        if self.dp is None:
            return signum
        return self.dp.max_over_processes(signum or 0) or None

    # ------------------------------------------------------------------ inference
    def _put(self, x, dtype=None):
        """An input array: on the mesh (replicated) under data parallelism, else as is."""
        x = np.asarray(x, dtype)
        return self.dp.put(x, self.dp.replicated) if self.dp else jnp.asarray(x)

    def _get(self, y) -> np.ndarray:
        return self.dp.fetch(y) if self.dp else np.asarray(y)

    def _jit(self, name, fn):
        if name not in self._apply:
            self._apply[name] = jax.jit(fn)
        return self._apply[name]

    def reconstruct(self, params, images: np.ndarray, mask: np.ndarray | None = None) -> np.ndarray:
        """images (B, H, W, C) in [-1, 1] → reconstructions, with ``mask`` (B, N) or none."""
        m = self.cfg.model
        if mask is None:
            mask = np.zeros((images.shape[0], m.num_patches), np.float32)
        fn = self._jit("reconstruct", lambda p, x, k: model.forward(p, x, k, m, with_aux=False)[0])
        return self._get(fn(params, self._put(images), self._put(mask)))

    def encode(self, params, images: np.ndarray) -> np.ndarray:
        """images (B, H, W, C) → latent tokens (B, L, latent_dim), no mask."""
        m = self.cfg.model
        mask = np.zeros((images.shape[0], m.num_patches), np.float32)
        fn = self._jit("encode", lambda p, x, k: model.encode(p["encoder"], x, k, m))
        return self._get(fn(params, self._put(images), self._put(mask)))

    def decode(self, params, latents: np.ndarray) -> np.ndarray:
        """latent tokens (B, L, latent_dim) → images (B, H, W, C)."""
        m = self.cfg.model
        fn = self._jit("decode", lambda p, h: model.decode(p["decoder"], h, m)[0])
        return self._get(fn(params, self._put(latents, np.float32)))

    @staticmethod
    def peak_memory_bytes() -> int | None:
        """Peak device memory in use so far (None where the platform does not say)."""
        stats = jax.devices()[0].memory_stats() or {}
        return stats.get("peak_bytes_in_use")

    def to_device_tree(self, tree: dict):
        return self.dp.put(tree) if self.dp else jax.tree_util.tree_map(jnp.asarray, tree)
