"""What every parity check shares: a ``Case`` (the config, the device, a seeded generator),
the numpy → backend conversions, the row a comparison makes, and the set-up that keeps a
comparison meaningful (``disc_off_margin``, fp32 pinned to fp32 on a GPU).

Errors are relative to the JAX value (``maetok.parity.tree_err``: max|torch − jax| /
max|jax| per array, the worst leaf of a tree), held to ``maetok.parity.TOL``.
"""

from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass, field

import jax
import jax.numpy as jnp
import numpy as np
import torch

from maetok.params import init_disc, init_params
from maetok.parity import PARITY_BATCH, TOL, tree_err
from maetok.tree import map_tree

Row = tuple[str, float, float]  # (name, relative error, tolerance)


def jax_device(device: str):
    """The JAX device that stands for ``device`` ("cpu" or "cuda")."""
    return jax.devices("gpu")[0] if device == "cuda" else jax.devices("cpu")[0]


@dataclass
class Case:
    """One run of a check: the config it reads, where both backends run, its inputs' seed.

    In ``bfloat16`` compute (``cfg.model.compute_dtype``) model inputs are cast with
    ``compute=True`` and the forward and gradient tolerances are the bf16 ones.
    """

    cfg: object  # maetok.config.Config
    device: str = "cpu"
    rng: np.random.Generator = field(default_factory=lambda: np.random.default_rng(0))

    @property
    def bf16(self) -> bool:
        return self.cfg.model.compute_dtype == "bfloat16"

    @property
    def forward_tol(self) -> float:
        return TOL["loss_bf16"] if self.bf16 else TOL["forward_fp32"]

    @property
    def grad_tol(self) -> float:
        return TOL["grad_bf16"] if self.bf16 else TOL["grad_fp32"]

    # ------------------------------------------------------------------ conversions
    def jax(self, tree, compute: bool = False):
        """numpy tree → JAX arrays on the case's device (cast to the compute dtype)."""
        dev = jax_device(self.device)
        cast = jnp.bfloat16 if compute and self.bf16 else None

        def conv(a):
            x = jax.device_put(np.asarray(a), dev)
            return x if cast is None else x.astype(cast)

        return map_tree(conv, tree)

    def torch(self, tree, compute: bool = False):
        """numpy tree → torch tensors on the case's device (cast to the compute dtype)."""
        dev = torch.device(self.device)
        cast = torch.bfloat16 if compute and self.bf16 else None

        def conv(a):
            t = torch.as_tensor(np.array(a), device=dev)
            return t if cast is None else t.to(cast)

        return map_tree(conv, tree)

    # ------------------------------------------------------------------ inputs
    def images(self, b: int = PARITY_BATCH) -> np.ndarray:
        m = self.cfg.model
        return self.rng.uniform(-1, 1, (b, m.image_size, m.image_size, m.channels)).astype(
            np.float32
        )

    def mask(self, b: int = PARITY_BATCH) -> np.ndarray:
        """A random token mask, never all-masked or all-visible."""
        ratio = self.rng.uniform(0.3, 0.7)
        mask = (self.rng.random((b, self.cfg.model.num_patches)) < ratio).astype(np.float32)
        mask[0, :2] = (1.0, 0.0)
        return mask

    def normal(self, *shape, scale: float = 1.0) -> np.ndarray:
        return (scale * self.rng.standard_normal(shape)).astype(np.float32)

    def seed(self) -> int:
        return int(self.rng.integers(1 << 30))

    def params(self, cfg=None) -> dict:
        return init_params(cfg or self.cfg, self.seed())

    def disc(self, images: np.ndarray) -> dict:
        """Discriminator parameters off the hinge margin for ``images`` (``disc_off_margin``)."""
        return disc_off_margin(init_disc(self.cfg, self.seed()), images, self.cfg.model)


def row(name: str, torch_value, jax_value, tol: float) -> Row:
    """(name, the worst relative error of the torch value against the JAX one, tol)."""
    return (name, tree_err(torch_value, jax_value), float(tol))


def max_abs(a, b) -> float:
    """max|a − b| of two arrays of one shape (numpy, JAX or CPU torch)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    assert a.shape == b.shape, f"shape {a.shape} vs {b.shape}"
    return float(np.max(np.abs(a - b), initial=0.0))


def exact(name: str, a, b) -> Row:
    """A row for values that must be bit-identical: (name, max|a − b|, 0)."""
    return (name, max_abs(a, b), 0.0)


def disc_off_margin(disc: dict, images: np.ndarray, m) -> dict:
    """The discriminator with its output bias shifted so half the real logits lie past the
    hinge margin (``1 − median``).

    At initialisation every logit sits inside (−1, 1), so the hinge gradient of the output
    bias is exactly −1 + 1 and what is left is the LeCAM term, itself a difference of two
    near-equal means: a cancellation whose relative error says nothing about the
    implementation. Off the margin the bias gradient is about 1/2, well conditioned.
    """
    from maetok_jax.discriminator import discriminator

    logits = np.asarray(discriminator(map_tree(jnp.asarray, disc), jnp.asarray(images), m))
    out = {k: dict(v) for k, v in disc.items()}
    out["out"]["b"] = (disc["out"]["b"] + np.float32(1.0 - np.median(logits))).astype(np.float32)
    return out


@contextlib.contextmanager
def pinned_precision():
    """fp32 means fp32: JAX matmuls at "highest", torch TF32 off (restored afterwards)."""
    flags = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    try:
        with jax.default_matmul_precision("highest"):
            yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = flags


@functools.cache
def jax_step(cfg):
    """``jax.jit(make_train_step(cfg))``, built once per config per process: a train-step
    compile takes 10–20 s on a 2-core CPU and several checks run the same configs. No
    buffer donation, so a check may keep old states."""
    from maetok_jax.train import make_train_step

    return jax.jit(make_train_step(cfg))
