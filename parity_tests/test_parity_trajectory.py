"""JAX vs torch, training trajectories: the same batches and masks through both train steps.

Batches come from ``maetok.data.BatchSource`` over ``SyntheticImages`` — a pure function of
(seed, step), as in ``maetok.trainer`` — so both backends see the same images and masks.

- 10 Stage-1 steps, then 10 Stage-2 steps started the way ``maetok.trainer`` starts
  ``--init-from`` (``maetok.train_state.start_stage2``): each backend's Stage-1
  parameters, a fresh optimiser state over the decoder, the EMA reset to the loaded
  parameters. Every metric is compared after every step and every leaf of the state
  (parameters, EMA, moments, counters) at the end of each stage.
- With the patch-GAN and its adaptive weight, ``disc_start = 3``: the discriminator, its
  optimiser and the LeCAM EMAs must stay bit-identical before step 3 and then follow the
  same path in both backends.
- bfloat16 compute: losses within ``TOL["loss_bf16"]`` for a few steps.

Parameters are compared per leaf relative to the leaf's max-abs (``TOL["trajectory_fp32"]``),
after 10 steps: over the first few Adam steps an element's update is lr·g/(|g| + eps), so
elements whose gradient vanishes analytically move by fp32 noise (see
``maetok.parity.TOL["trajectory_early_fp32"]``); after 10 steps that is diluted well below
the tolerance.
"""

from __future__ import annotations

import jax
import numpy as np
import torch
from conftest import TOL, assert_close, jax_device, jax_step

import maetok_jax.backend as jb
import maetok_jax.train as jt
import maetok_torch.backend as tb
import maetok_torch.train as tt
from maetok.config import preset
from maetok.data import BatchSource, SyntheticImages
from maetok.params import init_disc
from maetok.parity import disc_off_margin
from maetok.train_state import start_stage2
from maetok.tree import flatten

CFG = preset("tiny").replace(train={"batch_size": 4})
STEPS = 10


def _data(cfg):
    return SyntheticImages(cfg.model.image_size, count=64, seed=cfg.train.seed)


def run_both(cfg, state_j, state_t, start, steps, device, tol, check=None):
    """``steps`` steps from ``start`` in both backends, metrics compared after each step.

    ``check(step, state_j, state_t, new_j, new_t)`` may inspect every transition.
    """
    source = BatchSource(_data(cfg), cfg, train=True)
    step_j, step_t = jax_step(cfg), tt.make_train_step(cfg)
    for s in range(start, start + steps):
        batch = source.batch(s)
        new_j, met_j = step_j(state_j, *jt.step_inputs(batch, cfg, s))
        new_t, met_t = step_t(state_t, *tt.step_inputs(batch, cfg, s, device))
        assert set(met_t) == set(met_j)
        assert all(v.dtype == torch.float32 and v.dim() == 0 for v in met_t.values())
        assert_close(dict(met_t), dict(met_j), tol, f"step {s} metrics")
        if check:
            check(s, state_j, state_t, new_j, new_t)
        state_j, state_t = new_j, new_t
    return state_j, state_t


def assert_states_close(state_t, state_j, tol, name):
    """Every leaf of the two states (numpy trees of the one checkpoint format)."""
    a, b = flatten(tt.state_to_numpy(state_t)), flatten(jt.state_to_numpy(state_j))
    assert set(a) == set(b), f"{name}: state keys differ {sorted(set(a) ^ set(b))[:5]}"
    for k in b:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
    assert_close(a, b, tol, name)


def fresh_states(cfg, device, params=None, disc=None):
    """The same initial state in both backends, on the session's devices."""
    bj, bt = jb.Backend(cfg), tb.Backend(cfg, device)
    if params is None:
        tree = jt.state_to_numpy(bj.init_state(cfg.train.seed))
    else:  # as maetok.trainer does for --init-from
        tree = jt.state_to_numpy(start_stage2(bj, {"params": params}, cfg))
    if disc is not None:
        tree["disc"] = disc
    return (jax.device_put(bj.state_from_numpy(tree), jax_device()), bt.state_from_numpy(tree))


def _groups(state, keys):
    """The parameters of the groups ``keys``, which must have no moments and no EMA."""
    tree = (jt if isinstance(state["step"], jax.Array) else tt).state_to_numpy(state)
    for part in (tree["ema"], tree["opt"]["mu"], tree["opt"]["nu"]):
        assert not set(keys) & set(part), f"moments or EMA of {keys} in the state"
    return {k: flatten(tree["params"][k]) for k in keys}


def test_stage1_then_stage2(device):
    tol = TOL["trajectory_fp32"]
    sj, st = fresh_states(CFG, device)
    sj, st = run_both(CFG, sj, st, 0, STEPS, device, tol)
    assert_states_close(st, sj, tol, "after stage 1")

    # Stage 2 from each backend's own Stage-1 parameters, fresh optimiser, EMA = params.
    cfg2 = CFG.replace(train={"stage": 2})
    params_j = jt.state_to_numpy(sj)["params"]
    params_t = tt.state_to_numpy(st)["params"]
    sj2, _ = fresh_states(cfg2, device, params_j)
    _, st2 = fresh_states(cfg2, device, params_t)
    frozen_j, frozen_t = _groups(sj2, ("encoder", "aux")), _groups(st2, ("encoder", "aux"))
    sj2, st2 = run_both(cfg2, sj2, st2, 0, STEPS, device, tol)
    assert_states_close(st2, sj2, tol, "after stage 2")
    # The encoder (and the unused aux decoders): parameters bit-identical, no moments or EMA.
    for before, state in ((frozen_j, sj2), (frozen_t, st2)):
        after = _groups(state, ("encoder", "aux"))
        for group in before:
            for k in before[group]:
                np.testing.assert_array_equal(
                    after[group][k], before[group][k], err_msg=f"stage 2 changed {group}/{k}"
                )
    assert int(tt.state_to_numpy(st2)["opt"]["count"]) == STEPS


def test_adversarial_gating(device):
    """Before ``disc_start`` the discriminator state is kept exactly; after it, it trains alike."""
    cfg = CFG.replace(loss={"use_adv": True, "adaptive_weight": True, "disc_start": 3})
    first = BatchSource(_data(cfg), cfg).batch(0)["images"]
    # Output bias moved off the hinge margin: at init every logit is inside (−1, 1) and the
    # bias gradient is a pure cancellation (see maetok.parity.disc_off_margin).
    disc = disc_off_margin(init_disc(cfg, cfg.train.seed), first, cfg.model)
    moved = []

    def check(s, old_j, old_t, new_j, new_t):
        for old, new, conv in ((old_j, new_j, jt), (old_t, new_t, tt)):
            a, b = conv.state_to_numpy(old), conv.state_to_numpy(new)
            same = all(
                np.array_equal(flatten(a[k])[p], flatten(b[k])[p])
                for k in ("disc", "disc_opt", "lecam")
                for p in flatten(a[k])
            )
            if s < cfg.loss.disc_start:
                assert same, f"step {s}: the discriminator state changed before disc_start"
            moved.append(not same)

    sj, st = fresh_states(cfg, device, disc=disc)
    sj, st = run_both(cfg, sj, st, 0, STEPS, device, TOL["trajectory_fp32"], check)
    assert all(moved[2 * cfg.loss.disc_start :]), "the discriminator did not train after disc_start"
    assert_states_close(st, sj, TOL["trajectory_fp32"], "adversarial run")


def test_bfloat16_losses(device):
    cfg = CFG.replace(model={"compute_dtype": "bfloat16"})
    sj, st = fresh_states(cfg, device)
    run_both(cfg, sj, st, 0, 3, device, TOL["loss_bf16"])
