"""The JAX backend as the command line and the trainer see it.

Every backend module (``maetok_jax.backend``, ``maetok_torch.backend``) offers the same
``Backend`` class, so ``maetok.trainer`` and ``maetok.cli`` are written once. Inputs and
outputs at this boundary are numpy arrays; the state stays on the device.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from maetok_jax import enable_compilation_cache, model, train


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
        raise MAETokError(f"--device {name}, but JAX has no {platform} device here (it has: "
                          f"{have}); use --device {jax.default_backend()}") from None
    if index and not (index.isdigit() and int(index) < len(devices)):
        raise MAETokError(f"--device {name}: JAX sees {len(devices)} {platform} device(s), "
                          f"numbered from 0")
    return devices[int(index or 0)]


class Backend:
    name = "jax"

    def __init__(self, cfg, device: str | None = None, compile: bool = False):
        # ``compile`` mirrors the torch Backend's switch; the JAX step is always jit-compiled.
        enable_compilation_cache()
        self.cfg = cfg
        self.device = select_device(device)
        if device is not None:  # arrays and programs go to the chosen platform from now on
            jax.config.update("jax_default_device", self.device)
        self._step = None
        self._apply = {}

    def describe(self) -> str:
        return f"jax {jax.__version__} on {self.device.device_kind}"

    # ------------------------------------------------------------------ state
    def init_state(self, seed: int, params: dict | None = None):
        return train.init_state(self.cfg, seed, params)

    def state_to_numpy(self, state) -> dict:
        return train.state_to_numpy(state)

    def state_from_numpy(self, tree: dict):
        return train.state_from_numpy(tree)

    # ------------------------------------------------------------------ training
    def train_step(self, state, batch: dict, step: int):
        """One compiled step; returns the new state and device-side metrics (no host sync)."""
        if self._step is None:
            self._step = train.jit_train_step(self.cfg)
        return self._step(state, *train.step_inputs(batch, self.cfg, step))

    def compiled_count(self) -> int:
        """How many programs the train step has compiled (1 after the first step)."""
        return 0 if self._step is None else self._step._cache_size()

    @staticmethod
    def metrics_to_host(metrics) -> dict[str, float]:
        return {k: float(v) for k, v in jax.device_get(metrics).items()}

    # ------------------------------------------------------------------ inference
    def _jit(self, name, fn):
        if name not in self._apply:
            self._apply[name] = jax.jit(fn)
        return self._apply[name]

    def reconstruct(self, params, images: np.ndarray, mask: np.ndarray | None = None) -> np.ndarray:
        """images (B, H, W, C) in [-1, 1] → reconstructions, with ``mask`` (B, N) or none."""
        m = self.cfg.model
        if mask is None:
            mask = np.zeros((images.shape[0], m.num_patches), np.float32)
        fn = self._jit("reconstruct",
                       lambda p, x, k: model.forward(p, x, k, m, with_aux=False)[0])
        return np.asarray(fn(params, jnp.asarray(images), jnp.asarray(mask)))

    def encode(self, params, images: np.ndarray) -> np.ndarray:
        """images (B, H, W, C) → latent tokens (B, L, latent_dim), no mask."""
        m = self.cfg.model
        mask = jnp.zeros((images.shape[0], m.num_patches), jnp.float32)
        fn = self._jit("encode", lambda p, x, k: model.encode(p["encoder"], x, k, m))
        return np.asarray(fn(params, jnp.asarray(images), mask))

    def decode(self, params, latents: np.ndarray) -> np.ndarray:
        """latent tokens (B, L, latent_dim) → images (B, H, W, C)."""
        m = self.cfg.model
        fn = self._jit("decode", lambda p, h: model.decode(p["decoder"], h, m)[0])
        return np.asarray(fn(params, jnp.asarray(latents, jnp.float32)))

    @staticmethod
    def peak_memory_bytes() -> int | None:
        """Peak device memory in use so far (None where the platform does not say)."""
        stats = jax.devices()[0].memory_stats() or {}
        return stats.get("peak_bytes_in_use")

    def to_device_tree(self, tree: dict):
        return jax.tree_util.tree_map(jnp.asarray, tree)
