"""JAX vs torch, gradients: the Stage-1 total, the Stage-2 total (w.r.t. the decoder) and the
discriminator loss, with respect to EVERY parameter leaf (``maetok_parity.checks``).

The functions are the ones the train steps differentiate (``train.generator_loss`` and
``train.disc_loss``), through each backend's own machinery: ``jax.value_and_grad`` under
``jax.jit``, and ``maetok_torch.train.value_and_grad`` (``torch.func.grad``, or autograd
under ``remat``). Per leaf, ``max|g_torch − g_jax| / max(‖g_jax‖_∞, tiny) ≤ TOL["grad_fp32"]``.
"""

from __future__ import annotations

import pytest
from conftest import assert_rows, cases

from maetok.config import preset
from maetok_parity import checks as c
from maetok_parity.harness import Case

TINY = preset("tiny")
CONFIGS = {
    "tiny": TINY,
    "mlp": TINY.replace(model={"aux_kind": "mlp"}),
    "adv": TINY.replace(loss={"use_adv": True, "adaptive_weight": True}),
    "remat": TINY.replace(model={"remat": "full"}),
    "remat_dots": TINY.replace(model={"remat": "dots"}),
    "query_pos": TINY.replace(model={"query_pos": True}),
}

CASES = cases(
    *((c.stage1_grads, name, cfg) for name, cfg in CONFIGS.items()),
    *((c.stage2_grads, name, CONFIGS[name]) for name in ("tiny", "adv")),
    (c.disc_grads, "", CONFIGS["adv"]),
)


@pytest.mark.parametrize("check,cfg", CASES)
def test_grads(check, cfg, rng, device):
    assert_rows(check(Case(cfg, device, rng)))
