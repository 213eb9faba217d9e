"""Data parallelism on the CPU: N-way training is 1-way training on the same global batch.

JAX runs on 4 simulated host devices (``--xla_force_host_platform_device_count=4``, which
must be set before JAX starts, hence a subprocess); torch runs 2 gloo processes under
``torchrun``. Both run ``tests/data_parallel_worker.py`` and are compared here with one
device / one process: losses and every metric at each of 3 steps within
``TOL["trajectory_fp32"]``, parameters and discriminator after 3 steps within
``TOL["trajectory_early_fp32"]`` (per leaf, relative to the update), then a checkpoint
written by the N-way trainer is resumed on one device and matches a 1-way run throughout.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

import tests.data_parallel_worker as worker
from maetok.checkpoint import load_checkpoint, read_header
from maetok.parity import TOL, rel_err, worst_update
from maetok.trainer import CHECKPOINT_NAME, get_backend, train
from maetok.tree import flatten

ROOT = Path(__file__).resolve().parents[1]


def _launch(which: str, out: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    script = str(ROOT / "tests" / "data_parallel_worker.py")
    if which == "jax":
        flags = os.environ.get("XLA_FLAGS", "")  # the session's compile flags, and 4 devices
        env["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count=4".strip()
        cmd = [sys.executable, script, "jax", str(out)]
    else:
        env.update(OMP_NUM_THREADS="1")
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node",
            "2",
            script,
            "torch",
            str(out),
        ]
    return subprocess.Popen(
        cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )


def _wait(proc: subprocess.Popen) -> None:
    output, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, output[-3000:]


def _split(tree: dict, group: str) -> dict:
    return {k: v for k, v in tree.items() if k.startswith(group + "/")}


def assert_same_training(history, tree, ref_history, ref_tree, start, name):
    """Metrics at every step and the state after the last one, N-way against 1-way."""
    assert len(history) == len(ref_history) == worker.STEPS
    for s, (got, want) in enumerate(zip(history, ref_history)):
        assert set(got) == set(want), f"{name} step {s}: metrics differ"
        for k in want:
            err = rel_err(np.float64(got[k]), np.float64(want[k]))
            assert err <= TOL["trajectory_fp32"], f"{name} step {s} {k}: {got[k]} vs {want[k]}"
    assert tree.keys() == ref_tree.keys()
    for group in ("params", "ema", "disc"):
        err, leaf = worst_update(_split(tree, group), _split(ref_tree, group), _split(start, group))
        assert err <= TOL["trajectory_early_fp32"], f"{name}: {group} {leaf} off by {err:.2e}"
    for k in ("lecam/real", "lecam/fake"):
        assert rel_err(tree[k], ref_tree[k]) <= TOL["trajectory_fp32"], f"{name}: {k}"
    assert int(tree["step"]) == int(ref_tree["step"]) == worker.STEPS


def _load(out: Path, name: str):
    history = json.loads((out / f"{name}.json").read_text())
    return history, dict(np.load(out / f"{name}.npz"))


def _resume_on_one_device(tmp_path: Path, nway_run: Path, backend_name: str) -> None:
    """The N-way trainer's checkpoint, resumed by one process, stays on the 1-way path."""
    data = worker.dataset(worker.TRAINER_CFG)
    one = tmp_path / "one"
    train(worker.TRAINER_CFG, data, one, backend_name, progress=False)
    logged = [json.loads(x) for x in (nway_run / "metrics.jsonl").read_text().splitlines()]
    want = [json.loads(x) for x in (one / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in logged] == [0, 1, 2]  # one process wrote the log
    for got, ref in zip(logged, want):
        assert rel_err(got["loss"], ref["loss"]) <= TOL["trajectory_fp32"], (got, ref)
    longer = worker.TRAINER_CFG.replace(train={"steps": worker.STEPS + 1})
    for out in (nway_run, one):
        train(longer, data, out, backend_name, resume=True, progress=False)
    a, _, _ = load_checkpoint(nway_run / CHECKPOINT_NAME)
    b, _, _ = load_checkpoint(one / CHECKPOINT_NAME)
    backend = get_backend(backend_name)(worker.TRAINER_CFG)
    start = flatten(backend.state_to_numpy(backend.init_state(worker.TRAINER_CFG.train.seed)))
    fa, fb = flatten(a), flatten(b)
    assert int(fa["step"]) == int(fb["step"]) == worker.STEPS + 1
    err, leaf = worst_update(_split(fa, "params"), _split(fb, "params"), _split(start, "params"))
    assert err <= TOL["trajectory_early_fp32"], f"resumed: {leaf} off by {err:.2e}"


def test_jax_four_devices_match_one_then_resume_on_one(tmp_path):
    proc = _launch("jax", tmp_path / "nway")
    from maetok_jax.backend import Backend

    ref_history, ref_tree, _ = worker.run_steps(Backend(worker.CFG))
    ref_tree = flatten(ref_tree)
    start = flatten(worker.initial_tree(Backend(worker.CFG)))
    _wait(proc)
    for name in ("nway", "fsdp"):
        history, tree = _load(tmp_path / "nway", name)
        assert_same_training(history, tree, ref_history, ref_tree, start, f"jax {name}")
        info = json.loads((tmp_path / "nway" / f"{name}_info.json").read_text())
        assert info["devices"] == 4
        # FSDP: most leaves split over the devices; plain data parallel: all replicated
        assert (
            (info["sharded_leaves"] > info["leaves"] // 2)
            if name == "fsdp"
            else info["sharded_leaves"] == 0
        )
    _resume_on_one_device(tmp_path, tmp_path / "nway" / "run", "jax")


def test_torch_two_processes_match_one_then_resume_on_one(tmp_path):
    proc = _launch("torch", tmp_path / "nway")
    from maetok_torch.backend import Backend

    ref_history, ref_tree, _ = worker.run_steps(Backend(worker.CFG, "cpu"))
    ref_tree = flatten(ref_tree)
    start = flatten(worker.initial_tree(Backend(worker.CFG, "cpu")))
    _wait(proc)
    history, tree = _load(tmp_path / "nway", "nway")
    assert json.loads((tmp_path / "nway" / "nway_info.json").read_text())["devices"] == 2
    assert_same_training(history, tree, ref_history, ref_tree, start, "torch 2 processes")
    _resume_on_one_device(tmp_path, tmp_path / "nway" / "run", "torch")


def test_device_counts_that_cannot_work_are_one_line_errors(tmp_path, capsys):
    from maetok.cli import main

    common = ["train", "--preset", "tiny", "--steps", "1", "--batch-size", "4", "--no-progress"]
    cases = [
        (["--backend", "torch", "--devices", "2"], "torchrun --nproc_per_node 2"),
        (["--backend", "jax", "--devices", "3"], "use 1 to 1"),
        (["--backend", "torch", "--shard-params"], "FSDP"),
    ]
    for i, (extra, words) in enumerate(cases):
        assert main([*common, *extra, "--out", str(tmp_path / str(i))]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("maetok: error: ") and "\n" not in err and words in err, err


def test_batch_rows_are_the_global_batch_split_in_order():
    from maetok.data import BatchSource

    cfg = worker.CFG
    whole = BatchSource(worker.dataset(), cfg).batch(5)
    parts = [
        BatchSource(worker.dataset(), cfg, rows=slice(r * 2, r * 2 + 2)).batch(5) for r in range(4)
    ]
    for key in ("images", "mask"):
        np.testing.assert_array_equal(np.concatenate([p[key] for p in parts]), whole[key])
    assert {p["mask_ratio"] for p in parts} == {whole["mask_ratio"]}


def _rank_pid(tag: str, rank: int) -> int | None:
    """The PID of the torchrun worker of ``rank`` among the processes started with ``tag``."""
    want = {f"DATA_PARALLEL_TEST={tag}".encode(), f"RANK={rank}".encode()}
    for entry in Path("/proc").iterdir():
        try:
            env = set((entry / "environ").read_bytes().split(b"\0"))
        except (OSError, ValueError):
            continue
        if entry.name.isdigit() and want <= env:
            return int(entry.name)
    return None


def test_torchrun_sigterm_to_one_rank_stops_every_rank_after_one_saved_step(tmp_path, capsys):
    """Rank 1 alone gets SIGTERM: both ranks stop after the same step, rank 0 alone holds the
    folder, saves there and says so; the checkpoint then resumes in one process."""
    import signal
    import time

    from maetok.cli import main
    from maetok.run import LOCK_NAME

    out, tag = tmp_path / "run", str(os.getpid())
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "DATA_PARALLEL_TEST": tag}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        "-m",
        "maetok.cli",
        "train",
        "--backend",
        "torch",
        "--preset",
        "tiny",
        "--batch-size",
        "4",
        "--steps",
        "100000",
        "--no-progress",
        "--set",
        "train.log_every=1",
        "--set",
        "train.ckpt_every=100000",
        "--set",
        "train.sample_every=100000",
        "--out",
        str(out),
    ]
    proc = subprocess.Popen(
        cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        deadline = time.monotonic() + 300
        while not ((out / "metrics.jsonl").exists() and (out / "metrics.jsonl").read_text()):
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
            time.sleep(0.2)
        writer, other = _rank_pid(tag, 0), _rank_pid(tag, 1)
        assert writer and other and json.loads((out / LOCK_NAME).read_text())["pid"] == writer
        os.kill(other, signal.SIGTERM)
        said, err = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode != 0  # torchrun reports workers that exited with 128 + SIGTERM
    assert said.count("maetok: training stage") == 1, said
    stops = [line for line in err.splitlines() if line.startswith("maetok: stopped by")]
    assert len(stops) == 1 and stops[0].startswith("maetok: stopped by SIGTERM after"), err
    _, meta = read_header(out / CHECKPOINT_NAME)
    stopped = meta["step"]
    assert stopped > 0 and f"after {stopped} steps" in stops[0]
    rows = [json.loads(r)["step"] for r in (out / "metrics.jsonl").read_text().splitlines()]
    assert rows == list(range(stopped))
    assert sorted(p.name for p in out.iterdir()) == [
        CHECKPOINT_NAME,
        "config.json",
        "metrics.jsonl",
    ]  # no lock left, nothing else

    capsys.readouterr()
    assert (
        main(["train", "--resume", "--no-progress", "--steps", str(stopped + 1), "--out", str(out)])
        == 0
    )
    assert read_header(out / CHECKPOINT_NAME)[1]["step"] == stopped + 1


def test_resume_on_another_device_count_is_a_setting_not_a_change(tmp_path):
    """A plain run resumed on a mesh (``--devices 1``, then ``--shard-params``) is accepted,
    records no change but the steps, and ends where the uninterrupted plain run does."""
    from maetok.cli import main

    run, ref = tmp_path / "run", tmp_path / "ref"
    fast = [
        "--no-progress",
        "--set",
        "train.log_every=1",
        "--set",
        "train.ckpt_every=1000",
        "--set",
        "train.sample_every=1000",
        "--set",
        "train.lr_schedule=constant",
    ]
    assert (
        main(
            [
                "train",
                "--preset",
                "tiny",
                "--batch-size",
                "4",
                "--steps",
                "4",
                *fast,
                "--out",
                str(ref),
            ]
        )
        == 0
    )
    assert (
        main(
            [
                "train",
                "--preset",
                "tiny",
                "--batch-size",
                "4",
                "--steps",
                "2",
                *fast,
                "--out",
                str(run),
            ]
        )
        == 0
    )
    assert (
        main(["train", "--resume", "--steps", "3", "--devices", "1", *fast, "--out", str(run)]) == 0
    )
    assert (
        main(["train", "--resume", "--steps", "4", "--shard-params", *fast, "--out", str(run)]) == 0
    )
    _, meta = read_header(run / CHECKPOINT_NAME)
    assert meta["step"] == 4 and [h["changes"] for h in meta["history"]] == [
        {"train.steps": [2, 3]},
        {"train.steps": [3, 4]},
    ]
    rows = [json.loads(r)["step"] for r in (run / "metrics.jsonl").read_text().splitlines()]
    assert rows == [0, 1, 2, 3]
    a, _, _ = load_checkpoint(run / CHECKPOINT_NAME)
    b, cfg, _ = load_checkpoint(ref / CHECKPOINT_NAME)
    backend = get_backend("jax")(cfg)
    start = flatten(backend.state_to_numpy(backend.init_state(cfg.train.seed)))
    err, leaf = worst_update(
        _split(flatten(a), "params"), _split(flatten(b), "params"), _split(start, "params")
    )
    assert err <= TOL["trajectory_early_fp32"], f"{leaf} off by {err:.2e}"
