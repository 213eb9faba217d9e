"""Shared setup for the JAX-vs-torch parity tests: the ONE tolerance table (imported from
``maetok.parity``), device choice, seeded inputs and comparison helpers.

Run on CPU (default) or a GPU with ``pytest parity_tests --device cuda``. On a GPU, TF32 is
turned off in both frameworks so fp32 means fp32; JAX matmuls/convs run at "highest"
precision everywhere.
"""

from __future__ import annotations

import os

# Must happen before jax is imported anywhere in the session: do not grab all GPU memory
# (torch shares the device).
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import functools
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest

try:  # the repository root, when the package is not installed
    import maetok  # noqa: F401 - only whether it imports
except ImportError:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax
import torch

# THE tolerance table lives in maetok/parity.py, so the `maetok parity` report and this suite
# hold the backends to the same numbers. Relative errors (rel_err below): max|a − b| / max|b|.
from maetok.parity import TOL  # noqa: F401 - the parity tests import it from here
from maetok.tree import flatten, map_tree

_DEVICE = {"name": "cpu"}  # set once from --device in pytest_configure


def pytest_addoption(parser):
    parser.addoption(
        "--device",
        choices=("cpu", "cuda"),
        default="cpu",
        help="where both backends run the parity tests (default: cpu)",
    )


def pytest_configure(config):
    device = config.getoption("--device", default="cpu")
    _DEVICE["name"] = device
    jax.config.update("jax_default_matmul_precision", "highest")
    if device == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False


@pytest.fixture(scope="session")
def device(pytestconfig) -> str:
    """The device name from --device: "cpu" or "cuda"."""
    name = pytestconfig.getoption("--device")
    if name == "cuda":
        if not torch.cuda.is_available():
            pytest.fail("--device cuda, but torch sees no CUDA device")
        try:
            jax.devices("gpu")
        except RuntimeError as e:
            pytest.fail(f"--device cuda, but jax sees no GPU: {e}")
    return name


@pytest.fixture
def rng(request) -> np.random.Generator:
    """A fresh generator per test, seeded from the test's node id (its own inputs)."""
    return np.random.default_rng(zlib.crc32(request.node.nodeid.encode()))


# ---------------------------------------------------------------------------------- helpers


def to_jax(np_tree, device: str | None = None):
    """numpy tree → jax arrays, on the GPU when the session (or ``device``) is cuda."""
    dev = jax.devices("gpu")[0] if (device or _DEVICE["name"]) == "cuda" else jax.devices("cpu")[0]
    return map_tree(lambda a: jax.device_put(np.asarray(a), dev), np_tree)


def to_torch(np_tree, device: str | None = None):
    """numpy tree → torch tensors on ``device`` (default: the session's device)."""
    dev = torch.device(device or _DEVICE["name"])
    return map_tree(lambda a: torch.as_tensor(np.array(a), device=dev), np_tree)


def to_numpy(x) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().numpy()
    return np.asarray(x)


def rel_err(a, b) -> float:
    """max|a − b| / max(max|b|, tiny) for one array (b is the reference)."""
    a = to_numpy(a).astype(np.float64)
    b = to_numpy(b).astype(np.float64)
    assert a.shape == b.shape, f"shape mismatch {a.shape} vs {b.shape}"
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), np.finfo(np.float64).tiny))


def assert_close(a, b, tol: float, name: str) -> None:
    """Every leaf of ``a`` within ``tol`` relative error (rel_err) of the same leaf of ``b``.

    Trees are matched by path, lists and tuples item by item."""
    if isinstance(b, (list, tuple)):
        assert len(a) == len(b), f"{name}: length {len(a)} vs {len(b)}"
        for i, (x, y) in enumerate(zip(a, b)):
            assert_close(x, y, tol, f"{name}[{i}]")
        return
    flat_a, flat_b = flatten({name: a}), flatten({name: b})
    if list(flat_b) != [name]:  # a tree: compare leaf by leaf
        assert set(flat_a) == set(flat_b), (
            f"{name}: keys differ {sorted(flat_a)} vs {sorted(flat_b)}"
        )
        for path in flat_b:
            assert_close(flat_a[path], flat_b[path], tol, path)
        return
    an, bn = to_numpy(a), to_numpy(b)
    assert an.shape == bn.shape, f"{name}: shape {an.shape} vs {bn.shape}"
    assert np.all(np.isfinite(an)) and np.all(np.isfinite(bn)), f"{name}: non-finite values"
    err = rel_err(an, bn)
    assert err <= tol, (
        f"{name}: relative error {err:.3e} > tol {tol:.1e} "
        f"(max|a-b| = {np.max(np.abs(an.astype(np.float64) - bn)):.3e}, "
        f"max|b| = {np.max(np.abs(bn)):.3e})"
    )


# ------------------------------------------------------------------------ train-step helpers


def jax_device(device: str | None = None):
    """The jax device of the session (or of ``device``): where JAX states are put."""
    return jax.devices("gpu")[0] if (device or _DEVICE["name"]) == "cuda" else jax.devices("cpu")[0]


@functools.cache
def jax_step(cfg):
    """``jax.jit(make_train_step(cfg))``, built once per config for the whole session: a
    train-step compile takes 10–20 s on a 2-core CPU, and the trajectory and checkpoint
    tests run the same configs. No buffer donation, so a test may keep old states."""
    from maetok_jax.train import make_train_step

    return jax.jit(make_train_step(cfg))
