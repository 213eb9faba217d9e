"""JAX vs torch, optimisers: from identical gradients, Adam / AdamW / SGD (with and without
momentum), with and without global-norm clipping, over several steps, give the same
parameters and the same state (count, mu, nu); and the same EMA (``maetok_parity.checks``).

Each step's inputs are the same numpy arrays on both sides, so only the element-wise
arithmetic is compared: held to ``TOL["forward_fp32"]`` per leaf, at every step.
"""

from __future__ import annotations

import jax
import pytest
from conftest import assert_rows, cases

from maetok.config import preset
from maetok.tree import leaves
from maetok_parity import checks as c
from maetok_parity.harness import Case

TINY = preset("tiny")
OPTIMIZERS = [
    ("adamw", 0.0, 0.9),
    ("adamw", 0.5, 0.9),
    ("adam", 0.0, 0.9),
    ("adam", 0.5, 0.9),
    ("sgd", 0.0, 0.9),
    ("sgd", 0.5, 0.9),
    ("sgd", 0.5, 0.0),
]


def _train(name, clip, momentum):
    return TINY.replace(
        train={
            "optimizer": name,
            "grad_clip": clip,
            "momentum": momentum,
            "weight_decay": 0.01,
            "b1": 0.9,
            "b2": 0.95,
            "eps": 1e-8,
        }
    )


CASES = cases(
    *((c.optimizer, f"{n}-{clip}-{mom}", _train(n, clip, mom)) for n, clip, mom in OPTIMIZERS),
    (c.ema_update, "", TINY),
)


@pytest.mark.parametrize("check,cfg", CASES)
def test_optim(check, cfg, rng, device):
    assert_rows(check(Case(cfg, device, rng)))


def test_leaf_order_matches_jax():
    """Sums over leaves (the torch global norm) run in jax's order: sorted keys, depth first."""
    tree = {"b": {"y": 1, "x": 2}, "a": 3, "c": {"z": {"k": 4}}}
    assert leaves(tree) == jax.tree_util.tree_leaves(tree)
