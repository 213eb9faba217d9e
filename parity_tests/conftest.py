"""Shared setup for the JAX-vs-torch parity tests: the device, a seeded generator per test,
and the two helpers every test file uses to run the checks of ``maetok_parity.checks``.

Each test file lists ``(check, config)`` cases (pytest ids: the check's name, then the
config's) and asserts every row a check returns: error ≤ tolerance, the tolerances of
``maetok.parity.TOL``. Run on CPU (default) or a GPU with ``pytest parity_tests --device
cuda``. On a GPU, TF32 is turned off in both frameworks so fp32 means fp32; JAX
matmuls/convs run at "highest" precision everywhere.
"""

from __future__ import annotations

import sys
import zlib
from pathlib import Path

import numpy as np
import pytest

try:  # the repository root, when the package is not installed
    import maetok_parity  # sets the JAX allocator before jax is imported
except ImportError:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import maetok_parity  # noqa: F401

import jax
import torch


def pytest_addoption(parser):
    parser.addoption(
        "--device",
        choices=("cpu", "cuda"),
        default="cpu",
        help="where both backends run the parity tests (default: cpu)",
    )


def pytest_configure(config):
    from tests.session import configure

    configure(config)  # before JAX starts
    jax.config.update("jax_default_matmul_precision", "highest")
    if config.getoption("--device", default="cpu") == "cuda":
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


def cases(*entries) -> list:
    """``(check, config_name, cfg)`` entries → pytest params with ids ``check-config`` (the
    check's name alone when ``config_name`` is empty)."""
    return [
        pytest.param(check, cfg, id=f"{check.__name__}-{name}" if name else check.__name__)
        for check, name, cfg in entries
    ]


def assert_rows(rows) -> None:
    """Every row ``(name, error, tolerance)`` within its tolerance (and at least one row)."""
    assert rows, "the check returned no rows"
    bad = [f"{n}: error {err:.3e} > tolerance {tol:.1e}" for n, err, tol in rows if not err <= tol]
    assert not bad, "\n".join(bad)
