"""Every bad input, through the real command line in a subprocess: exit status 2, one line
``maetok: error: …`` and no traceback, for every command. Each case fails at input
validation, before anything is compiled."""

import json
import os
import shutil
import socket
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from safetensors import safe_open
from safetensors.numpy import save_file

from maetok.checkpoint import save_checkpoint
from maetok.config import preset
from maetok.data import ImageFolder
from maetok.params import init_params
from maetok.run import CHECKPOINT_NAME, LOCK_NAME, data_identity
from maetok.tree import flatten

ROOT = Path(__file__).resolve().parents[1]
# A CUDA device that does not exist: plain "cuda" on a machine without one (the usual case).
CUDA = "cuda:99" if Path("/dev/nvidia0").exists() else "cuda"


def _photos(folder: Path, n=3, size=40, seed=0, ext="png"):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (size, size + i, 3), dtype=np.uint8)).save(
            folder / f"img{i}.{ext}"
        )
    return folder


def _run_checkpoint(out: Path, cfg, data_folder: Path):
    """A run folder as training leaves it (parameters only: enough to validate a resume)."""
    meta = {
        "backend": "jax",
        "stage": 1,
        "step": 4,
        "data": data_identity(ImageFolder(data_folder, cfg.model.image_size)),
        "history": [],
    }
    save_checkpoint(out / CHECKPOINT_NAME, {"params": init_params(cfg, 0)}, cfg, meta)


@pytest.fixture(scope="module")
def paths(tmp_path_factory):
    t = tmp_path_factory.mktemp("bad")
    cfg = preset("tiny")
    p = {"tmp": t, "cuda": CUDA}
    p["photos"] = _photos(t / "photos")
    p["others"] = _photos(t / "others", seed=1)
    p["small"] = _photos(t / "small", n=1, size=20)
    (t / "empty").mkdir()
    p["empty"] = t / "empty"
    trunc = _photos(t / "truncated", n=2, ext="jpg")
    whole = (trunc / "img0.jpg").read_bytes()
    (trunc / "broken.jpg").write_bytes(whole[: len(whole) // 2])  # the header is intact
    p["truncated"] = trunc
    p["afile"] = t / "afile.txt"
    p["afile"].write_text("not a folder")

    good = save_checkpoint(t / "good.safetensors", {"params": init_params(cfg, 0)}, cfg)
    p["good"] = good
    p["random"] = t / "random.safetensors"
    p["random"].write_bytes(np.random.default_rng(0).bytes(4096))
    p["cut"] = t / "cut.safetensors"
    p["cut"].write_bytes(good.read_bytes()[:-100])
    with safe_open(str(good), framework="numpy") as f:
        metadata, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - a safetensors handle is not iterable
    bad_key = sorted(flatten({"params": init_params(cfg, 0)}))[3]
    tensors[bad_key] = tensors[bad_key].copy()
    tensors[bad_key].flat[0] = np.nan
    save_file(tensors, t / "nan.safetensors", metadata=metadata)
    p["nan"], p["nan_key"] = t / "nan.safetensors", bad_key

    m = cfg.model
    np.save(t / "badshape.npy", np.zeros((2, m.num_latent_tokens + 1, m.latent_dim), np.float32))
    nan_latents = np.zeros((2, m.num_latent_tokens, m.latent_dim), np.float32)
    nan_latents[0, 0, 0] = np.nan
    np.save(t / "nanlat.npy", nan_latents)
    (t / "badtype.json").write_text(json.dumps({"train": {"lr": "fast"}}))
    (t / "notobject.json").write_text(json.dumps({"model": 5}))

    _run_checkpoint(t / "run", cfg, p["photos"])
    changed = shutil.copytree(p["photos"], t / "changing")
    _run_checkpoint(t / "run_changed", cfg, changed)
    _photos(changed / "more", n=1, seed=2)  # the folder grows after the checkpoint
    (t / "locked").mkdir()
    (t / "locked" / LOCK_NAME).write_text(
        json.dumps(  # held by this (live) test process
            {"pid": os.getpid(), "host": socket.gethostname(), "since": "now"}
        )
    )
    return p


# {out}: a fresh folder per case; {run}: a copy of the run folder per case (cases run at once)
TRAIN = ["train", "--no-progress", "--steps", "2", "--out", "{out}"]
RESUME = ["train", "--no-progress", "--resume", "--out", "{run}"]
REC = ["reconstruct", "--checkpoint", "{good}", "--input", "{photos}", "--out", "{tmp}/rec"]
ENC = ["encode", "--checkpoint", "{good}", "--input", "{photos}", "--out", "{tmp}/lat.npy"]
DEC = ["decode", "--checkpoint", "{good}", "--latents", "{tmp}/badshape.npy", "--out", "{tmp}/dec"]
EVAL = ["eval", "--checkpoint", "{good}", "--data", "{photos}", "--out", "{tmp}/ev"]

CASES = {  # name: (argv, a piece of the expected message)
    "no command": ([], "required"),
    "unknown command": (["frobnicate"], "invalid choice"),
    "train: missing data folder": (TRAIN + ["--data", "{tmp}/nope"], "does not exist"),
    "train: empty data folder": (TRAIN + ["--data", "{empty}"], "no images"),
    "train: image smaller than the crop": (TRAIN + ["--data", "{small}"], "smaller than"),
    "train: truncated jpeg": (TRAIN + ["--data", "{truncated}"], "broken.jpg"),
    "train: --set integer abc": (TRAIN + ["--set", "train.batch_size=abc"], "train.batch_size"),
    "train: --set empty number": (TRAIN + ["--set", "train.lr="], "train.lr"),
    "train: --set gamma number": (TRAIN + ["--set", "loss.gamma=5"], "loss.gamma"),
    "train: --set aux_targets number": (
        TRAIN + ["--set", "model.aux_targets=5"],
        "model.aux_targets",
    ),
    "train: --set unknown field": (TRAIN + ["--set", "train.nosuch=1"], "nosuch"),
    "train: --set without a section": (TRAIN + ["--set", "lr=1"], "SECTION.FIELD"),
    "train: --set impossible value": (TRAIN + ["--set", "model.patch_size=5"], "divisible"),
    "train: --config wrong type": (TRAIN + ["--config", "{tmp}/badtype.json"], "train.lr"),
    "train: --config not an object": (TRAIN + ["--config", "{tmp}/notobject.json"], "model"),
    "train: --config missing": (TRAIN + ["--config", "{tmp}/nope.json"], "cannot read"),
    "train: --config and --preset": (
        TRAIN + ["--config", "{tmp}/badtype.json", "--preset", "tiny"],
        "only one",
    ),
    "train: NaN learning rate": (TRAIN + ["--lr", "nan"], "train.lr"),
    "train: --batch-size 0": (TRAIN + ["--batch-size", "0"], "--batch-size"),
    "train: --steps abc": (TRAIN + ["--steps", "abc"], "--steps"),
    "train: --out is a file": (TRAIN + ["--out", "{afile}"], "is a file"),
    "train: torch --device cuda": (TRAIN + ["--backend", "torch", "--device", "{cuda}"], "cuda"),
    "train: jax --device cuda": (TRAIN + ["--backend", "jax", "--device", "{cuda}"], "cuda"),
    "train: stage 2 without --init-from": (TRAIN + ["--stage", "2"], "--init-from"),
    "train: --compile with jax": (TRAIN + ["--compile"], "--compile"),
    "train: --out holds a run": (TRAIN + ["--out", "{run}"], "--resume"),
    "train: --out in use": (TRAIN + ["--out", "{tmp}/locked"], "in use"),
    "resume: no checkpoint": (RESUME + ["--out", "{tmp}/none"], "no checkpoint"),
    "resume: other data": (RESUME + ["--data", "{others}"], "--change data"),
    "resume: data folder changed": (RESUME + ["--out", "{tmp}/run_changed"], "has changed"),
    "resume: other preset": (RESUME + ["--preset", "seed"], "--preset seed"),
    "resume: unknown field": (RESUME + ["--set", "train.nosuch=1"], "nosuch"),
    "resume: wrong type": (RESUME + ["--set", "train.lr=abc"], "train.lr"),
    "resume: model change": (RESUME + ["--set", "model.enc_width=32"], "model.enc_width"),
    "resume: stage change": (RESUME + ["--stage", "2"], "train.stage"),
    "resume: other backend": (RESUME + ["--backend", "torch"], "--change backend"),
    "resume: with --overwrite": (RESUME + ["--overwrite"], "--overwrite"),
    "resume: --change without --resume": (TRAIN + ["--change", "data"], "--resume"),
    "reconstruct: --batch-size 0": (REC + ["--batch-size", "0"], "--batch-size"),
    "reconstruct: --mask-ratio 1.5": (REC + ["--mask-ratio", "1.5"], "--mask-ratio"),
    "reconstruct: random-byte checkpoint": (REC + ["--checkpoint", "{random}"], "not a readable"),
    "reconstruct: truncated checkpoint": (REC + ["--checkpoint", "{cut}"], "corrupt"),
    "reconstruct: NaN weights": (REC + ["--checkpoint", "{nan}"], "{nan_key}"),
    "reconstruct: missing checkpoint": (
        REC + ["--checkpoint", "{tmp}/no.safetensors"],
        "does not exist",
    ),
    "reconstruct: --ema without EMA": (REC + ["--ema"], "EMA"),
    "reconstruct: missing input": (REC + ["--input", "{tmp}/nope"], "does not exist"),
    "reconstruct: truncated jpeg": (REC + ["--input", "{truncated}"], "broken.jpg"),
    "reconstruct: --out is a file": (REC + ["--out", "{afile}"], "is a file"),
    "reconstruct: torch --device cuda": (
        REC + ["--backend", "torch", "--device", "{cuda}"],
        "cuda",
    ),
    "encode: --batch-size 0": (ENC + ["--batch-size", "0"], "--batch-size"),
    "encode: --out is a folder": (ENC + ["--out", "{photos}"], "is a folder"),
    "encode: small images": (ENC + ["--input", "{small}"], "smaller than"),
    "decode: latents of another shape": (DEC, "shape"),
    "decode: NaN latents": (DEC + ["--latents", "{tmp}/nanlat.npy"], "NaN"),
    "decode: missing latents": (DEC + ["--latents", "{tmp}/nope.npy"], "cannot read latents"),
    "eval: --batch-size 0": (EVAL + ["--batch-size", "0"], "--batch-size"),
    "eval: NaN weights": (EVAL + ["--checkpoint", "{nan}"], "NaN or infinite"),
    "eval: --mask-ratios above 1": (EVAL + ["--mask-ratios", "0.2,1.5"], "1.5"),
    "eval: empty folder": (EVAL + ["--data", "{empty}"], "no images"),
    "eval: jax --device cuda": (EVAL + ["--device", "{cuda}"], "cuda"),
    "parity: unknown preset": (["parity", "--preset", "huge"], "invalid choice"),
}


def _run_cli(argv):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run(
        [sys.executable, "-m", "maetok.cli", *argv],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


def _argv(i: int, argv: list[str], paths: dict) -> list[str]:
    own = {"out": paths["tmp"] / "out" / str(i), "run": paths["tmp"] / "runs" / str(i)}
    if any("{run}" in a for a in argv):
        shutil.copytree(paths["tmp"] / "run", own["run"])
    return [a.format(**paths, **own) for a in argv]


@pytest.fixture(scope="module")
def results(paths):
    """Every case run once, a few at a time: each is a fresh interpreter."""
    with ThreadPoolExecutor(max_workers=4) as pool:
        runs = {
            name: pool.submit(_run_cli, _argv(i, argv, paths))
            for i, (name, (argv, _)) in enumerate(CASES.items())
        }
        return {name: run.result() for name, run in runs.items()}


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input_gives_one_line_and_exit_2(name, paths, results):
    done, expected = results[name], CASES[name][1].format(**paths)
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert done.returncode == 2, done.stderr
    assert len(lines) == 1 and lines[0].startswith("maetok: error: "), done.stderr
    assert "Traceback" not in done.stderr + done.stdout
    assert expected in lines[0], lines[0]
