"""The torch backend as the command line and the trainer see it. Mirrors ``maetok_jax/backend.py``.

Every backend module (``maetok_jax.backend``, ``maetok_torch.backend``) offers the same
``Backend`` class, so ``maetok.trainer`` and ``maetok.cli`` are written once. Inputs and
outputs at this boundary are numpy arrays (images channel-last, as everywhere); the state
lives on one device, ``cuda`` when torch sees a GPU and ``cpu`` otherwise.

With ``devices`` given (``default_devices()`` under ``torchrun``), the backend joins the
process group at construction (``maetok_torch.distributed``): this process uses
``cuda:LOCAL_RANK`` (or the CPU, with gloo), feeds rows ``rows`` of the global batch, and
only rank 0 ``is_writer``. ``devices`` must equal the world size: one process per device.
Without it the backend is the plain one-process path, whatever launched it.
"""

from __future__ import annotations

import numpy as np
import torch

from maetok.errors import ConfigError
from maetok.tree import map_tree
from maetok_torch import distributed, model, train


def deterministic_kernels() -> None:
    """Deterministic CUDA kernels for the rest of the process (``maetok.reproducible``): an
    op without one warns once instead of failing, and cuDNN stops autotuning."""
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False


class Backend:
    name = "torch"

    def __init__(
        self,
        cfg,
        device: str | None = None,
        compile: bool = False,
        devices: int | None = None,
        shard_params: bool = False,
    ):
        if shard_params:
            raise ConfigError(
                "sharding the parameters (FSDP) is a JAX option; torch keeps a "
                "full copy per process"
            )
        self.cfg = cfg
        self.dist = distributed.from_env(devices) if devices is not None else None
        if self.dist and compile:
            raise ConfigError("--compile runs one process; under torchrun the step runs eager")
        # after joining the process group: a plain "cuda" is then this rank's own GPU
        chosen = train.select_device(device)
        if (
            self.dist
            and device is not None
            and (
                chosen.type != self.dist.device.type
                or chosen.index not in (None, self.dist.device.index)
            )
        ):
            raise ConfigError(
                f"--device {device}: under torchrun each process uses its own "
                f"device ({self.dist.device} here); leave out --device"
            )
        self.device = self.dist.device if self.dist else chosen
        if cfg.train.deterministic and self.device.type == "cuda":
            deterministic_kernels()
        self.compile = compile
        self._step = None
        self.rows = self.dist.batch_rows(cfg.train.batch_size) if self.dist else slice(None)
        self.is_writer = not self.dist or self.dist.rank == 0

    @staticmethod
    def default_devices(device: str | None = None) -> int | None:
        """The processes torchrun started (None: one process, the plain path), whatever
        ``device`` says: under torchrun each process takes its own device."""
        world = distributed.world_size()
        return world if world > 1 else None

    def describe(self) -> str:
        where = torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else "cpu"
        mode = "torch.compile" if self.compile else "eager"
        world = f", {self.dist.world} processes" if self.dist else ""
        return f"torch {torch.__version__} on {where} ({mode}{world})"

    # ------------------------------------------------------------------ state
    def init_state(self, seed: int, params: dict | None = None):
        return train.init_state(self.cfg, seed, params, self.device)

    def state_to_numpy(self, state) -> dict:
        return train.state_to_numpy(state)

    def state_from_numpy(self, tree: dict):
        return train.state_from_numpy(tree, self.device)

    # ------------------------------------------------------------------ training
    def train_step(self, state, batch: dict, step: int):
        """One step; returns the new state and device-side metrics (no host sync)."""
        if self._step is None:
            self._step = (
                train.compile_train_step(self.cfg)
                if self.compile
                else train.make_train_step(
                    self.cfg, self.dist.reducer if self.dist else distributed.LOCAL
                )
            )
        return self._step(state, *train.step_inputs(batch, self.cfg, step, self.device))

    def agree_stop(self, signum: int | None) -> int | None:
        """A stop request (a signal number) made to any process, the same in every process,
        so that all of them stop after the same step."""
        if self.dist is None:
            return signum
        return self.dist.max_over_ranks(signum or 0) or None

    def compiled_count(self) -> int:
        """How many programs the train step has built: 0 before the first step.

        Eager: 1 once the step function exists (nothing is ever recompiled). With
        ``compile=True``: the number of graphs ``torch.compile`` has built, which stays
        constant across steps unless something recompiles (a graph break adds a graph once).
        """
        if self._step is None:
            return 0
        return self._step.graphs if self.compile else 1

    @staticmethod
    def metrics_to_host(metrics) -> dict[str, float]:
        keys = list(metrics)
        if not keys:
            return {}
        values = torch.stack([metrics[k].to(torch.float32) for k in keys]).cpu().tolist()
        return dict(zip(keys, values))  # one transfer for all metrics

    # ------------------------------------------------------------------ inference
    def _tensor(self, x: np.ndarray) -> torch.Tensor:
        return train._put(x, self.device)

    @torch.no_grad()
    def reconstruct(self, params, images: np.ndarray, mask: np.ndarray | None = None) -> np.ndarray:
        """images (B, H, W, C) in [-1, 1] → reconstructions, with ``mask`` (B, N) or none."""
        m = self.cfg.model
        if mask is None:
            mask = np.zeros((images.shape[0], m.num_patches), np.float32)
        recon = model.forward(params, self._tensor(images), self._tensor(mask), m, with_aux=False)[
            0
        ]
        return recon.cpu().numpy()

    @torch.no_grad()
    def encode(self, params, images: np.ndarray) -> np.ndarray:
        """images (B, H, W, C) → latent tokens (B, L, latent_dim), no mask."""
        m = self.cfg.model
        mask = torch.zeros(
            (images.shape[0], m.num_patches), dtype=torch.float32, device=self.device
        )
        return model.encode(params["encoder"], self._tensor(images), mask, m).cpu().numpy()

    @torch.no_grad()
    def decode(self, params, latents: np.ndarray) -> np.ndarray:
        """latent tokens (B, L, latent_dim) → images (B, H, W, C)."""
        images, _ = model.decode(params["decoder"], self._tensor(latents), self.cfg.model)
        return images.cpu().numpy()

    def to_device_tree(self, tree: dict):
        return map_tree(lambda a: train._to_tensor(a, self.device), tree)

    def peak_memory_bytes(self) -> int | None:
        """Peak CUDA memory allocated so far (None on the CPU)."""
        if torch.device(self.device).type != "cuda":
            return None
        return int(torch.cuda.max_memory_allocated(self.device))
