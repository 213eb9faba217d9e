"""The command line: the main job end to end, and one clear line for every bad input."""

import json

import numpy as np
import pytest
from PIL import Image

from maetok.cli import main
from maetok.config import preset
from tests.conftest import cli_error

FAST = [
    "--preset",
    "tiny",
    "--no-progress",
    "--set",
    "train.log_every=2",
    "--set",
    "train.ckpt_every=4",
    "--set",
    "train.sample_every=4",
    "--batch-size",
    "4",
]


def _photos(folder, rng, n=3, size=40, mode="RGB"):
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        arr = rng.integers(0, 256, (size, size + 3 * i, 3), dtype=np.uint8)
        Image.fromarray(arr).convert(mode).save(folder / f"img{i}.png")
    return folder


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A 4-step tiny run on synthetic data, shared by the inference commands."""
    out = tmp_path_factory.mktemp("run")
    assert main(["train", *FAST, "--steps", "4", "--out", str(out)]) == 0
    return out


def test_train_writes_checkpoint_metrics_and_pictures(trained):
    assert (trained / "checkpoint.safetensors").exists()
    lines = [json.loads(l) for l in (trained / "metrics.jsonl").read_text().splitlines()]
    assert [l["step"] for l in lines] == [0, 1, 2, 3]
    assert all(np.isfinite(l["loss"]) and l["images_per_s"] > 0 for l in lines)
    assert (trained / "samples" / "step_000004.png").exists()
    assert (trained / "curves.png").exists()


def test_reconstruct_encode_decode_eval(trained, tmp_path, rng, capsys):
    photos = _photos(tmp_path / "photos", rng)
    ck = str(trained / "checkpoint.safetensors")
    assert (
        main(
            [
                "reconstruct",
                "--checkpoint",
                ck,
                "--input",
                str(photos),
                "--out",
                str(tmp_path / "rec"),
            ]
        )
        == 0
    )
    assert sorted(p.name for p in (tmp_path / "rec").iterdir()) == [
        "img0.png",
        "img1.png",
        "img2.png",
    ]
    assert (
        main(
            [
                "encode",
                "--checkpoint",
                ck,
                "--input",
                str(photos),
                "--out",
                str(tmp_path / "lat.npy"),
            ]
        )
        == 0
    )
    m = preset("tiny").model
    assert np.load(tmp_path / "lat.npy").shape == (3, m.num_latent_tokens, m.latent_dim)
    assert (
        main(
            [
                "decode",
                "--checkpoint",
                ck,
                "--latents",
                str(tmp_path / "lat.npy"),
                "--out",
                str(tmp_path / "dec"),
            ]
        )
        == 0
    )
    assert len(list((tmp_path / "dec").glob("*.png"))) == 3
    assert (
        main(["eval", "--checkpoint", ck, "--data", str(photos), "--out", str(tmp_path / "ev")])
        == 0
    )
    report = json.loads((tmp_path / "ev" / "eval.json").read_text())
    assert report["images"] == 3 and np.isfinite(report["tokenizer"]["psnr"])
    assert (tmp_path / "ev" / "eval_sheet.png").exists()
    assert "psnr_by_mask_ratio" not in report


def test_eval_reports_psnr_by_mask_ratio(trained, tmp_path, rng, capsys):
    photos = _photos(tmp_path / "photos", rng)
    ck = str(trained / "checkpoint.safetensors")
    assert (
        main(
            [
                "eval",
                "--checkpoint",
                ck,
                "--data",
                str(photos),
                "--out",
                str(tmp_path / "ev"),
                "--mask-ratios",
                "0,0.5,1",
            ]
        )
        == 0
    )
    report = json.loads((tmp_path / "ev" / "eval.json").read_text())
    by_r = report["psnr_by_mask_ratio"]
    assert list(by_r) == ["0", "0.5", "1"]
    assert abs(by_r["0"] - report["tokenizer"]["psnr"]) < 1e-4  # r = 0 is the plain eval
    assert by_r["1"] != by_r["0"]  # every token masked: the input is gone
    assert "PSNR by input mask ratio" in capsys.readouterr().out
    line = cli_error(
        capsys, ["eval", "--checkpoint", ck, "--data", str(photos), "--mask-ratios", "0.2,1.5"]
    )
    assert "--mask-ratios" in line and "1.5" in line


def test_broken_images_stop_before_training_or_are_skipped_on_request(capsys, tmp_path, rng):
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "a.jpg").write_bytes(b"not a jpeg at all")
    line = cli_error(
        capsys, ["train", *FAST, "--steps", "1", "--data", str(bad), "--out", str(tmp_path / "o")]
    )
    assert "a.jpg" in line and "--skip-broken" in line
    assert not (tmp_path / "o").exists()  # nothing was started
    line = cli_error(
        capsys,
        [
            "train",
            *FAST,
            "--steps",
            "1",
            "--data",
            str(bad),
            "--skip-broken",
            "--out",
            str(tmp_path / "o"),
        ],
    )
    assert "none of the 1" in line
    _photos(bad, rng, n=2)
    with pytest.warns(UserWarning, match="skipped 1 of 3 images.*a.jpg"):
        assert (
            main(
                [
                    "train",
                    *FAST,
                    "--steps",
                    "1",
                    "--data",
                    str(bad),
                    "--skip-broken",
                    "--out",
                    str(tmp_path / "o2"),
                ]
            )
            == 0
        )


def test_checkpoint_from_another_config(capsys, trained, tmp_path):
    line = cli_error(
        capsys,
        [
            "train",
            *FAST,
            "--steps",
            "2",
            "--stage",
            "2",
            "--set",
            "model.enc_width=32",
            "--init-from",
            str(trained / "checkpoint.safetensors"),
            "--out",
            str(tmp_path / "o"),
        ],
    )
    assert "enc_width" in line


def test_impossible_config(capsys, tmp_path):
    line = cli_error(
        capsys,
        [
            "train",
            *FAST,
            "--steps",
            "1",
            "--set",
            "model.patch_size=5",
            "--out",
            str(tmp_path / "o"),
        ],
    )
    assert "divisible" in line
    line = cli_error(
        capsys,
        [
            "train",
            *FAST,
            "--steps",
            "1",
            "--set",
            "train.mask_max=1.5",
            "--out",
            str(tmp_path / "o"),
        ],
    )
    assert "mask_max" in line


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(capsys, tmp_path):
    out = tmp_path / "nan"
    assert main(["train", *FAST, "--steps", "4", "--out", str(out)]) == 0
    before = (out / "checkpoint.safetensors").read_bytes()
    line = cli_error(
        capsys,
        [
            "train",
            *FAST,
            "--steps",
            "8",
            "--lr",
            "1e30",
            "--overwrite",
            "--set",
            "train.grad_clip=0",
            "--set",
            "train.warmup_steps=0",
            "--set",
            "train.optimizer=sgd",
            "--out",
            str(out),
        ],
    )
    assert "non-finite loss" in line and "checkpoint" in line
    assert (out / "checkpoint.safetensors").read_bytes() == before


def test_existing_run_is_not_overwritten_silently(capsys, trained):
    line = cli_error(capsys, ["train", *FAST, "--steps", "1", "--out", str(trained)])
    assert "--resume" in line and "--overwrite" in line


def test_compile_runs_the_torch_step_under_torch_compile(
    capsys, tmp_path, monkeypatch, fresh_dynamo
):
    import maetok_torch.train as tt

    made = []
    real = tt.compile_train_step

    def traced_only(cfg):  # dynamo's graph capture without Inductor's code generation
        step = real(cfg, backend="eager")
        made.append(step)
        return step

    monkeypatch.setattr(tt, "compile_train_step", traced_only)
    out = tmp_path / "compiled"
    assert (
        main(["train", *FAST, "--steps", "2", "--backend", "torch", "--compile", "--out", str(out)])
        == 0
    )
    assert len(made) == 1 and made[0].graphs >= 1  # the step went through torch.compile
    lines = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(lines) == 2 and all(np.isfinite(l["loss"]) for l in lines)
    line = cli_error(
        capsys, ["train", *FAST, "--steps", "1", "--compile", "--out", str(tmp_path / "j")]
    )
    assert "--compile" in line and "torch" in line


def test_several_checkpoints_evaluate_in_one_process_as_each_alone(
    trained, tmp_path, rng, monkeypatch
):
    """``evaluate_checkpoints`` (the recipe's reports) writes for each checkpoint the report
    ``maetok eval`` writes for it alone, loading the images and building the backend once."""
    from maetok import evaluate, trainer

    photos = _photos(tmp_path / "photos", rng)
    ck = trained / "checkpoint.safetensors"
    for ema, name in ((True, "alone_ema"), (False, "alone_raw")):
        argv = [
            "eval",
            "--checkpoint",
            str(ck),
            "--data",
            str(photos),
            "--out",
            str(tmp_path / name),
        ]
        assert main(argv + (["--ema"] if ema else [])) == 0
    built, loaded = [], []
    monkeypatch.setattr(
        trainer, "get_backend", lambda n, f=trainer.get_backend: built.append(n) or f(n)
    )
    real_load = evaluate.EvalSet.load.__func__
    monkeypatch.setattr(
        evaluate.EvalSet, "load", classmethod(lambda c, *a: loaded.append(a) or real_load(c, *a))
    )
    jobs = [(ck, True, tmp_path / "ema"), (ck, False, tmp_path / "raw")]
    reports = evaluate.evaluate_checkpoints(jobs, photos)
    assert len(built) == 1 and len(loaded) == 1
    assert reports[0]["tokenizer"] != reports[1]["tokenizer"]  # EMA and raw weights differ
    for name, alone in (("ema", "alone_ema"), ("raw", "alone_raw")):
        assert (tmp_path / name / "eval.json").read_text() == (
            tmp_path / alone / "eval.json"
        ).read_text()
