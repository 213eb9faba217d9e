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
def tiny():
    return preset("tiny")


def random_images(rng, cfg, batch=2):
    """(B, H, W, C) float32 uniformly spread over [-1, 1]."""
    m = cfg.model
    return rng.uniform(-1, 1, (batch, m.image_size, m.image_size, m.channels)).astype(np.float32)


def pytest_configure(config):
    # Tests build the same few train steps again and again: compile each once per machine.
    from maetok_jax import enable_compilation_cache
    enable_compilation_cache()
