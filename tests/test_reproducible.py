"""Reproducible training: the switches, and the same command twice giving the same weights."""

import json
import os
import re

from maetok import reproducible
from maetok.checkpoint import tensor_digest
from maetok.cli import _train_config, build_parser, main
from tests.test_cli import FAST


def test_request_sets_each_frameworks_switch_once_and_keeps_the_users_flags(monkeypatch):
    monkeypatch.setenv("XLA_FLAGS", "--xla_dump_to=/tmp/x")
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    reproducible.request("jax", True)
    reproducible.request("jax", True)
    flags = os.environ["XLA_FLAGS"].split()
    assert flags == ["--xla_dump_to=/tmp/x", reproducible.XLA_FLAG]
    reproducible.request("torch", True)
    assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == reproducible.CUBLAS_WORKSPACE
    assert reproducible.xla_deterministic()
    monkeypatch.setenv("XLA_FLAGS", "")
    reproducible.request("jax", False)
    assert os.environ["XLA_FLAGS"] == ""
    assert not reproducible.xla_deterministic()


def _train(out, capsys, *extra) -> str:
    assert main(["train", *FAST, "--steps", "3", "--out", str(out), *extra]) == 0
    line = capsys.readouterr().out
    return re.search(r"tensors sha256 ([0-9a-f]{16})", line).group(1)


def test_the_same_command_twice_gives_the_same_weights(tmp_path, capsys):
    first = _train(tmp_path / "a", capsys)
    again = _train(tmp_path / "b", capsys)
    other_seed = _train(tmp_path / "c", capsys, "--seed", "1")
    assert first == again != other_seed
    assert tensor_digest(tmp_path / "a/checkpoint.safetensors") == tensor_digest(
        tmp_path / "b/checkpoint.safetensors"
    )
    assert json.loads((tmp_path / "a/config.json").read_text())["train"]["deterministic"]


def test_nondeterministic_turns_the_switch_off():
    args = build_parser().parse_args(["train", "--preset", "tiny", "--nondeterministic"])
    assert not _train_config(args).train.deterministic
    assert _train_config(build_parser().parse_args(["train"])).train.deterministic
