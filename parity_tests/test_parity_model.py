"""JAX vs torch, forward pass, unit by unit: patch embed, RoPE, attention, blocks, encoder,
decoders, auxiliary heads, and every loss term of the generator objective
(``maetok_parity.checks``), in float32 and, for the units ``maetok parity --dtype bfloat16``
reports, in bfloat16 compute.
"""

from __future__ import annotations

import pytest
from conftest import assert_rows, cases

from maetok.config import preset
from maetok_parity import checks as c
from maetok_parity.harness import Case

TINY = preset("tiny")
MLP = TINY.replace(model={"aux_kind": "mlp"})
ADV = TINY.replace(loss={"use_adv": True, "adaptive_weight": True})
BF16 = TINY.replace(model={"compute_dtype": "bfloat16"})

CASES = cases(
    (c.patch_embed, "", TINY),
    (c.patch_embed, "bf16", BF16),
    (c.apply_mask, "", TINY),
    (c.rope, "", TINY),
    (c.rope, "bf16", BF16),
    (c.attention, "plain", TINY),
    (c.attention, "fused", TINY.replace(model={"attention": "fused"})),
    (c.attention, "flash", TINY.replace(model={"attention": "flash"})),
    (c.attention, "bf16", BF16),
    (c.attention_kernels, "", TINY),
    (c.transformer, "", TINY),
    (c.encoder, "", TINY),
    (c.encoder, "bf16", BF16),
    (c.decoder, "", TINY),
    (c.decoder, "query_pos", TINY.replace(model={"query_pos": True})),
    (c.decoder, "bf16", BF16),
    (c.aux_decoder, "", TINY),
    (c.aux_mlp, "", TINY),
    (c.aux_predict, "vit", TINY),
    (c.aux_predict, "mlp", MLP),
    (c.mask_loss, "", TINY),
    (c.reconstruction_loss, "mse", TINY),
    (c.reconstruction_loss, "l1", TINY.replace(loss={"rec": "l1"})),
    (c.rec_percep_loss, "mse", TINY),
    (c.rec_percep_loss, "l1", TINY.replace(loss={"rec": "l1"})),
    (c.adaptive_adv_weight, "", ADV),
    (c.generator_loss, "tiny", TINY),
    (c.generator_loss, "mlp", MLP),
    (c.generator_loss, "adv", ADV),
    (c.generator_loss, "bf16", BF16),
)


@pytest.mark.parametrize("check,cfg", CASES)
def test_forward(check, cfg, rng, device):
    assert_rows(check(Case(cfg, device, rng)))
