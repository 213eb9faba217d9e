"""Reproducible training on GPUs: the same command twice gives the same checkpoint.

On a CPU both backends are bit-identical run to run. On a GPU two things break that by
default: kernels that reduce with atomics (scatter-adds, some attention backward passes,
split-K matmuls) and autotuners that pick a kernel by timing it, so two runs may pick
differently. ``train.deterministic`` (on by default; ``maetok train --nondeterministic``
turns it off) asks each framework for deterministic kernels:

- JAX: ``--xla_gpu_deterministic_ops=true`` in ``XLA_FLAGS``, read when JAX first starts its
  GPU client. ``request`` must therefore run before anything in the process asks JAX for a
  device; the trainer calls it before it builds the backend.
- torch: ``CUBLAS_WORKSPACE_CONFIG=:4096:8`` (read when cuBLAS starts) here, and
  ``torch.use_deterministic_algorithms`` with cuDNN autotuning off in
  ``maetok_torch.backend`` (``deterministic_torch``).

What it costs in speed: ``benchmarks/train_step.py --deterministic`` against the same row
without it (``bash benchmarks/gpu.sh determinism``).
"""

from __future__ import annotations

import os

XLA_FLAG = "--xla_gpu_deterministic_ops=true"
CUBLAS_WORKSPACE = ":4096:8"


def request(backend: str, deterministic: bool) -> None:
    """Set the environment ``backend`` (``jax`` or ``torch``) reads at start-up so that its
    GPU kernels are deterministic; nothing when ``deterministic`` is False. Flags the user
    set already are kept."""
    if not deterministic:
        return
    if backend == "jax":
        flags = os.environ.get("XLA_FLAGS", "")
        if "xla_gpu_deterministic_ops" not in flags:
            os.environ["XLA_FLAGS"] = f"{flags} {XLA_FLAG}".strip()
    elif backend == "torch":
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", CUBLAS_WORKSPACE)
    else:
        raise ValueError(f"unknown backend {backend!r}; use jax or torch")


def xla_deterministic() -> bool:
    """Whether this process asked XLA for deterministic GPU kernels (``request``, or the user's
    own ``XLA_FLAGS``); the JAX backend then avoids kernels XLA cannot run that way."""
    return XLA_FLAG in os.environ.get("XLA_FLAGS", "").split()
