"""Checkpoints: exact round trip, atomic saves, and precise messages for every mismatch."""

import errno
import json
import os

import numpy as np
import pytest
from safetensors import safe_open
from safetensors.numpy import save_file

from maetok import checkpoint
from maetok.checkpoint import (
    BackgroundSaver,
    layout,
    load_checkpoint,
    load_tree,
    read_config,
    remove_stale_temps,
    save_checkpoint,
    save_tree,
)
from maetok.errors import CheckpointError
from maetok.tree import flatten


def _state(rng):
    """A small train-state-shaped tree of random values with several dtypes."""
    w = rng.standard_normal((3, 4)).astype(np.float32)
    return {
        "step": np.int64(1234),
        "params": {
            "enc": {"w": w, "b": rng.standard_normal(4).astype(np.float32)},
            "flag": np.array([True, False]),
        },
        "opt": {
            "count": np.array(1234, np.int32),
            "mu": {"enc": {"w": 0.1 * w, "b": rng.standard_normal(4).astype(np.float32)}},
        },
        "ema": {"x": rng.standard_normal((2, 2)).astype(np.float64)},
    }


def test_round_trip_is_bit_exact(tmp_path, rng, tiny):
    state = _state(rng)
    path = save_checkpoint(
        tmp_path / "run" / "ckpt.safetensors",
        state,
        tiny,
        meta={"backend": "jax", "stage": 1, "extra": {"a": [1, 2]}, "n": "7"},
    )
    loaded, cfg, meta = load_checkpoint(path, tiny, layout(state))
    assert cfg == tiny and read_config(path) == tiny
    assert meta == {"backend": "jax", "stage": 1, "extra": {"a": [1, 2]}, "n": "7"}
    want, got = flatten(state), flatten(loaded)
    assert sorted(want) == sorted(got)
    for key in want:
        expected = np.asarray(want[key])
        assert got[key].dtype == expected.dtype and got[key].shape == expected.shape, key
        assert got[key].tobytes() == expected.tobytes(), key
    assert loaded["step"].shape == () and int(loaded["step"]) == 1234
    (tmp_path / "run" / "plain").touch()  # the checkpoint gets a plain file's permissions
    assert path.stat().st_mode == (tmp_path / "run" / "plain").stat().st_mode


def test_layout_normalises_dtype_names():
    class FakeTorch:  # torch tensors print their dtype as "torch.float32"
        shape, dtype = (2, 3), "torch.float32"

    assert layout({"a": {"b": FakeTorch()}, "s": np.int64(3)}) == {
        "a/b": ((2, 3), "float32"),
        "s": ((), "int64"),
    }


def _files(folder):
    return sorted(p.name for p in folder.iterdir())


def test_non_finite_state_is_refused_and_the_old_file_kept(tmp_path, rng, tiny):
    path = save_checkpoint(tmp_path / "ckpt.safetensors", _state(rng), tiny)
    before = path.read_bytes()
    bad = _state(rng)
    bad["opt"]["mu"]["enc"]["b"][2] = np.nan
    with pytest.raises(CheckpointError, match="opt/mu/enc/b"):
        save_checkpoint(path, bad, tiny)
    assert path.read_bytes() == before
    assert _files(tmp_path) == ["ckpt.safetensors"]


def test_background_saver_writes_the_state_as_it_was_when_asked(tmp_path, rng, tiny, monkeypatch):
    import threading

    state = _state(rng)
    want = {k: np.array(v) for k, v in flatten(state).items()}
    path = tmp_path / "ckpt.safetensors"
    reused, write = threading.Event(), checkpoint.save_checkpoint

    def after_reuse(*args):  # the write starts only once the buffers were overwritten
        assert reused.wait(10)
        return write(*args)

    monkeypatch.setattr(checkpoint, "save_checkpoint", after_reuse)
    with BackgroundSaver() as saver:
        saver.save(path, state, tiny, {"step": 1234})
        for leaf in flatten(state).values():  # the next step reuses the buffers at once
            if isinstance(leaf, np.ndarray) and leaf.dtype.kind == "f":
                leaf[...] = 7.0
        reused.set()
    loaded, _, meta = load_checkpoint(path, tiny, layout(state))
    assert meta == {"step": 1234}
    for key, value in flatten(loaded).items():
        assert value.tobytes() == want[key].tobytes(), key


def test_background_saver_raises_a_refused_save_and_keeps_the_old_file(tmp_path, rng, tiny):
    path = save_checkpoint(tmp_path / "ckpt.safetensors", _state(rng), tiny)
    before = path.read_bytes()
    bad = _state(rng)
    bad["ema"]["x"][0, 0] = np.inf
    saver = BackgroundSaver()
    saver.save(path, bad, tiny)
    with pytest.raises(CheckpointError, match="ema/x"):  # at the next save or wait
        saver.save(path, _state(rng), tiny)
    saver.wait()  # the one after it was not started: nothing pending
    assert path.read_bytes() == before and _files(tmp_path) == ["ckpt.safetensors"]
    with BackgroundSaver() as saver:
        saver.save(path, bad, tiny)
        with pytest.raises(CheckpointError, match="ema/x"):
            saver.wait()


def test_background_saver_finishes_its_write_when_the_loop_fails(tmp_path, rng, tiny):
    state = _state(rng)
    path = tmp_path / "ckpt.safetensors"
    with pytest.raises(KeyError, match="the loop's own error"), BackgroundSaver() as saver:
        saver.save(path, state, tiny)
        raise KeyError("the loop's own error")
    loaded, _, _ = load_checkpoint(path, tiny, layout(state))
    assert int(loaded["step"]) == 1234 and _files(tmp_path) == ["ckpt.safetensors"]


def test_failed_rename_leaves_no_temp_file(tmp_path, rng, tiny, monkeypatch):
    path = save_checkpoint(tmp_path / "ckpt.safetensors", _state(rng), tiny)
    before = path.read_bytes()

    def broken_replace(src, dst):
        raise OSError(errno.EXDEV, "cross-device link")

    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(CheckpointError, match=r"cannot write checkpoint .*cross-device link"):
        save_checkpoint(path, _state(rng), tiny)
    assert path.read_bytes() == before
    assert _files(tmp_path) == ["ckpt.safetensors"]


def test_disk_full_is_a_checkpoint_error_and_the_old_file_is_kept(tmp_path, rng, tiny, monkeypatch):
    path = save_checkpoint(tmp_path / "ckpt.safetensors", _state(rng), tiny)
    before = path.read_bytes()

    def disk_full(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"\0" * 64)  # part of the file made it to disk
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(filename))

    monkeypatch.setattr(checkpoint, "save_file", disk_full)
    with pytest.raises(CheckpointError, match=r"No space left on device.*previous checkpoint") as e:
        save_checkpoint(path, _state(rng), tiny)
    assert "\n" not in str(e.value)
    assert path.read_bytes() == before
    assert _files(tmp_path) == ["ckpt.safetensors"]


def test_non_finite_weights_are_refused_on_load_naming_the_first(tmp_path, rng, tiny):
    path = save_checkpoint(tmp_path / "c.safetensors", _state(rng), tiny)
    with safe_open(str(path), framework="numpy") as f:
        metadata, flat = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - a safetensors handle is not iterable
    flat["params/enc/w"][1, 2] = np.inf
    flat["params/enc/b"][0] = np.nan
    save_file(flat, path, metadata=metadata)
    for load in (lambda: load_checkpoint(path), lambda: load_checkpoint(path, tiny)):
        with pytest.raises(CheckpointError, match="NaN or infinite values, first in params/enc/b;"):
            load()
    assert read_config(path) == tiny  # the header alone is still readable


def test_remove_stale_temps(tmp_path, rng, tiny):
    path = save_checkpoint(tmp_path / "ckpt.safetensors", _state(rng), tiny)
    stale = tmp_path / ".ckpt.safetensors.abcdef012345.tmp"
    stale.write_bytes(path.read_bytes())
    (tmp_path / "notes.tmp").write_text("not ours: not hidden")
    assert remove_stale_temps(tmp_path) == [stale]
    assert _files(tmp_path) == ["ckpt.safetensors", "notes.tmp"]


def test_model_mismatch_names_every_field(tmp_path, rng, tiny):
    path = save_checkpoint(tmp_path / "c.safetensors", _state(rng), tiny)
    other = tiny.replace(model={"enc_width": 128, "dec_depth": 3}, train={"lr": 0.5})
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(path, other)
    msg = str(e.value)
    assert "model.enc_width: checkpoint 64, expected 128" in msg
    assert "model.dec_depth: checkpoint 2, expected 3" in msg and "\n" not in msg
    assert "lr" not in msg  # train settings may change between runs
    # Only the train section differs: loads fine.
    load_checkpoint(path, tiny.replace(train={"lr": 0.5}))


def test_layout_mismatches_are_listed(tmp_path, rng, tiny):
    state = _state(rng)
    path = save_checkpoint(tmp_path / "c.safetensors", state, tiny)
    expected = layout(state)
    del expected["ema/x"]  # in the file, not expected
    expected["params/extra"] = ((5,), "float32")  # expected, not in the file
    expected["params/enc/w"] = ((4, 3), "float32")
    expected["opt/count"] = ((), "int64")
    for i in range(12):
        expected[f"params/more{i:02d}"] = ((1,), "float32")
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(path, tiny, expected)
    msg = str(e.value)
    assert "\n" not in msg  # the command line prints it as one line
    assert "13 missing key(s) [params/extra, params/more00," in msg and "... and 3 more]" in msg
    assert "1 unexpected key(s) [ema/x]" in msg
    assert "params/enc/w: checkpoint (3, 4), expected (4, 3)" in msg
    assert "opt/count: checkpoint int32, expected int64" in msg


def test_unreadable_files_raise_checkpoint_errors(tmp_path, rng, tiny):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "missing.safetensors")
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(rng.bytes(4096))
    with pytest.raises(CheckpointError, match="not a readable safetensors"):
        load_checkpoint(junk)
    with pytest.raises(CheckpointError, match="not a readable safetensors"):
        read_config(junk)
    good = save_checkpoint(tmp_path / "good.safetensors", _state(rng), tiny)
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(good.read_bytes()[:-40])
    with pytest.raises(CheckpointError, match="corrupt"):
        load_checkpoint(cut)


def test_foreign_safetensors_and_bad_config_are_rejected(tmp_path, rng):
    tensors = {"w": rng.standard_normal(3).astype(np.float32)}
    save_file(tensors, tmp_path / "plain.safetensors")
    with pytest.raises(CheckpointError, match="no format tag"):
        load_checkpoint(tmp_path / "plain.safetensors")
    save_file(tensors, tmp_path / "other.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match="'pt'"):
        read_config(tmp_path / "other.safetensors")
    save_file(
        tensors,
        tmp_path / "cfg.safetensors",
        metadata={"format": "maetok-checkpoint/1", "config": '{"model": {"patch_size": 5}}'},
    )
    with pytest.raises(CheckpointError, match=r"invalid config.*not divisible"):
        load_checkpoint(tmp_path / "cfg.safetensors")


def test_save_tree_is_the_general_writer(tmp_path, rng, tiny):
    tree = {
        "net": {"w": rng.standard_normal((2, 3)).astype(np.float32)},
        "stats": {"n": np.array(5, np.int32)},
    }
    path = save_tree(
        tmp_path / "t.safetensors", tree, '{"a": 1}', {"accuracy": 0.5, "note": "x"}, "some-model/1"
    )
    flat, config_json, meta = load_tree(path, "some-model/1")
    assert config_json == '{"a": 1}' and meta == {"accuracy": 0.5, "note": "x"}
    assert flat["net/w"].tobytes() == tree["net"]["w"].tobytes()
    assert int(flat["stats/n"]) == 5
    with pytest.raises(CheckpointError, match="is not a maetok checkpoint"):
        load_checkpoint(path)  # another format tag is not a tokenizer checkpoint
    # a tokenizer checkpoint is a tree like any other for load_tree
    save_checkpoint(tmp_path / "c.safetensors", tree, tiny, meta={"step": 3})
    _, config_json, meta = load_tree(tmp_path / "c.safetensors")
    assert meta["step"] == 3 and json.loads(config_json)["model"] == tiny.to_dict()["model"]
    for reserved in ("meta_json", "format", "config"):
        with pytest.raises(ValueError, match="reserved"):
            save_tree(tmp_path / "u.safetensors", tree, "{}", {reserved: "[]"})
