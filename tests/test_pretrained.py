"""Exported weights-only files: what they hold, both backends reading them, and the default
tokenizer the inference commands fall back to."""

import numpy as np
import pytest

from maetok import checkpoint as ckpt
from maetok import pretrained
from maetok.cli import main
from maetok.trainer import get_backend, params_from_checkpoint
from maetok.tree import flatten
from tests.conftest import cli_error
from tests.test_cli import FAST, _photos


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    run = tmp_path_factory.mktemp("run")
    assert main(["train", *FAST, "--steps", "2", "--out", str(run)]) == 0
    source = run / "checkpoint.safetensors"
    out = run / "weights.safetensors"
    assert main(["export", "--checkpoint", str(source), "--out", str(out)]) == 0
    return source, out


def test_export_keeps_the_encoder_and_decoder_in_float16(exported):
    source, out = exported
    flat, _, meta = ckpt.load_tree(out)
    assert {k.split("/")[1] for k in flat} == set(pretrained.INFERENCE_GROUPS)
    assert all(k.startswith("params/") and v.dtype == np.float16 for k, v in flat.items())
    assert meta["weights_only"] is True and meta["source_sha256"] == ckpt.file_sha256(source)
    assert out.stat().st_size < source.stat().st_size / 4  # no optimiser, EMA or aux heads
    cfg, params = pretrained.load_params(out)
    full = params_from_checkpoint(source, cfg)
    for group in pretrained.INFERENCE_GROUPS:
        for key, leaf in flatten(params[group]).items():
            want = flatten(full[group])[key]
            assert leaf.dtype == np.float32
            np.testing.assert_array_equal(leaf, want.astype(np.float16).astype(np.float32))


def test_both_backends_reconstruct_from_the_exported_file_as_from_the_checkpoint(exported, rng):
    source, out = exported
    cfg, params = pretrained.load_params(out)
    images = rng.uniform(-1, 1, (2, cfg.model.image_size, cfg.model.image_size, 3))
    images = images.astype(np.float32)
    recon = {}
    for name in ("jax", "torch"):
        backend = get_backend(name)(cfg, "cpu")
        recon[name] = backend.reconstruct(backend.to_device_tree(params), images)
    full = get_backend("jax")(cfg, "cpu")
    reference = full.reconstruct(full.to_device_tree(params_from_checkpoint(source, cfg)), images)
    np.testing.assert_allclose(recon["torch"], recon["jax"], atol=1e-4)
    assert np.abs(recon["jax"] - reference).max() < 2e-2  # float16 weights, float32 compute
    assert np.abs(recon["jax"] - images).mean() > 0  # a real reconstruction, not the input


def test_inference_commands_use_the_shipped_file_when_given_no_checkpoint(
    exported, tmp_path, rng, capsys, monkeypatch
):
    photos = _photos(tmp_path / "in", rng)
    missing = tmp_path / "none.safetensors"
    monkeypatch.setattr(pretrained, "SHIPPED", missing)
    line = cli_error(capsys, ["reconstruct", "--input", str(photos), "--out", str(tmp_path)])
    assert "ships no pretrained tokenizer" in line and "--checkpoint" in line
    monkeypatch.setattr(pretrained, "SHIPPED", exported[1])
    assert main(["reconstruct", "--input", str(photos), "--out", str(tmp_path / "r")]) == 0
    assert len(list((tmp_path / "r").glob("*.png"))) == 3
    line = cli_error(capsys, ["encode", "--ema", "--input", str(photos), "--out", "x.npy"])
    assert "leave out --ema" in line
    line = cli_error(capsys, ["export", "--checkpoint", str(missing), "--out", "w.safetensors"])
    assert str(missing) in line
