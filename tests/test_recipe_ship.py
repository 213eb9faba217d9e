"""``recipe.py ship``: a finished run's tokenizer put where the package ships it, with its
model card and picture sheet; one line and nothing written when it must refuse."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from examples import recipe
from examples.recipe_ship import (
    EXPORTED,
    REPORTS,
    SHEET,
    SHEET_MAX_BYTES,
    export_better,
    model_card,
)
from maetok import checkpoint as ckpt
from maetok import pretrained
from maetok.cli import main
from maetok.data import load_eval_images
from maetok.evaluate import SHEET_NAME
from maetok.metrics import psnr
from maetok.trainer import get_backend
from tests.test_cli import FAST, _photos

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A run folder as ``recipe.py run`` leaves it (Stage 1 and Stage 2 of 2 tiny steps on
    the synthetic images, both Stage-2 reports) and a data folder with ``bsds500/val``."""
    tmp = tmp_path_factory.mktemp("finished")
    data, run = tmp / "data", tmp / "run"
    _photos(data / "bsds500" / "val", np.random.default_rng(0), n=4, size=48)
    assert main(["train", *FAST, "--steps", "2", "--out", str(run / "stage1")]) == 0
    stage1 = str(run / "stage1" / "checkpoint.safetensors")
    stage2 = ["--stage", "2", "--init-from", stage1, "--out", str(run / "stage2")]
    assert main(["train", *FAST, "--steps", "2", *stage2]) == 0
    for folder, ema in (("eval", ["--ema"]), ("eval_raw", [])):
        argv = ["eval", "--checkpoint", str(run / "stage2" / "checkpoint.safetensors"), *ema]
        argv += ["--data", str(data / "bsds500" / "val"), "--out", str(run / "stage2" / folder)]
        assert main(argv) == 0
    return run, data


def _ship(run, data, out, *extra) -> list[str]:
    """``recipe.py ship`` arguments that write into ``out`` (weights/ and docs/)."""
    weights = out / "weights" / "maetok-seed.safetensors"
    paths = ["--weights", str(weights), "--data", str(data), "--docs", str(out / "docs")]
    return ["ship", str(run), *paths, *extra]


@pytest.fixture(scope="module")
def shipped(finished, tmp_path_factory):
    run, data = finished
    out = tmp_path_factory.mktemp("package")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("PYTHONPATH", str(ROOT))  # `maetok eval` runs as a child process
        assert recipe.main(_ship(run, data, out, "--force")) == 0
    weights = out / "weights" / "maetok-seed.safetensors"
    return run, data, weights, json.loads(weights.with_suffix(".json").read_text()), out


def test_ship_writes_the_float16_file_its_card_and_the_sheet(shipped):
    run, data, weights, card, out = shipped
    flat, _, meta = ckpt.load_tree(weights)
    assert flat and all(a.dtype == np.float16 for a in flat.values()) and meta["weights_only"]
    assert sorted(p.name for p in weights.parent.iterdir()) == [
        "maetok-seed.json",
        "maetok-seed.safetensors",
    ]  # the staged export is gone
    assert card["sha256"] == ckpt.file_sha256(weights)
    assert card["bytes"] == weights.stat().st_size <= pretrained.MAX_SHIPPED_BYTES
    assert card["parameters"] == sum(a.size for a in flat.values())
    reports = {w: json.loads((run / "stage2" / f / "eval.json").read_text())
               for w, f in REPORTS.items()}  # fmt: skip
    best = max(reports, key=lambda w: reports[w]["tokenizer"]["psnr"])
    assert card["weights"] == meta["weights"] == best
    assert card["checkpoint_sha256"] == ckpt.file_sha256(run / "stage2/checkpoint.safetensors")
    assert card["stages"]["stage1"]["steps"] == card["stages"]["stage2"]["steps"] == 2
    assert card["stages"]["stage2"]["settings"]["train.stage"] == 2 and card["seed"] == 0
    assert "synthetic" in card["training_data"] and card["forced"]

    # the numbers are the exported file's own, measured again here
    report = json.loads((run / "shipped_eval" / "eval.json").read_text())
    val = card["bsds500_val"]
    assert val["tokenizer"] == report["tokenizer"] and val["thumbnail"] == report["thumbnail"]
    wins = sum(i["psnr"] > i["thumb_psnr"] for i in report["per_image"])
    assert val["images_beating_thumbnail"] == wins and val["images"] == 4
    cfg, params = pretrained.load_params(weights)
    images, _ = load_eval_images(data / "bsds500" / "val", cfg.model.image_size)
    backend = get_backend("jax")(cfg, "cpu")
    recon = backend.reconstruct(backend.to_device_tree(params), images)
    assert abs(psnr(images, recon).mean() - val["tokenizer"]["psnr"]) < 1e-4

    sheet = out / "docs" / SHEET
    with Image.open(sheet) as jpg, Image.open(run / "shipped_eval" / SHEET_NAME) as png:
        assert jpg.format == "JPEG" and jpg.size == png.size
    assert sheet.stat().st_size <= SHEET_MAX_BYTES


def test_model_card_gives_the_key_numbers(shipped):
    card = shipped[3]
    text = model_card(card)
    val = card["bsds500_val"]
    for number in (
        f"| {val['tokenizer']['psnr']:.2f} | {val['tokenizer']['ssim']:.3f} "
        f"| {val['images_beating_thumbnail']}/{val['images']} |",
        f"| {val['thumbnail']['psnr']:.2f} | {val['thumbnail']['ssim']:.3f} | – |",
        card["sha256"],
        f"{card['bytes'] / 1e6:.1f} MB",
        f"Stage 1 for {card['stages']['stage1']['steps']:,} steps",
        f"![The shipped tokenizer on BSDS500 val]({card['sheet']})",
        f"recipe.py run {card['run']} --variant maetok --seed 0 --steps 4`",
    ):
        assert number in text, number
    assert "does not beat the thumbnail (shipped with `--force`)" in text
    assert "`train.stage=2`" in text.split("Stage 2 changes:")[1]


def _refused(capsys, argv) -> str:
    with pytest.raises(SystemExit) as stop:
        recipe.main(argv)
    err = capsys.readouterr().err.strip()
    assert stop.value.code == 2 and len(err.splitlines()) == 1, err
    assert err.startswith("recipe: error: ")
    return err


def test_ship_refuses_with_one_line_and_writes_nothing(finished, tmp_path, capsys, monkeypatch):
    run, data = finished
    report = json.loads((run / "stage2/eval_raw/eval.json").read_text())
    assert report["tokenizer"]["psnr"] < report["thumbnail"]["psnr"]  # 2 steps: far below
    line = _refused(capsys, _ship(run, data, tmp_path))
    assert f"{report['thumbnail']['psnr']:.2f} dB" in line and "--force" in line
    assert not (tmp_path / "weights").exists() and not (tmp_path / "docs").exists()

    stage1_only = tmp_path / "unfinished"
    (stage1_only / "stage1").mkdir(parents=True)
    line = _refused(capsys, _ship(stage1_only, data, tmp_path))
    assert "not a finished recipe run" in line and "stage2" in line

    # over the size limit: the file shipped before stays as it was, nothing staged is left
    weights = tmp_path / "weights" / "maetok-seed.safetensors"
    weights.parent.mkdir()
    weights.write_bytes(b"the tokenizer shipped before")
    monkeypatch.setattr(pretrained, "MAX_SHIPPED_BYTES", 1000)
    line = _refused(capsys, _ship(run, data, tmp_path, "--force"))
    assert "MB a shipped tokenizer may take" in line
    assert [p.name for p in weights.parent.iterdir()] == [weights.name]
    assert weights.read_bytes() == b"the tokenizer shipped before"


def test_ship_from_an_export_made_where_the_run_trained(finished, shipped, tmp_path, capsys):
    """A run whose checkpoints stayed on another machine ships from its exported weights
    (the export `recipe.py run` leaves in the run folder, or one given with --exported):
    the same bytes, the card's steps from metrics.jsonl, its data from the training folder."""
    run, data = finished
    best = shipped[3]["weights"]
    moved = tmp_path / "runs" / "run"  # as it comes back: configs, metrics, reports
    shutil.copytree(run, moved, ignore=shutil.ignore_patterns("checkpoint.safetensors", "shipped*"))
    here = tmp_path / "data"
    shutil.copytree(data, here)
    for folder in ("photos", "bsds500/train"):
        _photos(here / folder, np.random.default_rng(1), n=3, size=48)

    def export(stage, which):
        out = tmp_path / f"{stage}_{which}.safetensors"
        argv = ["export", "--checkpoint", str(run / stage / "checkpoint.safetensors")]
        assert main([*argv, "--out", str(out)] + (["--ema"] if which == "ema" else [])) == 0
        return out

    exports = {which: export("stage2", which) for which in ("ema", "raw")}

    other = "raw" if best == "ema" else "ema"
    line = _refused(
        capsys, _ship(moved, here, tmp_path, "--force", "--exported", str(exports[other]))
    )
    assert f"holds the {other} weights" in line and not (tmp_path / "weights").exists()
    stage1 = export("stage1", best)  # the right weights, but of another checkpoint
    line = _refused(capsys, _ship(moved, here, tmp_path, "--force", "--exported", str(stage1)))
    assert "is not from" in line and "train.stage 2 → 1" in line

    # `recipe.py run` ends a full run by exporting those weights into the run folder, where
    # `ship` finds them once the checkpoints are gone
    done = tmp_path / "runs" / "done"
    shutil.copytree(run, done, ignore=shutil.ignore_patterns("shipped*", "export*"))
    assert export_better(done) == done / EXPORTED
    meta = [ckpt.read_header(f)[1] for f in (done / EXPORTED, exports[best])]
    assert meta[0] == meta[1]  # (the bytes differ: the header's key order varies by process)
    assert ckpt.tensor_digest(done / EXPORTED) == ckpt.tensor_digest(exports[best])
    shutil.copy(done / EXPORTED, moved / EXPORTED)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("PYTHONPATH", str(ROOT))
        assert recipe.main(_ship(moved, here, tmp_path, "--force")) == 0
    weights = tmp_path / "weights" / "maetok-seed.safetensors"
    card = json.loads(weights.with_suffix(".json").read_text())
    assert weights.read_bytes() == (moved / EXPORTED).read_bytes()
    assert card["sha256"] == ckpt.file_sha256(moved / EXPORTED) and card["weights"] == best
    assert card["checkpoint_sha256"] == ckpt.file_sha256(run / "stage2/checkpoint.safetensors")
    assert card["stages"]["stage1"]["steps"] == card["stages"]["stage2"]["steps"] == 2
    assert card["training_data"] == "6 images in bsds500_train/, photos/"
    assert card["bsds500_val"]["tokenizer"] == shipped[3]["bsds500_val"]["tokenizer"]
    assert card["exported_elsewhere"] and not shipped[3]["exported_elsewhere"]
    assert "as exported where it trained" in model_card(card)
