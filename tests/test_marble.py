"""MAETokParadigm under a protocol-faithful Marble host (``tests/marble_host.py``).

The host swallows hook exceptions like Marble does, so every check here reads what the
paradigm itself records or reports: a failure that the paradigm did not catch and surface
would show up as a missing iteration, not as a test error.
"""

import itertools
import sys

import numpy as np
import pytest
import torch

from maetok.errors import CheckpointError, ConfigError, DataError
from maetok.masks import mask_ratio
from maetok.schedules import anneal_ratio
from maetok.tree import flatten
from maetok_marble import MAETokParadigm, MarbleNotInstalledError, register
from tests import marble_host as host

# A tokenizer smaller than `tiny` (16² images, one block each side) keeps an iteration
# around 0.05 s on one CPU core.
SMALL = {
    "preset": "tiny",
    "model.image_size": 16,
    "model.enc_depth": 1,
    "model.dec_depth": 1,
    "train.batch_size": 4,
    "train.warmup_steps": 2,
    "train.lr": 2e-3,
    "synthetic_count": 64,
    "stats_every": 5,
}


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    # Tiny matmuls gain nothing from intra-op threads, and on shared cores an OpenMP pool
    # spinning against other processes makes each step ~30× slower.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def no_marble(monkeypatch):
    """``import marble.marblemain`` fails, whether or not Marble is installed here."""
    monkeypatch.setitem(sys.modules, "marble", None)
    monkeypatch.delitem(sys.modules, "marble.marblemain", raising=False)


def walk_many(paradigm_cfg, walks, seed=0, neurons=8, brain=None, paradigm=None):
    brain = brain or host.chain_brain(neurons)
    if paradigm is None and paradigm_cfg is not None:
        paradigm = brain.load_paradigm(MAETokParadigm, paradigm_cfg)
    w = host.Wanderer(brain, seed=seed)
    stats = [w.walk(max_steps=20, start=host.chain_start(brain)) for _ in range(walks)]
    return paradigm, w, brain, stats


def drive(paradigm, w, calls):
    """``calls`` Wanderer steps by hand: advance the step counter, then on_step."""
    for _ in range(calls):
        w._global_step_counter += 1
        paradigm.on_step(w, None, object(), "forward", 0, torch.zeros(1))


def states_equal(a: dict, b: dict) -> bool:
    fa, fb = flatten(a), flatten(b)
    return fa.keys() == fb.keys() and all(np.array_equal(fa[k], fb[k]) for k in fa)


class Recorder:
    """A paradigm that records each ``on_step`` call as (step_index, direction)."""

    def __init__(self, config=None):
        self.calls = []

    def on_step(self, w, current, syn, direction, step_index, out_value):
        self.calls.append((step_index, direction))


def test_the_host_refuses_a_brain_built_against_marbles_rules():
    brain = host.Brain(2, size=(6, 1))  # a 6-neuron row, as a chain might be laid out
    inside = brain.available_indices()
    assert 1 < len(inside) < 6 and all(brain.is_inside(i) for i in inside)
    outside = next(i for i in itertools.product(range(6), range(1)) if i not in inside)
    with pytest.raises(ValueError, match="outside"):
        brain.add_neuron(outside, tensor=[0.1])
    brain.add_neuron(inside[0], tensor=[0.1])  # only the first neuron stands alone
    with pytest.raises(RuntimeError, match="not connected"):
        brain.add_neuron(inside[1], tensor=[0.2])
    with pytest.raises(ValueError, match="direction"):
        brain.add_neuron(inside[1], tensor=[0.2], connect_to=inside[0], direction="both")
    with pytest.raises(ValueError, match="no neuron"):
        brain.add_neuron(inside[1], tensor=[0.2], connect_to=inside[2])
    assert brain.get_neuron(inside[1]) is None and list(brain.neurons) == [inside[0]]
    assert not brain.synapses  # the refused calls left nothing behind

    new = brain.add_neuron(inside[1], tensor=[0.2], connect_to=inside[0], direction="uni")
    first = brain.get_neuron(inside[0])
    assert [(s.source, s.target) for s in brain.synapses] == [(new, first)]  # new → connect_to
    assert first.outgoing == [] and first.incoming == new.outgoing
    with pytest.raises(ValueError, match="already exists"):
        brain.add_neuron(inside[1], tensor=[0.3], connect_to=inside[0])
    with pytest.raises(ValueError, match="direction"):
        brain.connect(inside[0], inside[1], direction="forward")
    fwd = brain.connect(inside[0], inside[1], direction="uni")
    assert (fwd.source, fwd.target) == (first, new) and first.outgoing == [fwd]


def _joined_chain(direction: str, walks: int = 3, max_steps: int = 6):
    """Each neuron joined to the one before it on creation, walks from the first."""
    brain = host.Brain(2, size=(12, 12))
    c = brain.available_indices()[:5]
    brain.add_neuron(c[0], tensor=[0.1])
    for prev, idx in itertools.pairwise(c):
        brain.add_neuron(idx, tensor=[0.2], connect_to=prev, direction=direction)
    rec = brain.load_paradigm(Recorder)
    w = host.Wanderer(brain, seed=0)
    stats = [w.walk(max_steps=max_steps, start=brain.get_neuron(c[0])) for _ in range(walks)]
    return rec, [s["steps"] for s in stats]


def test_a_chain_joined_backwards_walks_no_step_and_bi_walks_on():
    rec, steps = _joined_chain("uni")  # every synapse points back at the start
    assert steps == [0, 0, 0]
    assert rec.calls == [(0, "none")] * 3  # on_step once per walk, at the dead end
    rec, steps = _joined_chain("bi")
    assert steps == [6, 6, 6] and len(rec.calls) == 18
    assert [i for i, _ in rec.calls] == list(range(6)) * 3
    assert {d for _, d in rec.calls} == {"forward", "backward"}  # both ways along "bi"

    brain = host.chain_brain(5)  # joined from its dead end backwards: forward synapses
    rec = brain.load_paradigm(Recorder)
    w = host.Wanderer(brain, seed=0)
    steps = [w.walk(max_steps=20, start=host.chain_start(brain))["steps"] for _ in range(4)]
    assert all(2 <= s <= 4 for s in steps) and len(set(steps)) > 1  # skips make walks differ
    assert len(rec.calls) == sum(steps) + 4 and rec.calls.count((0, "none")) == 0
    assert [d for _, d in rec.calls].count("none") == 4  # each walk ends at the dead end


def test_losses_fall_over_walks_one_iteration_per_step(no_marble):
    p, _w, _, stats = walk_many(SMALL, walks=6)
    assert p.last_error is None and p.error_count == 0
    calls = sum(s["steps"] + 1 for s in stats)  # every walk ends with the dead-end call
    assert p.iteration == calls == len(p.history)
    assert [sum(r["dead_end"] for r in p.history if r["walk"] == k) for k in range(1, 7)] == [1] * 6
    first, last = p.walks[0], p.walks[-1]
    assert last["mean_loss"] < 0.7 * first["mean_loss"]
    assert last["mean_rec"] < 0.7 * first["mean_rec"]
    assert [s["host_steps"] for s in p.walks] == [s["steps"] for s in stats]


def test_same_seed_same_parameters_and_the_walk_is_untouched(no_marble):
    cfg = {**SMALL, "stage2_start": 6}
    a, wa, brain_a, stats_a = walk_many(cfg, walks=3)
    b, _wb, _, _ = walk_many(cfg, walks=3)
    assert a.iteration == b.iteration > 6 and a.stage == 2
    assert states_equal(a.numpy_state(), b.numpy_state())
    assert [r["mask_ratio"] for r in a.history] == [r["mask_ratio"] for r in b.history]

    # The same walks without the paradigm: same neuron weights, same rng, same counters.
    _, wc, brain_c, stats_c = walk_many(None, walks=3)
    assert wa.rng.getstate() == wc.rng.getstate()
    assert wa._global_step_counter == wc._global_step_counter
    assert wa._walk_counter == wc._walk_counter
    assert [s["loss"] for s in stats_a] == [s["loss"] for s in stats_c]
    assert all(
        (brain_a.neurons[i].weight, brain_a.neurons[i].bias)
        == (brain_c.neurons[i].weight, brain_c.neurons[i].bias)
        for i in brain_a.neurons
    )

    before = wa.rng.getstate()
    a.before_walk(wa, None)
    drive(a, wa, 2)
    a.on_walk_end(wa, {"loss": 0.0, "steps": 2, "visited": 2, "step_metrics": []})
    assert wa.rng.getstate() == before


def test_stage2_freezes_the_encoder_and_anneals_the_mask():
    p = MAETokParadigm({**SMALL, "stage2_start": 4, "train.anneal_steps": 6})
    w = host.Wanderer(host.chain_brain(5), seed=0)
    p.on_wanderer(w), p.on_init(w), p.before_walk(w, None)
    drive(p, w, 4)
    assert p.stage == 1
    enc_before = flatten(p.numpy_state()["params"]["encoder"])
    drive(p, w, 1)  # the switch, then the first Stage-2 iteration
    assert p.stage == 2 and p.stage_start == 4
    s5 = p.numpy_state()
    assert int(s5["opt"]["count"]) == 1  # a fresh optimiser from the switch on
    # moments and EMA over the decoder only: the encoder has nothing to update
    for part in (s5["opt"]["mu"], s5["opt"]["nu"], s5["ema"]):
        assert set(part) == {"decoder"}
    drive(p, w, 3)
    s8 = p.numpy_state()
    assert p.last_error is None and int(s8["opt"]["count"]) == 4
    enc_after = flatten(s8["params"]["encoder"])
    assert all(np.array_equal(enc_before[k], enc_after[k]) for k in enc_before)
    for part in (s8["opt"]["mu"], s8["opt"]["nu"], s8["ema"]):
        assert set(part) == {"decoder"}
    assert not states_equal(s5["params"]["decoder"], s8["params"]["decoder"])
    t2 = p.cfg.train
    assert [r["mask_ratio"] for r in p.history[4:]] == [anneal_ratio(k, t2) for k in range(4)]
    # Stage 1 on Wanderer steps 1..4: the ratios `maetok train` draws at those steps
    t1 = p.settings.cfg.train
    assert [r["mask_ratio"] for r in p.history[:4]] == [mask_ratio(g, t1) for g in range(1, 5)]
    assert all("mask" not in r for r in p.history[4:]) and all("mask" in r for r in p.history[:4])


def test_the_discriminator_trains_and_survives_the_stage_switch():
    p = MAETokParadigm({**SMALL, "loss.use_adv": True, "stage2_start": 2})
    w = host.Wanderer(host.chain_brain(5), seed=0)
    p.on_wanderer(w)
    drive(p, w, 2)
    disc = p.numpy_state()["disc"]
    drive(p, w, 2)
    assert p.last_error is None and p.stage == 2
    assert all("disc" in r and "adv" in r for r in p.history)
    assert not states_equal(disc, p.numpy_state()["disc"])  # still trained in Stage 2
    assert int(p.numpy_state()["disc_opt"]["count"]) == 2  # its optimiser restarted at the switch


@pytest.mark.parametrize(
    "bad,needle",
    [
        ({"bogus": 1}, "known: "),
        ({"model.patch_size": 5}, "not divisible"),
        ({"stage2_start": 0}, "stage2_start"),
        ({"train.optimizer": "lamb"}, "optimizer"),
        ({"lr": 1e-3}, "lr → train.lr"),  # a field without its section: the key to use
        ({"modle.enc_width": 32}, "unknown config section 'modle'"),
        ({"train.stage": 2}, "stage2_start"),
        ({"images": np.zeros((2, 32, 32, 3), np.uint8), "batch_fn": lambda s: None}, "at most one"),
        ({"images": np.full((2, 32, 32, 3), 200.0, np.float32)}, "[-1, 1]"),
    ],
)
def test_a_broken_config_is_reported_not_silent(bad, needle):
    with pytest.raises((ConfigError, DataError), match=None) as info:
        MAETokParadigm({**SMALL, **bad})
    assert needle in str(info.value)
    if "bogus" in bad:
        assert "stage2_start" in str(info.value)  # the message lists the known keys
    with host.installed() as marble:
        brain = host.chain_brain(5)
        p = brain.load_paradigm(MAETokParadigm, {**SMALL, **bad})  # the host retries cls()
        _, _w, _, stats = walk_many(None, walks=2, brain=brain)
        assert p.stopped and p.error_count == 1 and p.iteration == 0 and not p.history
        assert needle in p.last_error and "rejected" in p.last_error
        errors = marble.REPORTER.get("maetok", "errors")
        assert errors["count"] == 1 and needle in errors["error"]
        assert len(stats) == 2  # the walks themselves went on


def test_an_exception_in_training_is_caught_reported_and_stops_training():
    calls = []

    def batch_fn(step):
        calls.append(step)
        if step == 2:
            raise RuntimeError("camera unplugged")
        return np.random.default_rng(step).uniform(-1, 1, (4, 16, 16, 3)).astype(np.float32)

    class Counting:  # another paradigm on the same brain, after MAETok
        steps = 0

        def on_step(self, *args):
            Counting.steps += 1

    with host.installed() as marble:
        brain = host.chain_brain(8)
        p = brain.load_paradigm(MAETokParadigm, {**SMALL, "batch_fn": batch_fn})
        brain.load_paradigm(Counting)
        _, w, _, stats = walk_many(None, walks=3, brain=brain)
        assert calls == [0, 1, 2]  # nothing called after the failure
        assert p.stopped and p.error_count == 1 and p.iteration == 2
        assert p.last_error.startswith("on_step: RuntimeError: camera unplugged")
        assert "Traceback" in p.last_error and "batch_fn" in p.last_error
        errors = marble.REPORTER.get("maetok", "errors")
        assert errors["count"] == 1 and errors["hook"] == "on_step" and errors["iteration"] == 2
        assert Counting.steps == sum(s["steps"] + 1 for s in stats)
        p.clear_error()
        drive(p, w, 1)
        assert p.error_count == 2 and calls == [0, 1, 2, 2]  # the same batch is retried


def test_register_needs_marble_and_registers_maetok(no_marble):
    with pytest.raises(MarbleNotInstalledError, match="pip install") as info:
        register()
    assert isinstance(info.value, ImportError)
    with host.installed() as marble:
        assert register() is MAETokParadigm
        assert marble._PARADIGM_TYPES["maetok"] is MAETokParadigm
        p = host.chain_brain(5).load_paradigm("maetok", SMALL)
        assert isinstance(p, MAETokParadigm) and p.settings.cfg.model.image_size == 16


def test_reports_go_to_marbles_reporter_and_history_without_it(no_marble):
    quiet, *_ = walk_many(SMALL, walks=1)
    assert quiet.history and quiet.last_error is None  # no reporter: history only
    with host.installed() as marble:
        p, _w, _, stats = walk_many({**SMALL, "stats_every": 1}, walks=2)
        tree = marble.REPORTER.tree
        step0 = tree["training"]["maetok"]["step_0"]
        for key in (
            "loss",
            "rec",
            "percep",
            "mask",
            "aux/hog",
            "lr",
            "mask_ratio",
            "stage",
            "iteration",
            "wanderer_step",
            "grad_norm",
        ):
            assert key in step0
        assert step0["wanderer_step"] == 1 and step0["stage"] == 1
        assert len(tree["training"]["maetok"]) == p.iteration
        tokens = tree["maetok"]["tokens"]
        assert tokens["iteration"] == p.iteration - 1
        assert 0.0 <= tokens["collapse"] <= 1.0 and tokens["token_var_mean"] > 0
        assert {"mean", "std", "token_usage", "token_var_min", "dead_dim_fraction"} <= set(tokens)
        assert set(tree["maetok"]["aux"]) == {"hog", "conv", "pixel", "iteration"}
        walk2 = tree["maetok"]["walks"]["walk_2"]
        assert walk2["iterations"] == stats[1]["steps"] + 1 and "mean_loss" in walk2


def test_on_wanderer_is_idempotent_and_pretraining_runs_once(no_marble):
    brain = host.chain_brain(6)
    p = brain.load_paradigm(MAETokParadigm, {**SMALL, "pretrain_steps": 3})
    w = host.Wanderer(brain, seed=0)
    state = p._state
    assert state is not None and p.iteration == 0
    w.reapply_paradigms()  # on_wanderer (and on_init) again for the same Wanderer
    assert p._state is state and p.iteration == 0
    first = w.walk(max_steps=20, start=host.chain_start(brain))
    assert p.iteration == 3 + first["steps"] + 1
    w.walk(max_steps=20, start=host.chain_start(brain))
    assert sum(r["pretrain"] for r in p.history) == 3
    it = p.iteration
    w2 = host.Wanderer(brain, seed=1)  # a second Wanderer continues the same tokenizer
    assert p.iteration == it and w2._plugin_state and p.last_error is None


def test_two_paradigms_on_one_brain_report_apart():
    with host.installed() as marble:
        brain = host.chain_brain(6)
        a = brain.load_paradigm(MAETokParadigm, SMALL)
        b = brain.load_paradigm(MAETokParadigm, {**SMALL, "train.seed": 1})
        walk_many(None, walks=1, brain=brain)
        assert (a.name, b.name) == ("maetok", "maetok_2")
        assert a.iteration == b.iteration > 0
        assert {"maetok", "maetok_2"} <= set(marble.REPORTER.tree["training"])
        assert {"maetok", "maetok_2"} <= set(marble.REPORTER.tree)
        assert not states_equal(a.numpy_state()["params"], b.numpy_state()["params"])


def test_images_are_converted_at_the_boundary():
    rng = np.random.default_rng(0)
    nhwc = rng.integers(0, 256, (6, 20, 20, 3), dtype=np.uint8)
    nchw = torch.tensor(nhwc).permute(0, 3, 1, 2)  # a torch caller's layout
    p = MAETokParadigm({**SMALL, "images": nchw})
    q = MAETokParadigm({**SMALL, "images": nhwc.astype(np.float32) / 127.5 - 1})
    assert np.allclose(p.settings.source.batch(3), q.settings.source.batch(3), atol=1e-6)
    fn = MAETokParadigm(
        {
            **SMALL,
            "batch_fn": lambda: {
                "images": torch.tensor(nhwc[:4, :16, :16]).permute(0, 3, 1, 2).float() / 255
            },
        }
    )
    got = fn.settings.source.batch(0)
    assert got.shape == (4, 16, 16, 3) and got.dtype == np.float32
    bad = MAETokParadigm({**SMALL, "batch_fn": lambda step: nhwc})  # 20² images, not 16²
    w = host.Wanderer(host.chain_brain(5), seed=0)
    bad.on_wanderer(w)
    drive(bad, w, 1)
    assert "16×16" in bad.last_error and bad.stopped


def test_a_saved_tokenizer_loads_in_jax_and_the_cli_and_resumes(tmp_path):
    from PIL import Image

    from maetok import checkpoint as ckpt
    from maetok.cli import main
    from maetok.masks import sample_mask
    from maetok.trainer import params_from_checkpoint
    from maetok_jax.backend import Backend as JaxBackend

    cfg = {**SMALL, "stage2_start": 5}
    p = MAETokParadigm(cfg)
    w = host.Wanderer(host.chain_brain(5), seed=0)
    p.on_wanderer(w)
    drive(p, w, 3)
    path = p.save(tmp_path / "marble.safetensors")
    drive(p, w, 5)  # through the switch to Stage 2

    file_cfg = ckpt.read_config(path)
    assert file_cfg == p.settings.cfg
    _tree, _, meta = ckpt.load_checkpoint(path)
    assert (meta["stage"], meta["iteration"], meta["backend"]) == (1, 3, "torch")

    # Resume: a new paradigm loads at iteration 3 and, on the same Wanderer steps, ends
    # with exactly the state of the uninterrupted run.
    for other in ({"loss.use_adv": True}, {"model.latent_dim": 4}):
        wrong = MAETokParadigm({**cfg, **other})
        with pytest.raises(CheckpointError):
            wrong.load(path)
        assert (wrong.stage, wrong.iteration) == (1, 0)
    r = MAETokParadigm(cfg).load(path)
    assert (r.stage, r.iteration) == (1, 3)
    w2 = host.Wanderer(host.chain_brain(5), seed=0)
    w2._global_step_counter = 3
    drive(r, w2, 5)
    assert r.stage == 2 and r.iteration == p.iteration == 8
    assert states_equal(r.numpy_state(), p.numpy_state())
    s2 = p.save(tmp_path / "stage2.safetensors")
    assert ckpt.read_config(s2).train.stage == 2
    again = MAETokParadigm.from_checkpoint(s2)
    assert (again.stage, again.iteration, again.stage_start) == (2, 8, 5)
    assert states_equal(again.numpy_state(), p.numpy_state())

    # JAX: the same parameters reconstruct the same images (fp32, CPU).
    images = np.random.default_rng(1).uniform(-1, 1, (3, 16, 16, 3)).astype(np.float32)
    mask = sample_mask(0, 0, 3, file_cfg.model.num_patches, 0.5)
    jb = JaxBackend(file_cfg)
    params = jb.to_device_tree(params_from_checkpoint(s2, file_cfg))
    got = jb.reconstruct(params, images, mask)
    want = p.reconstruct(images, mask)
    assert np.linalg.norm(got - want) <= 1e-4 * np.linalg.norm(want)

    # `maetok reconstruct --checkpoint` reads it too.
    folder = tmp_path / "in"
    folder.mkdir()
    for i in range(2):
        Image.fromarray(((images[i] + 1) * 127.5).astype(np.uint8)).save(folder / f"{i}.png")
    assert (
        main(
            [
                "reconstruct",
                "--backend",
                "torch",
                "--device",
                "cpu",
                "--checkpoint",
                str(s2),
                "--input",
                str(folder),
                "--out",
                str(tmp_path / "out"),
            ]
        )
        == 0
    )
    assert sorted(f.name for f in (tmp_path / "out").iterdir()) == ["0.png", "1.png"]


def test_init_from_starts_the_encoder_and_decoder_from_an_exported_tokenizer(tmp_path, monkeypatch):
    from maetok import pretrained
    from maetok.cli import main

    p = MAETokParadigm(SMALL)
    w = host.Wanderer(host.chain_brain(5), seed=0)
    p.on_wanderer(w)
    drive(p, w, 3)
    trained = p.save(tmp_path / "trained.safetensors")
    exported = tmp_path / "tokenizer.safetensors"
    assert main(["export", "--checkpoint", str(trained), "--out", str(exported)]) == 0

    fresh = flatten(MAETokParadigm(SMALL).numpy_state()["params"])
    monkeypatch.setattr(pretrained, "SHIPPED", exported)
    for source in (str(exported), "pretrained"):
        q = MAETokParadigm({**SMALL, "init_from": source})
        params = flatten(q.numpy_state()["params"])
        want = flatten(pretrained.load_params(exported)[1])
        for key, value in params.items():
            group = key.split("/")[0]
            if group in pretrained.INFERENCE_GROUPS:  # the exported weights, float16-rounded
                np.testing.assert_array_equal(value, want[key], err_msg=key)
            else:  # the auxiliary decoders start as a fresh run's do
                np.testing.assert_array_equal(value, fresh[key], err_msg=key)
        assert any(not np.array_equal(params[k], fresh[k]) for k in want)
    with pytest.raises(CheckpointError, match=r"model\.latent_dim"):
        MAETokParadigm({**SMALL, "model.latent_dim": 4, "init_from": str(exported)})
    monkeypatch.setattr(pretrained, "SHIPPED", tmp_path / "none.safetensors")
    with pytest.raises(CheckpointError, match="ships no pretrained tokenizer"):
        MAETokParadigm({**SMALL, "init_from": "pretrained"})
