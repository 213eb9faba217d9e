"""JAX vs torch through the real checkpoint file: a run saved by one backend continues in the
other as if nothing had happened.

Both backends train 10 steps from the same state (adversarial config, so the file holds
every kind of entry: parameters, EMA, both optimisers, LeCAM EMAs, step; ``disc_start = 3``
so the GAN phase switches on before the save). At step 5 each saves a checkpoint with
``maetok.checkpoint.save_checkpoint``; the other backend loads it the way the trainer
resumes (``maetok.trainer.load_state``: layout checked against the one the config
implies, ``maetok.train_state.expected_layout``) and trains the 5 remaining steps. Its
metrics and final state must match the saving backend's own 10-step run
(``TOL["trajectory_fp32"]``, per step and per leaf).
"""

from __future__ import annotations

import jax
import numpy as np
import pytest

import maetok_jax.backend as jb
import maetok_jax.train as jt
import maetok_torch.backend as tb
import maetok_torch.train as tt
from maetok.checkpoint import layout, load_checkpoint, read_checkpoint, save_checkpoint
from maetok.config import preset
from maetok.data import BatchSource
from maetok.params import init_disc
from maetok.parity import TOL, tree_err
from maetok.synthetic import SyntheticImages
from maetok.train_state import expected_layout
from maetok.trainer import load_state
from maetok.tree import flatten
from maetok_parity.harness import disc_off_margin, jax_device, jax_step

CFG = preset("tiny").replace(
    train={"batch_size": 4}, loss={"use_adv": True, "adaptive_weight": True, "disc_start": 3}
)
HALF, STEPS = 5, 10


class Run:
    """One backend's side: its step function and numpy conversions."""

    def __init__(self, name: str, device: str):
        self.name = name
        self.backend = jb.Backend(CFG) if name == "jax" else tb.Backend(CFG, device)
        self.step_fn = jax_step(CFG) if name == "jax" else tt.make_train_step(CFG)
        self.device = device

    def place(self, state):
        return jax.device_put(state, jax_device(self.device)) if self.name == "jax" else state

    def steps(self, state, start: int, stop: int):
        """Steps [start, stop) → (state, [metrics as floats per step])."""
        source = BatchSource(SyntheticImages(CFG.model.image_size, count=64, seed=0), CFG)
        mod = jt if self.name == "jax" else tt
        extra = () if self.name == "jax" else (self.device,)
        history = []
        for s in range(start, stop):
            state, met = self.step_fn(state, *mod.step_inputs(source.batch(s), CFG, s, *extra))
            history.append(self.backend.metrics_to_host(met))
        return state, history


def _initial_tree() -> dict:
    first = BatchSource(SyntheticImages(CFG.model.image_size, count=64, seed=0), CFG).batch(0)
    tree = jt.state_to_numpy(jt.init_state(CFG, CFG.train.seed))
    # Off the hinge margin, as in the trajectory checks (maetok_parity.harness.disc_off_margin).
    tree["disc"] = disc_off_margin(init_disc(CFG, CFG.train.seed), first["images"], CFG.model)
    return tree


@pytest.fixture(scope="module")
def reference(device, tmp_path_factory):
    """Each backend's uninterrupted 10-step run, and the checkpoint it wrote at step 5."""
    folder = tmp_path_factory.mktemp("checkpoints")
    out = {}
    for name in ("jax", "torch"):
        run = Run(name, device)
        state = run.place(run.backend.state_from_numpy(_initial_tree()))
        state, first = run.steps(state, 0, HALF)
        path = folder / f"{name}_step{HALF}.safetensors"
        save_checkpoint(path, run.backend.state_to_numpy(state), CFG, {"backend": name, "stage": 1})
        state, second = run.steps(state, HALF, STEPS)
        out[name] = {
            "path": path,
            "history": first + second,
            "final": run.backend.state_to_numpy(state),
        }
    return out


def test_both_backends_write_the_same_layout(device):
    lay_j = layout(jt.state_to_numpy(jt.init_state(CFG, 0)))
    lay_t = layout(tt.state_to_numpy(tt.init_state(CFG, 0, device=device)))
    assert lay_j == lay_t
    assert lay_j["step"] == ((), "int32") and lay_j["opt/count"] == ((), "int32")
    assert lay_j["lecam/real"] == ((), "float32")
    assert all(
        dtype == "float32"
        for key, (_, dtype) in lay_j.items()
        if not key.endswith(("count", "step"))
    )


@pytest.mark.parametrize(
    "changes",
    [
        {},
        {"train": {"stage": 2}},
        {"train": {"stage": 2, "optimizer": "sgd", "ema_decay": 0.0}},
        {"train": {"optimizer": "sgd"}, "loss": {"use_adv": False}},
    ],
)
def test_the_layout_follows_the_stage_and_is_read_off_the_spec(changes, device):
    """Both backends' fresh states have exactly ``expected_layout``: moments and EMA over the
    stage's trainable groups, ``nu`` for Adam only, discriminator entries with the GAN."""
    cfg = CFG.replace(**changes)
    want = expected_layout(cfg)
    assert layout(jt.state_to_numpy(jt.init_state(cfg, 0))) == want
    assert layout(tt.state_to_numpy(tt.init_state(cfg, 0, device=device))) == want
    groups = {k.split("/")[2] for k in want if k.startswith("opt/mu/")}
    assert groups == ({"decoder"} if cfg.train.stage == 2 else {"encoder", "decoder", "aux"})
    assert any(k.startswith("opt/nu/") for k in want) == (cfg.train.optimizer != "sgd")
    assert any(k.startswith("ema/") for k in want) == (cfg.train.ema_decay > 0)
    assert ("disc_opt/count" in want) == cfg.loss.use_adv


@pytest.mark.parametrize("saver,loader", [("jax", "torch"), ("torch", "jax")])
def test_resume_in_the_other_backend(saver, loader, reference, device):
    ref = reference[saver]
    run = Run(loader, device)
    state = run.place(load_state(run.backend, read_checkpoint(ref["path"]), CFG))
    # The loaded state is the saved tree, bit for bit, in the loader's format.
    tree, _, meta = load_checkpoint(ref["path"], CFG)
    assert meta["backend"] == saver
    saved, loaded = flatten(tree), flatten(run.backend.state_to_numpy(state))
    assert set(saved) == set(loaded)
    for k in saved:
        assert loaded[k].dtype == saved[k].dtype, k
        np.testing.assert_array_equal(loaded[k], saved[k], err_msg=k)

    state, history = run.steps(state, HALF, STEPS)
    tol = TOL["trajectory_fp32"]
    for i, (got, want) in enumerate(zip(history, ref["history"][HALF:])):
        assert set(got) == set(want)
        err = tree_err(
            {k: np.float32(v) for k, v in got.items()}, {k: np.float32(v) for k, v in want.items()}
        )
        assert err <= tol, f"{saver}→{loader} step {HALF + i}: error {err:.3e}"
    err = tree_err(flatten(run.backend.state_to_numpy(state)), flatten(ref["final"]))
    assert err <= tol, f"{saver}→{loader} final state: error {err:.3e}"


def test_uninterrupted_runs_agree(reference):
    """The two 10-step references themselves (the premise of the comparison above)."""
    err = tree_err(flatten(reference["torch"]["final"]), flatten(reference["jax"]["final"]))
    assert err <= TOL["trajectory_fp32"], f"10 steps, torch vs jax: error {err:.3e}"
