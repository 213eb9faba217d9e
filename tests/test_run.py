"""A run folder: its lock, leftovers of killed saves, SIGTERM saving before it stops."""

import errno
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from maetok import checkpoint as ckpt
from maetok.cli import main
from maetok.errors import MAETokError
from maetok.run import CHECKPOINT_NAME, LOCK_NAME, claim

ROOT = Path(__file__).resolve().parents[1]
FAST = [
    "--preset",
    "tiny",
    "--no-progress",
    "--batch-size",
    "4",
    "--set",
    "train.log_every=1",
    "--set",
    "train.sample_every=1000",
]


def _lock(out: Path, pid, host=None):
    out.mkdir(parents=True, exist_ok=True)
    (out / LOCK_NAME).write_text(
        json.dumps({"pid": pid, "host": host or socket.gethostname(), "since": "earlier"})
    )


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_lock_refuses_a_live_owner_and_takes_over_a_dead_one(tmp_path):
    out = tmp_path / "run"
    _lock(out, os.getppid())  # alive: the process that started the tests
    with (
        pytest.raises(
            MAETokError,
            match=rf"in use by another maetok run \(process "
            rf"{os.getppid()} on {socket.gethostname()}",
        ),
        claim(out),
    ):
        pass
    _lock(out, 4242, host="elsewhere")  # cannot be checked from here: the message says how
    with pytest.raises(MAETokError, match=f"elsewhere.*delete {out / LOCK_NAME}"), claim(out):
        pass
    _lock(out, _dead_pid())  # left behind by a killed run
    with claim(out):
        owner = json.loads((out / LOCK_NAME).read_text())
        assert owner["pid"] == os.getpid() and owner["host"] == socket.gethostname()
        with claim(out):  # the same process may enter again (the CLI, then the trainer)
            pass
        assert (out / LOCK_NAME).exists()
    assert not (out / LOCK_NAME).exists()
    with claim(tmp_path / "new"):
        pass
    assert not (tmp_path / "new").exists()  # a folder claimed and left empty is removed


def test_a_killed_save_leaves_nothing_behind_on_the_next_start(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    stale = out / f".{CHECKPOINT_NAME}.0123456789ab.tmp"  # what a kill during a save leaves
    stale.write_bytes(b"\0" * 1000)
    (out / "keep.txt").write_text("mine")
    with claim(out):
        assert not stale.exists()
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]


def test_disk_full_during_a_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    real, calls = ckpt.save_file, []

    def fills_up(tensors, filename, metadata=None):
        calls.append(filename)
        if len(calls) == 2:  # the second checkpoint of the run hits a full disk
            Path(filename).write_bytes(b"\0" * 100)
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(tensors, filename, metadata=metadata)

    monkeypatch.setattr(ckpt, "save_file", fills_up)
    code = main(["train", *FAST, "--steps", "4", "--set", "train.ckpt_every=2", "--out", str(out)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    assert err[0].startswith("maetok: error: cannot write checkpoint") and "No space" in err[0]
    _, meta = ckpt.read_header(out / CHECKPOINT_NAME)
    assert meta["step"] == 2  # the first checkpoint, intact
    ckpt.load_checkpoint(out / CHECKPOINT_NAME)
    assert not list(out.glob(".*.tmp")) and not (out / LOCK_NAME).exists()


def test_sigterm_saves_a_checkpoint_and_resume_continues(tmp_path, capsys):
    out = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    child = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "maetok.cli",
            "train",
            *FAST,
            "--steps",
            "100000",
            "--set",
            "train.ckpt_every=100000",
            "--out",
            str(out),
        ],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 120
        while not ((out / "metrics.jsonl").exists() and (out / "metrics.jsonl").read_text()):
            assert child.poll() is None and time.monotonic() < deadline, child.communicate()
            time.sleep(0.2)
        # While it trains, a second run into the same folder is refused.
        assert main(["train", *FAST, "--steps", "2", "--overwrite", "--out", str(out)]) == 2
        line = capsys.readouterr().err.strip()
        assert f"in use by another maetok run (process {child.pid}" in line
        child.send_signal(signal.SIGTERM)
        _, err = child.communicate(timeout=120)
    finally:
        if child.poll() is None:
            child.kill()
    assert child.returncode == 128 + signal.SIGTERM, err
    last = err.strip().splitlines()[-1]
    assert last.startswith("maetok: stopped by SIGTERM after") and "--resume" in last, err
    _, meta = ckpt.read_header(out / CHECKPOINT_NAME)
    stopped = meta["step"]
    assert stopped > 0 and f"after {stopped} steps" in last
    rows = [json.loads(r)["step"] for r in (out / "metrics.jsonl").read_text().splitlines()]
    assert rows == list(range(stopped))  # every step up to the checkpoint is logged, once
    assert not (out / LOCK_NAME).exists()

    assert (
        main(["train", "--resume", "--no-progress", "--steps", str(stopped + 2), "--out", str(out)])
        == 0
    )
    assert ckpt.read_header(out / CHECKPOINT_NAME)[1]["step"] == stopped + 2
    rows = [json.loads(r)["step"] for r in (out / "metrics.jsonl").read_text().splitlines()]
    assert rows == list(range(stopped + 2))
