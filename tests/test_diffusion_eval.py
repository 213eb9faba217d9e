"""`classifier` and `eval` sub-commands end to end on tiny CIFAR-10 archives and a tiny
tokenizer; the measurements of identical sets; one-line errors with exit status 2."""

import argparse
import json

import numpy as np
import pytest

from maetok import cli
from maetok.diffusion_eval_cli import register
from maetok_jax.generation_metrics import normalise_latents
from tests.test_cifar10 import make_archives


@pytest.fixture
def run(monkeypatch):
    """``run(argv)`` → exit status, through ``maetok.cli.main`` and its error handling."""

    def parser():
        p = argparse.ArgumentParser(prog="maetok")
        register(p.add_subparsers(dest="command", required=True))
        return p

    monkeypatch.setattr(cli, "build_parser", parser)
    return cli.main


def _tokenizer(path, tiny):
    from maetok.checkpoint import save_checkpoint
    from maetok.trainer import get_backend

    backend = get_backend("jax")(tiny)
    save_checkpoint(path, backend.state_to_numpy(backend.init_state(0)), tiny)
    return backend


def test_classifier_then_eval(tmp_path, rng, tiny, run, capsys):
    make_archives(tmp_path / "src", rng, per_class=4, n_test=12)
    cache = tmp_path / "cache"
    common = ["--cifar", str(tmp_path / "src"), "--cache", str(cache)]
    train = [
        "classifier",
        *common,
        "--widths",
        "4,8,8,8",
        "--epochs",
        "1",
        "--batch-size",
        "8",
        "--dtype",
        "float32",
        "--no-progress",
    ]
    assert run(["prepare", *common]) == 0
    assert f"train images for `maetok train --data`: {cache / 'train'}" in capsys.readouterr().out
    assert run(train) == 0
    assert "test accuracy" in capsys.readouterr().out
    assert (cache / "classifier.safetensors").is_file()
    assert run(train) == 0
    assert "reusing classifier" in capsys.readouterr().out

    from maetok import cifar10

    test_images, test_labels = cifar10.load_split("test", cache=cache)
    np.savez(tmp_path / "samples.npz", images=test_images, labels=test_labels)
    backend = _tokenizer(tmp_path / "tok.safetensors", tiny)
    report_path = tmp_path / "report.json"
    assert (
        run(
            [
                "eval",
                "--cache",
                str(cache),
                "--samples",
                str(tmp_path / "samples.npz"),
                "--ref",
                "test",
                "--tokenizer",
                str(tmp_path / "tok.safetensors"),
                "--components",
                "1,2",
                "--gmm-train",
                "30",
                "--out",
                str(report_path),
            ]
        )
        == 0
    )
    printed = capsys.readouterr().out
    assert "fd_c10" in printed and "linear probe" in printed
    report = json.loads(report_path.read_text())
    s = report["samples"]
    # the samples are the reference set itself: no distance, full precision and recall
    assert abs(s["fd_c10"]) < 1e-3 and s["precision"] == 1.0 and s["recall"] == 1.0
    assert s["class_consistency"] == s["reference_accuracy"] and s["num_samples"] == 12
    t = report["tokenizers"][str(tmp_path / "tok.safetensors")]
    assert t["latent_shape"] == [tiny.model.num_latent_tokens, tiny.model.latent_dim]
    assert set(t["gmm_nll"]) == {"1", "2"} and all(np.isfinite(list(t["gmm_nll"].values())))
    assert 0.0 <= t["linear_probe"] <= 1.0
    from maetok.data import from_uint8
    from maetok.metrics import psnr

    x = from_uint8(test_images)
    params = backend.to_device_tree(backend.state_to_numpy(backend.init_state(0))["params"])
    assert t["psnr"] == pytest.approx(
        float(psnr(x, backend.reconstruct(params, x)).mean()), rel=1e-4
    )


def test_latents_are_normalised_per_channel_with_training_statistics(rng):
    train = rng.normal(3.0, [1.0, 5.0, 0.1], (50, 4, 3))
    other = rng.normal(3.0, [1.0, 5.0, 0.1], (20, 4, 3))
    z_train, z_other = normalise_latents(train, other)
    np.testing.assert_allclose(z_train.mean((0, 1)), 0, atol=1e-5)
    np.testing.assert_allclose(z_train.std((0, 1)), 1, rtol=1e-4)
    mean, std = train.mean((0, 1)), train.std((0, 1))
    np.testing.assert_allclose(z_other, (other - mean) / std, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(
    "argv,message",
    [
        (["eval"], "needs --samples"),
        (["eval", "--samples", "nowhere.npz"], "cannot read samples"),
        (["eval", "--tokenizer", "t.safetensors", "--components", "0,2"], "--components"),
        (["classifier", "--cifar", "missing_folder"], "does not exist"),
        (["classifier", "--widths", "8,x"], "--widths"),
    ],
)
def test_bad_input_is_one_line_with_status_2(tmp_path, monkeypatch, run, capsys, argv, message):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MAETOK_CACHE", str(tmp_path / "cache"))
    assert run(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("maetok: error:") and message in err and "\n" not in err


def test_samples_need_a_classifier_and_the_right_layout(tmp_path, monkeypatch, run, capsys):
    monkeypatch.setenv("MAETOK_CACHE", str(tmp_path / "cache"))
    np.savez(tmp_path / "s.npz", images=np.zeros((4, 32, 32, 3), np.uint8))
    assert run(["eval", "--samples", str(tmp_path / "s.npz")]) == 2
    assert "no classifier at" in capsys.readouterr().err
    np.savez(tmp_path / "f.npz", images=np.zeros((4, 32, 32, 3), np.float32))
    assert run(["eval", "--samples", str(tmp_path / "f.npz")]) == 2
    assert "must be uint8" in capsys.readouterr().err
