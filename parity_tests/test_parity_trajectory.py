"""JAX vs torch, training trajectories: the same batches and masks through both train steps
(``maetok_parity.checks``).

Batches come from ``maetok.data.BatchSource`` over synthetic images — a pure function of
(seed, step), as in ``maetok.trainer`` — so both backends see the same images and masks.

- ``stages``: 10 Stage-1 steps, then 10 Stage-2 steps started the way ``maetok.trainer``
  starts ``--init-from``; every metric after every step, every leaf of the state at the end
  of each stage, the frozen groups bit-identical.
- ``adversarial_gating``: with the patch-GAN and its adaptive weight, ``disc_start = 3``:
  the discriminator, its optimiser and the LeCAM EMAs stay bit-identical before step 3 and
  then follow the same path in both backends for two steps.
- ``trajectory``: the 3 steps ``maetok parity`` reports; in bfloat16 compute, the losses
  within ``TOL["loss_bf16"]``.
"""

from __future__ import annotations

import pytest
from conftest import assert_rows, cases

from maetok.config import preset
from maetok.parity import parity_config
from maetok_parity import checks as c
from maetok_parity.harness import Case

CFG = preset("tiny").replace(train={"batch_size": 4})
ADV = CFG.replace(loss={"use_adv": True, "adaptive_weight": True, "disc_start": 3})

CASES = cases(
    (c.stages, "", CFG),
    (c.adversarial_gating, "", ADV),
    (c.trajectory, "report", parity_config("tiny")),
    (c.trajectory, "bf16", CFG.replace(model={"compute_dtype": "bfloat16"})),
)


@pytest.mark.parametrize("check,cfg", CASES)
def test_trajectory(check, cfg, rng, device):
    assert_rows(check(Case(cfg, device, rng)))
