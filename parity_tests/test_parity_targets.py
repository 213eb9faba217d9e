"""JAX vs torch: auxiliary targets, perceptual pyramid and loss, patch-GAN and GAN losses
(``maetok_parity.checks``), on ``tiny`` (p = 4: one HOG cell per patch) and with p = 16
(2×2 HOG cells of 8 px per patch).
"""

from __future__ import annotations

import pytest
from conftest import assert_rows, cases

import maetok_jax.targets as jtg
import maetok_torch.targets as ttg
from maetok.config import preset
from maetok_parity import checks as c
from maetok_parity.harness import Case

CONFIGS = {"tiny_p4": preset("tiny"), "p16": preset("tiny").replace(model={"patch_size": 16})}

CASES = cases(
    *(
        (c.targets, f"{target}-{name}", cfg.replace(model={"aux_targets": (target,)}))
        for target in ("hog", "conv", "pixel")
        for name, cfg in CONFIGS.items()
    ),
    (c.targets, "all-p16", CONFIGS["p16"]),
    (c.perceptual_features, "", CONFIGS["tiny_p4"]),
    (c.perceptual_loss, "", CONFIGS["tiny_p4"]),
    *((c.discriminator, name, cfg) for name, cfg in CONFIGS.items()),
    (c.gan_losses, "", CONFIGS["tiny_p4"]),
    *((c.discriminator_hinge_grad, name, cfg) for name, cfg in CONFIGS.items()),
)


def test_same_targets_in_both_backends():
    assert set(jtg.TARGETS) == set(ttg.TARGETS)


@pytest.mark.parametrize("check,cfg", CASES)
def test_fixed_networks(check, cfg, rng, device):
    assert_rows(check(Case(cfg, device, rng)))
