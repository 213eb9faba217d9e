"""Each backend, the same ``maetok train`` command twice on the ``--device`` of the run (with
its default deterministic kernels): the same checkpoint, tensor for tensor; another seed, another
one. On CUDA this is the determinism check of both backends (JAX: XLA's deterministic ops;
torch: ``torch.use_deterministic_algorithms`` and cuBLAS's fixed workspace), each run a fresh
process that compiles afresh."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
STEPS = ["--preset", "tiny", "--steps", "3", "--batch-size", "4", "--no-progress"]


def _digest(out: Path, backend: str, device: str, *extra: str) -> str:
    cmd = [sys.executable, "-m", "maetok.cli", "train", *STEPS, "--out", str(out)]
    cmd += ["--backend", backend, "--device", device, *extra]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "XLA_PYTHON_CLIENT_PREALLOCATE": "false"}
    env["MAETOK_JAX_CACHE"] = "off"  # each run compiles afresh
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return re.search(r"tensors sha256 ([0-9a-f]{16})", proc.stdout + proc.stderr).group(1)


@pytest.mark.parametrize("backend", ["jax", "torch"])
def test_the_same_command_twice_on_the_device_gives_the_same_checkpoint(backend, device, tmp_path):
    first = _digest(tmp_path / "a", backend, device)
    again = _digest(tmp_path / "b", backend, device)
    other = _digest(tmp_path / "c", backend, device, "--seed", "1")
    assert first == again != other
