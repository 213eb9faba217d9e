"""``maetok diffusion train / sample`` end to end on a tiny tokenizer and CIFAR-like arrays."""

import json

import numpy as np
import pytest
from PIL import Image

from maetok import checkpoint as ckpt
from maetok.cifar10 import CLASSES
from maetok.cli import main
from maetok.config import preset
from maetok_jax.backend import Backend
from tests.conftest import cli_error

FAST = [
    "--preset",
    "tiny",
    "--no-progress",
    "--batch-size",
    "8",
    "--set",
    "log_every=2",
    "--set",
    "ckpt_every=2",
]


def _tokenizer(path, cfg):
    backend = Backend(cfg)
    return ckpt.save_checkpoint(path, backend.state_to_numpy(backend.init_state(0)), cfg)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A tiny tokenizer checkpoint, a prepared CIFAR-like cache (30 images) and a 4-step run."""
    root = tmp_path_factory.mktemp("diffusion")
    tok = _tokenizer(root / "tok.safetensors", preset("tiny"))
    rng = np.random.default_rng(0)
    (root / "cache").mkdir()
    np.savez(
        root / "cache" / "train.npz",
        images=rng.integers(0, 256, (30, 32, 32, 3), dtype=np.uint8),
        labels=(np.arange(30) % 10).astype(np.int32),
    )
    (root / "cifar").mkdir()  # the archives are not needed once the cache holds the arrays
    data = ["--tokenizer", str(tok), "--cifar", str(root / "cifar"), "--cache", str(root / "cache")]
    run = root / "run"
    assert main(["diffusion", "train", *data, "--out", str(run), *FAST, "--steps", "4"]) == 0
    return root, tok, data, run


def test_train_writes_checkpoint_metrics_curves_and_latent_cache(setup):
    _, tok, _, run = setup
    tree, cfg, meta = ckpt.load_diffusion(run / "diffusion.safetensors")
    m = preset("tiny").model
    assert (cfg.num_tokens, cfg.token_dim, cfg.batch_size, cfg.steps) == (
        m.num_latent_tokens,
        m.latent_dim,
        8,
        4,
    )
    assert meta["step"] == 4 and meta["tokenizer_sha256"] == ckpt.file_sha256(tok)
    assert meta["tokenizer"] == str(tok.resolve()) and meta["tokenizer_ema"] is False
    caches = list(run.glob("latents-*.npz"))
    assert [p.name for p in caches] == [f"latents-{meta['tokenizer_sha256'][:16]}.npz"]
    with np.load(caches[0]) as f:
        latents = f["latents"]
    assert latents.shape == (30, m.num_latent_tokens, m.latent_dim)
    np.testing.assert_allclose(tree["norm"]["mean"], latents.mean((0, 1)), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(tree["norm"]["std"], latents.std((0, 1)), rtol=1e-4)
    lines = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
    assert [l["step"] for l in lines] == [0, 1, 2, 3]
    assert all(np.isfinite(l["loss"]) and l["loss"] > 0 for l in lines)
    assert (run / "curves.png").exists()


def test_resume_continues_from_the_cached_latents(setup, monkeypatch):
    _, _, data, run = setup
    import maetok.cifar10

    monkeypatch.setattr(maetok.cifar10, "load_split", lambda *a, **k: pytest.fail("re-encoded"))
    assert (
        main(
            [
                "diffusion",
                "train",
                *data,
                "--out",
                str(run),
                "--resume",
                "--steps",
                "6",
                "--no-progress",
            ]
        )
        == 0
    )
    _, cfg, meta = ckpt.load_diffusion(run / "diffusion.safetensors")
    assert meta["step"] == 6 and cfg.steps == 6
    steps = [json.loads(l)["step"] for l in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(6))


def test_sample_writes_images_labels_and_a_class_grid(setup, tmp_path):
    _, _, _, run = setup
    out, grid = tmp_path / "s.npz", tmp_path / "grid.png"
    assert (
        main(
            [
                "diffusion",
                "sample",
                "--checkpoint",
                str(run / "diffusion.safetensors"),
                "--num",
                "2",
                "--per-class",
                "--steps",
                "3",
                "--guidance",
                "2",
                "--batch-size",
                "8",
                "--out",
                str(out),
                "--grid",
                str(grid),
            ]
        )
        == 0
    )
    with np.load(out) as f:
        images, labels = f["images"], f["labels"]
    assert images.dtype == np.uint8 and images.shape == (20, 32, 32, 3)
    assert labels.tolist() == [c for c in range(10) for _ in range(2)]
    assert images.std() > 0 and len(np.unique(images.reshape(20, -1), axis=0)) == 20
    with Image.open(grid) as im:  # one row per class, two samples in each
        assert im.height > 10 * 32 and im.width > 2 * 32
    assert len(CLASSES) == 10


def test_bad_input_is_one_line(setup, tmp_path, capsys):
    root, tok, data, run = setup
    ck = str(run / "diffusion.safetensors")
    train = ["diffusion", "train", *FAST, "--steps", "2"]
    msg = cli_error(capsys, [*train, *data, "--out", str(run)])
    assert "already holds a diffusion checkpoint" in msg
    msg = cli_error(capsys, [*train, *data, "--out", str(tmp_path / "a"), "--set", "widht=3"])
    assert "widht" in msg
    msg = cli_error(capsys, [*train, *data, "--out", str(tmp_path / "b"), "--set", "num_tokens=3"])
    assert "fixed by the tokenizer" in msg
    wide = _tokenizer(tmp_path / "wide.safetensors", preset("tiny", model={"image_size": 64}))
    msg = cli_error(
        capsys,
        [
            *train,
            "--tokenizer",
            str(wide),
            "--cifar",
            str(root / "cifar"),
            "--out",
            str(tmp_path / "c"),
        ],
    )
    assert "64×64×3" in msg
    msg = cli_error(
        capsys,
        [
            *train,
            "--tokenizer",
            str(tok),
            "--cifar",
            str(tmp_path / "none"),
            "--cache",
            str(tmp_path / "empty"),
            "--out",
            str(tmp_path / "d"),
        ],
    )
    assert "CIFAR-10 folder" in msg
    msg = cli_error(
        capsys,
        [
            *train,
            "--tokenizer",
            str(tmp_path / "missing.safetensors"),
            "--cifar",
            ".",
            "--out",
            str(tmp_path / "e"),
        ],
    )
    assert "does not exist" in msg
    msg = cli_error(capsys, ["diffusion", "sample", "--checkpoint", str(tok)])
    assert "maetok-diffusion/1" in msg
    msg = cli_error(capsys, ["diffusion", "sample", "--checkpoint", ck, "--num", "0"])
    assert "--num" in msg
    msg = cli_error(capsys, ["diffusion", "sample", "--checkpoint", ck, "--tokenizer", str(wide)])
    assert "CIFAR-10" in msg
    other = _tokenizer(tmp_path / "other.safetensors", preset("tiny", train={"seed": 1}))
    msg = cli_error(capsys, ["diffusion", "sample", "--checkpoint", ck, "--tokenizer", str(other)])
    assert "not the one this model was trained on" in msg
