"""Shared fixtures for the unit tests: a seeded generator per test and the tiny config."""

import zlib

import numpy as np
import pytest

from maetok.config import preset


@pytest.fixture
def rng(request):
    """A fresh numpy Generator per test, seeded from the test's id."""
    return np.random.default_rng(zlib.crc32(request.node.nodeid.encode()))


@pytest.fixture
def fresh_dynamo():
    """torch.compile's frame caches emptied: a test that builds compiled steps starts from
    none, so the compile tests of one worker process never reach dynamo's per-function
    recompile limit (beyond which it runs eagerly and builds no graph)."""
    import torch._dynamo

    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.fixture
def tiny():
    return preset("tiny")


def random_images(rng, cfg, batch=2):
    """(B, H, W, C) float32 uniformly spread over [-1, 1]."""
    m = cfg.model
    return rng.uniform(-1, 1, (batch, m.image_size, m.image_size, m.channels)).astype(np.float32)


def cli_error(capsys, argv, alone: bool = False) -> str:
    """Run ``maetok ARGV`` in-process; assert exit 2 with exactly one ``maetok: error:`` line
    and no traceback (``alone``: and nothing else on stderr); return that line."""
    from maetok.cli import main

    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2, err
    lines = [l for l in err.strip().splitlines() if l.startswith("maetok: error: ")]
    assert len(lines) == 1 and "Traceback" not in err, err
    assert not alone or len(err.strip().splitlines()) == 1, err
    return lines[0]


def pytest_configure(config):
    from tests.session import configure

    configure(config)  # before JAX starts
    # Tests build the same few train steps again and again: compile each once per machine.
    from maetok_jax import enable_compilation_cache

    enable_compilation_cache()
