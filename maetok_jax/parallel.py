"""Data parallelism for the JAX backend: one program over a ``Mesh`` of devices (SPMD).

The train step is not changed. The global batch is placed with its first axis split along
the mesh's ``data`` axis, the train state replicated on every device (or, with
``shard_params``, each leaf split along one axis, FSDP-style), and ``jax.jit`` compiles
the one step for the whole mesh: every loss, gradient and batch statistic in the step is a
mean over the global batch, so the compiler inserts the cross-device reductions and the
result is the one-device result up to the order of floating-point sums.

Several hosts: launch one process per host with ``JAX_COORDINATOR_ADDRESS=host:port``,
``JAX_NUM_PROCESSES`` and ``JAX_PROCESS_ID`` set; ``init_distributed`` then calls
``jax.distributed.initialize`` and the mesh spans the devices of every process. Each
process feeds its own contiguous rows of the global batch (``rows``); process 0 writes.
"""

from __future__ import annotations

import os

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from maetok.errors import ConfigError

DATA_AXIS = "data"


def init_distributed() -> None:
    """``jax.distributed.initialize`` from the environment when launched as several processes."""
    count = int(os.environ.get("JAX_NUM_PROCESSES", "1"))
    if count <= 1 or jax.distributed.is_initialized():
        return
    address = os.environ.get("JAX_COORDINATOR_ADDRESS")
    if not address or "JAX_PROCESS_ID" not in os.environ:
        raise ConfigError(
            "JAX_NUM_PROCESSES > 1 needs JAX_COORDINATOR_ADDRESS (host:port of "
            "process 0) and JAX_PROCESS_ID (0 … N−1) in every process"
        )
    jax.distributed.initialize(address, count, int(os.environ["JAX_PROCESS_ID"]))


def make_mesh(devices: int, platform: str | None = None) -> Mesh:
    """A 1-D ``data`` mesh over the first ``devices`` local devices of every process, on
    ``platform`` (default: JAX's default backend)."""
    every = jax.devices(platform)
    local = sum(d.process_index == jax.process_index() for d in every)
    if not 1 <= devices <= local:
        raise ConfigError(
            f"--devices {devices}: this process sees {local} "
            f"{platform or jax.default_backend()} device(s); use 1 to {local}"
        )
    chosen = [
        d
        for p in range(jax.process_count())
        for d in sorted((d for d in every if d.process_index == p), key=lambda d: d.id)[:devices]
    ]
    return Mesh(np.array(chosen), (DATA_AXIS,))


def fsdp_spec(shape: tuple[int, ...], n: int) -> P:
    """Split the largest axis whose length ``n`` divides (first on ties); replicate otherwise."""
    axes = [a for a in range(len(shape)) if shape[a] % n == 0 and shape[a] >= n]
    if n == 1 or not axes:
        return P()
    axis = max(axes, key=lambda a: (shape[a], -a))
    return P(*([None] * axis + [DATA_AXIS]))


class DataParallel:
    """Placement of the state, the batch and results on a mesh (see the module docstring)."""

    def __init__(self, cfg, devices: int, shard_params: bool = False, platform: str | None = None):
        init_distributed()
        self.mesh = make_mesh(devices, platform)
        self.size = self.mesh.devices.size
        self.shard_params = shard_params
        b = cfg.train.batch_size
        if b % self.size:
            raise ConfigError(
                f"batch size {b} does not split over {self.size} devices; "
                f"use a multiple of {self.size}"
            )
        per_process = b // jax.process_count()
        start = jax.process_index() * per_process
        self.rows = slice(start, start + per_process)  # this process's rows of the batch
        self.is_writer = jax.process_index() == 0
        self.replicated = NamedSharding(self.mesh, P())
        self.batch = NamedSharding(self.mesh, P(DATA_AXIS))

    def describe(self) -> str:
        kind = "parameters sharded (FSDP)" if self.shard_params else "parameters replicated"
        hosts = f" on {jax.process_count()} hosts" if jax.process_count() > 1 else ""
        return f"data-parallel over {self.size} devices{hosts}, {kind}"

    # ------------------------------------------------------------------ placement
    def leaf_sharding(self, x) -> NamedSharding:
        if not self.shard_params or np.ndim(x) == 0:
            return self.replicated
        return NamedSharding(self.mesh, fsdp_spec(np.shape(x), self.size))

    def shardings(self, tree):
        return jax.tree_util.tree_map(self.leaf_sharding, tree)

    def put(self, tree, sharding=None):
        """Host or device values (the same in every process) → global arrays on the mesh."""

        def one(x, s):
            x = np.asarray(x)
            return jax.make_array_from_callback(x.shape, s, lambda index: x[index])

        if sharding is not None:
            return jax.tree_util.tree_map(lambda x: one(x, sharding), tree)
        return jax.tree_util.tree_map(lambda x: one(x, self.leaf_sharding(x)), tree)

    def put_rows(self, x: np.ndarray) -> jax.Array:
        """This process's rows (B/P, …) of a global batch → the (B, …) array split on ``data``."""
        x = np.asarray(x)
        shape = (x.shape[0] * jax.process_count(), *x.shape[1:])
        return jax.make_array_from_process_local_data(self.batch, x, shape)

    def fetch(self, tree):
        """Global arrays → numpy in every process (every process must call it)."""
        from jax.experimental import multihost_utils

        def one(x):
            if not isinstance(x, jax.Array) or x.is_fully_addressable:
                return np.asarray(x)
            if x.sharding.is_fully_replicated:
                return np.asarray(x.addressable_data(0))
            return np.asarray(multihost_utils.process_allgather(x, tiled=True))

        return jax.tree_util.tree_map(one, tree)

    @staticmethod
    def max_over_processes(value: int) -> int:
        """The largest ``value`` over the processes (every process must call it)."""
        if jax.process_count() == 1:
            return value
        from jax.experimental import multihost_utils

        return int(np.max(multihost_utils.process_allgather(np.int32(value))))

    # ------------------------------------------------------------------ the step
    def jit_step(self, step_fn, state):
        """``step_fn`` compiled for the mesh: the state keeps its placement across steps."""
        return jax.jit(
            step_fn, donate_argnums=0, out_shardings=(self.shardings(state), self.replicated)
        )
