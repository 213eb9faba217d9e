"""JAX backend training: learning, freezing, recompilation, resume (docs/design.md §6)."""

import numpy as np

from maetok.config import preset
from maetok.data import BatchSource
from maetok.synthetic import SyntheticImages
from maetok.train_state import start_stage2
from maetok.trainer import CHECKPOINT_NAME, train
from maetok.tree import flatten
from maetok_jax.backend import Backend
from maetok_jax.train import state_to_numpy


def _cfg(**train):
    base = dict(
        steps=40,
        batch_size=8,
        warmup_steps=5,
        lr=2e-3,
        log_every=5,
        ckpt_every=1000,
        sample_every=1000,
        ema_decay=0.9,
    )
    base.update(train)
    return preset("tiny", train=base)


def _run(cfg, steps, state=None, start=0, backend=None):
    backend = backend or Backend(cfg)
    source = BatchSource(SyntheticImages(cfg.model.image_size, count=256), cfg)
    state = state if state is not None else backend.init_state(cfg.train.seed)
    history = []
    for s in range(start, start + steps):
        state, metrics = backend.train_step(state, source.batch(s), s)
        history.append(backend.metrics_to_host(metrics))
    return state, history, backend


def test_stage1_reduces_rec_and_mask_losses():
    cfg = _cfg(steps=60)
    _, hist, _ = _run(cfg, 60)
    first = {k: np.mean([h[k] for h in hist[:5]]) for k in ("rec", "mask")}
    last = {k: np.mean([h[k] for h in hist[-5:]]) for k in ("rec", "mask")}
    assert last["rec"] < 0.7 * first["rec"], (first, last)
    assert last["mask"] < 0.9 * first["mask"], (first, last)


def test_stage2_leaves_every_encoder_parameter_bit_identical():
    cfg1 = _cfg(steps=6)
    state1, _, _ = _run(cfg1, 6)
    before = state_to_numpy(state1)
    cfg2 = cfg1.replace(train={"stage": 2, "anneal_steps": 6})
    backend = Backend(cfg2)
    state2 = start_stage2(backend, before, cfg2)
    start = state_to_numpy(state2)
    # the EMA restarts at the parameters; moments and EMA exist for the decoder only
    assert set(start["ema"]) == set(start["opt"]["mu"]) == set(start["opt"]["nu"]) == {"decoder"}
    for k, v in flatten(start["ema"]).items():
        np.testing.assert_array_equal(v, flatten(before["params"])[k], err_msg=k)
    state2, hist, _ = _run(cfg2, 6, state2, backend=backend)
    after = state_to_numpy(state2)
    for group in ("encoder", "aux"):
        for k, v in flatten(start["params"][group]).items():
            np.testing.assert_array_equal(flatten(after["params"][group])[k], v, err_msg=k)
        for k, v in flatten(before["params"][group]).items():
            np.testing.assert_array_equal(flatten(after["params"][group])[k], v, err_msg=k)
    assert set(after["ema"]) == set(after["opt"]["mu"]) == set(after["opt"]["nu"]) == {"decoder"}
    assert int(after["opt"]["count"]) == 6
    moved = [
        np.abs(flatten(after["params"]["decoder"])[k] - v).max()
        for k, v in flatten(start["params"]["decoder"]).items()
    ]
    assert max(moved) > 1e-4  # while the decoder trains
    assert "mask" not in hist[-1]  # aux decoders unused


def test_perceptual_warmup_weights_the_logged_perceptual_loss_by_its_share():
    """loss = rec + share·λ1·percep + mask at every step, the share rising to 1 (one program)."""
    cfg = _cfg(steps=6).replace(loss={"percep_warmup": 4, "lambda_percep": 2.0})
    _, hist, backend = _run(cfg, 6)
    for s, h in enumerate(hist):
        share = min(1.0, (s + 1) / 4)
        want = h["rec"] + share * 2.0 * h["percep"] + h["mask"]
        assert h["percep"] > 0 and abs(h["loss"] - want) < 1e-5 * h["loss"], (s, h)
    assert backend.compiled_count() == 1


def test_mask_ratio_changes_do_not_recompile():
    cfg = _cfg(steps=4)
    _, _, backend = _run(cfg, 4)  # four steps, four different mask ratios and lrs
    assert backend.compiled_count() == 1
    cfg2 = cfg.replace(train={"stage": 2, "anneal_steps": 4})
    _, _, backend2 = _run(cfg2, 4)  # ratios 0.6, 0.45, 0.3, 0.15
    assert backend2.compiled_count() == 1


def test_resume_matches_an_uninterrupted_run(tmp_path):
    cfg = _cfg(steps=8, ckpt_every=4, log_every=2)
    data = SyntheticImages(cfg.model.image_size, count=64)
    train(cfg, data, tmp_path / "a", "jax", progress=False)
    train(cfg, data, tmp_path / "b", "jax", stop_at=4, progress=False)
    train(cfg, data, tmp_path / "b", "jax", resume=True, progress=False)
    from maetok.checkpoint import load_checkpoint

    a, _, _ = load_checkpoint(tmp_path / "a" / CHECKPOINT_NAME)
    b, _, _ = load_checkpoint(tmp_path / "b" / CHECKPOINT_NAME)
    assert int(a["step"]) == int(b["step"]) == 8
    fa, fb = flatten(a), flatten(b)
    assert fa.keys() == fb.keys()
    for k in fa:
        np.testing.assert_allclose(fb[k], fa[k], rtol=1e-6, atol=1e-7, err_msg=k)
    assert (tmp_path / "a" / "curves.png").exists()
    assert list((tmp_path / "a" / "samples").glob("*.png"))


def test_gan_phase_switch_keeps_one_program_and_trains_the_discriminator():
    cfg = _cfg(steps=6).replace(loss={"use_adv": True, "disc_start": 3, "adaptive_weight": True})
    backend = Backend(cfg)
    state0 = state_to_numpy(backend.init_state(0))
    state, hist, backend = _run(cfg, 3, backend=backend)
    mid = state_to_numpy(state)
    for k, v in flatten(state0["disc"]).items():  # off before disc_start
        np.testing.assert_array_equal(flatten(mid["disc"])[k], v)
    assert all(h["adv_weight"] == 0 for h in hist)
    state, hist, _ = _run(cfg, 3, state, start=3, backend=backend)
    end = state_to_numpy(state)
    assert any(
        np.abs(flatten(end["disc"])[k] - v).max() > 0 for k, v in flatten(mid["disc"]).items()
    )
    assert all(h["adv_weight"] > 0 for h in hist)
    assert backend.compiled_count() == 1
