"""--resume continues exactly the stored run: its data, its config with only the changes
asked for (recorded in its history), metrics cut back to the checkpoint, and a NaN stop
that a lower learning rate gets past."""

import json

import numpy as np
import pytest
from PIL import Image

from maetok import checkpoint as ckpt
from maetok.cli import main
from maetok.run import CHECKPOINT_NAME
from maetok.schedules import learning_rate
from maetok.tree import flatten
from tests.conftest import cli_error

# A constant learning rate after warm-up: the schedule does not depend on train.steps, so a
# run extended with --steps matches one that was that long from the start.
FAST = [
    "--preset",
    "tiny",
    "--no-progress",
    "--batch-size",
    "4",
    "--set",
    "train.log_every=1",
    "--set",
    "train.ckpt_every=2",
    "--set",
    "train.sample_every=1000",
    "--set",
    "train.lr_schedule=constant",
]


def _steps(out):
    return [json.loads(r)["step"] for r in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    folder = tmp_path_factory.mktemp("photos")
    rng = np.random.default_rng(0)
    for i in range(5):
        Image.fromarray(rng.integers(0, 256, (36, 40, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    return folder


def test_resume_continues_the_stored_run_and_records_changes(tmp_path, photos, capsys):
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    assert main(["train", *FAST, "--data", str(photos), "--steps", "6", "--out", str(whole)]) == 0
    assert main(["train", *FAST, "--data", str(photos), "--steps", "4", "--out", str(parts)]) == 0
    with open(parts / "metrics.jsonl", "a") as log:  # rows past the checkpoint, as a kill leaves
        log.write(json.dumps({"step": 4, "loss": 1.0}) + "\n" + '{"step": 5, "lo')
    capsys.readouterr()
    assert main(["train", "--resume", "--no-progress", "--steps", "6", "--out", str(parts)]) == 0
    said = capsys.readouterr().out
    assert "resuming" in said and "train.steps 4 → 6" in said and "ImageFolder (5 images)" in said
    a, _, _ = ckpt.load_checkpoint(whole / CHECKPOINT_NAME)
    b, _, meta = ckpt.load_checkpoint(parts / CHECKPOINT_NAME)
    fa, fb = flatten(a), flatten(b)
    assert fa.keys() == fb.keys()
    for k in fa:  # the same images in the same order: bit-identical to the uninterrupted run
        np.testing.assert_array_equal(fb[k], fa[k], err_msg=k)
    assert meta["data"]["folder"] == str(photos.resolve()) and meta["data"]["images"] == 5
    assert meta["history"] == [
        {"step": 4, "time": meta["history"][0]["time"], "changes": {"train.steps": [4, 6]}}
    ]
    assert _steps(parts) == list(range(6))  # the stale rows are gone, none is repeated
    whole_rows = (whole / "metrics.jsonl").read_text().splitlines()
    parts_rows = (parts / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(r)["loss"] for r in parts_rows] == [
        json.loads(r)["loss"] for r in whole_rows
    ]

    # A NaN: the message points at the checkpoint and says how to continue from it ...
    before = (parts / CHECKPOINT_NAME).read_bytes()
    line = cli_error(
        capsys,
        ["train", "--resume", "--no-progress", "--steps", "8", "--lr", "1e30", "--out", str(parts)],
        alone=True,
    )
    assert "non-finite loss" in line and "(step 6)" in line, line
    assert f"maetok train --resume --out {parts} --lr 1e+29" in line
    assert "no checkpoint had been written" not in line
    assert (parts / CHECKPOINT_NAME).read_bytes() == before
    # ... and the lower learning rate is used, and recorded
    assert (
        main(
            [
                "train",
                "--resume",
                "--no-progress",
                "--steps",
                "8",
                "--lr",
                "1e-4",
                "--out",
                str(parts),
            ]
        )
        == 0
    )
    state, cfg, meta = ckpt.load_checkpoint(parts / CHECKPOINT_NAME)
    assert int(state["step"]) == 8 and cfg.train.lr == 1e-4
    assert [h["changes"] for h in meta["history"]] == [
        {"train.steps": [4, 6]},
        {"train.steps": [6, 8], "train.lr": [1e-3, 1e-4]},
    ]
    assert [h["step"] for h in meta["history"]] == [4, 6]
    rows = [json.loads(r) for r in (parts / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(8)) and all(np.isfinite(r["loss"]) for r in rows)
    assert rows[-1]["lr"] == learning_rate(7, cfg.train) < 1e-4


def test_checkpoints_of_the_older_layout_load_but_do_not_resume(tmp_path, photos, capsys):
    """A Stage-2 checkpoint written when the optimiser moments and EMA covered every group,
    frozen ones included: its weights serve --init-from, eval and reconstruct; --resume
    refuses it in one line that says what to do."""
    from maetok.config import preset
    from maetok.trainer import params_from_checkpoint
    from maetok.tree import map_tree
    from maetok_jax.train import init_state, state_to_numpy

    cfg = preset("tiny").replace(train={"stage": 2, "batch_size": 4})
    tree = state_to_numpy(init_state(cfg, 0))
    params = tree["params"]
    rng = np.random.default_rng(0)
    noise = lambda scale: map_tree(
        lambda a: scale * rng.standard_normal(a.shape, np.float32), params
    )
    tree["opt"] = {"count": np.int32(3), "mu": noise(1e-3), "nu": map_tree(np.abs, noise(1e-6))}
    tree["ema"] = map_tree(lambda p, n: p + n, params, noise(1e-2))
    tree["step"] = np.int32(3)
    old = tmp_path / "old"
    ckpt.save_checkpoint(
        old / CHECKPOINT_NAME, tree, cfg, {"backend": "jax", "stage": 2, "step": 3}
    )
    path = str(old / CHECKPOINT_NAME)
    assert {k.split("/")[2] for k in flatten(tree) if k.startswith("opt/mu/")} == {
        "encoder",
        "decoder",
        "aux",
    }

    for use_ema, want in ((False, params), (True, tree["ema"])):  # every group, as stored
        got = flatten(params_from_checkpoint(path, cfg, use_ema))
        assert got.keys() == flatten(want).keys()
        for k, v in flatten(want).items():
            np.testing.assert_array_equal(got[k], v, err_msg=k)
    out = tmp_path / "recon"
    assert (
        main(["reconstruct", "--checkpoint", path, "--input", str(photos), "--out", str(out)]) == 0
    )
    assert len(list(out.glob("*.png"))) == 5
    ev = tmp_path / "ev"
    assert (
        main(["eval", "--checkpoint", path, "--ema", "--data", str(photos), "--out", str(ev)]) == 0
    )
    assert np.isfinite(json.loads((ev / "eval.json").read_text())["tokenizer"]["psnr"])

    new = tmp_path / "new"
    argv = ["train", *FAST, "--stage", "2", "--steps", "2", "--init-from", path, "--out", str(new)]
    assert main(argv) == 0
    state, _, _ = ckpt.load_checkpoint(new / CHECKPOINT_NAME)
    assert set(state["ema"]) == set(state["opt"]["mu"]) == {"decoder"}
    for k, v in flatten(params["encoder"]).items():  # frozen, as loaded
        np.testing.assert_array_equal(flatten(state["params"]["encoder"])[k], v, err_msg=k)

    before = (old / CHECKPOINT_NAME).read_bytes()
    line = cli_error(capsys, ["train", "--resume", "--no-progress", "--out", str(old)])
    assert "older train-state layout" in line and "encoder" in line, line
    assert f"--init-from {path}" in line, line
    assert (old / CHECKPOINT_NAME).read_bytes() == before
