"""Checkpoints: one safetensors file holding the whole training state and its config.

The state is a nested dict of arrays (parameters, optimiser moments, EMA, step counter),
stored flat under ``/``-joined keys (docs/design.md §2), so a checkpoint written by one
backend loads unchanged in the other. The metadata carries ``format``, the full config as
JSON, and any caller entries (e.g. the step or wall time).

Saving is atomic: the file is written next to its destination, flushed to disk and then
renamed over it, so a crash or a refused save never leaves a half-written or NaN
checkpoint where a good one was.
"""

from __future__ import annotations

import hashlib
import json
import os
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file

from maetok.config import Config, ModelConfig, compute_only
from maetok.diffusion_config import DiffusionConfig
from maetok.errors import CheckpointError, ConfigError
from maetok.tree import flatten, map_tree, unflatten

FORMAT = "maetok-checkpoint/1"
DIFFUSION_FORMAT = "maetok-diffusion/1"  # a latent diffusion model (maetok diffusion train)
_RESERVED = ("format", "config", "meta_json")  # metadata keys the format itself uses
_LIST = 10  # how many offending keys a mismatch message names per kind
_TMP = ".tmp"  # suffix of the hidden file a save writes before renaming it into place

Layout = dict[str, tuple[tuple[int, ...], str]]


def write_text(path, text: str) -> None:
    """Write ``text`` to ``path`` through a hidden file renamed into place: a reader sees the
    old file or the new one, never half of one."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}{_TMP}")
    tmp.write_text(text)
    os.replace(tmp, path)


def _dtype_name(dtype) -> str:
    """``float32`` for numpy, JAX and torch dtypes alike (torch prints ``torch.float32``)."""
    return str(dtype).removeprefix("torch.")


def layout(state: dict) -> Layout:
    """Flat key → (shape, dtype name) of a state tree whose leaves have .shape and .dtype.

    Build the ``expected`` argument of ``load_checkpoint`` from a freshly initialised state.
    """
    out = {}
    for key, leaf in flatten(state).items():
        if not hasattr(leaf, "shape"):
            leaf = np.asarray(leaf)
        out[key] = (tuple(int(d) for d in leaf.shape), _dtype_name(leaf.dtype))
    return out


def save_tree(
    path, tree: dict, config_json: str, meta: dict | None = None, fmt: str = FORMAT
) -> Path:
    """Atomically write the nested dict ``tree`` with metadata ``format``, ``config`` and ``meta``.

    The one writer of every maetok file (tokenizer, diffusion and classifier checkpoints).
    ``meta`` values that are not strings are stored as JSON and decoded again on load.
    Refuses (CheckpointError) to save NaN or infinite values; on any failure the file
    already at ``path``, if any, is left as it was.
    """
    path = Path(path)
    tensors = {}
    for key, leaf in flatten(tree).items():
        arr = np.asarray(leaf)
        if not arr.flags.c_contiguous:  # (ascontiguousarray alone would turn 0-d into (1,))
            arr = np.ascontiguousarray(arr)
        if arr.dtype.kind in "fc" and not np.isfinite(arr).all():
            raise CheckpointError(
                f"refusing to save {path}: {key} holds NaN or infinite values "
                "(training diverged); the previous checkpoint is kept"
            )
        tensors[key] = arr
    metadata = {"format": fmt, "config": config_json}
    encoded = []
    for key, value in (meta or {}).items():
        if key in _RESERVED:
            raise ValueError(f"checkpoint metadata key {key!r} is reserved")
        if not isinstance(value, str):
            value = json.dumps(value)
            encoded.append(key)
        metadata[key] = value
    metadata["meta_json"] = json.dumps(encoded)

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.{uuid.uuid4().hex[:12]}{_TMP}"  # same folder: atomic rename
    try:
        with open(tmp, "xb"):
            pass
        mode = tmp.stat().st_mode & 0o777  # a plain file's mode here; save_file would use 0600
        save_file(tensors, tmp, metadata=metadata)
        os.chmod(tmp, mode)
        fd = os.open(tmp, os.O_RDWR)
        try:
            os.fsync(fd)  # the data must be on disk before the rename makes it visible
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        if isinstance(e, (OSError, SafetensorError)):  # disk full, permissions, quota
            reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
            raise CheckpointError(
                f"cannot write checkpoint {path}: {reason}; the previous "
                "checkpoint, if any, is kept"
            ) from e
        raise
    _fsync_dir(path.parent)
    return path


def save_checkpoint(path, state: dict, cfg: Config, meta: dict | None = None) -> Path:
    """Write ``state`` (nested dict of numpy arrays; scalars as 0-d arrays) to ``path``.

    ``meta`` values that are not strings are stored as JSON and decoded again on load.
    Refuses (CheckpointError) to save NaN or infinite values; on any failure the file
    already at ``path``, if any, is left as it was.
    """
    return save_tree(path, state, cfg.to_json(), meta)


class BackgroundSaver:
    """Writes checkpoints on one thread, one at a time, while training goes on.

    ``save`` first waits for the write before it (raising that write's error, e.g. a refused
    NaN state), then copies the tree's arrays, so the caller may reuse its buffers at once
    (donated JAX buffers, torch tensors updated in place, both shared with numpy on the CPU),
    and starts the write. ``wait`` returns once the last write is on disk, raising its error.
    As a context manager it waits on exit; if the block is already failing, the write still
    completes (or leaves the previous file as it was) and the block's own error is the one
    raised. The writing thread holds the interpreter lock only in short stretches (hashing,
    serialising and writing release it), so the training loop keeps the device fed.
    """

    def __init__(self):
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="maetok-save")
        self._pending = None

    def save(
        self, path, tree: dict, cfg: Config | DiffusionConfig, meta: dict | None = None, write=None
    ) -> None:
        """Start writing ``tree`` to ``path`` with ``write(path, tree, cfg, meta)``:
        ``save_checkpoint`` (a tokenizer's state) unless given (``save_diffusion``)."""
        self.wait()
        snapshot = map_tree(np.array, tree)  # copies
        self._pending = self._pool.submit(write or save_checkpoint, path, snapshot, cfg, meta)

    def wait(self) -> None:
        pending, self._pending = self._pending, None
        if pending is not None:
            pending.result()

    def __enter__(self) -> BackgroundSaver:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            if exc_type is None:
                self.wait()
            elif self._pending is not None:
                self._pending.exception()  # finish the write; the block's error wins
        finally:
            self._pool.shutdown(wait=True)


def remove_stale_temps(folder) -> list[Path]:
    """Delete the temporary files of saves that were killed before their rename.

    Only call it while no save into ``folder`` is running (the trainer holds the folder's
    lock). Returns the paths removed.
    """
    stale = sorted(Path(folder).glob(f".*{_TMP}"))
    for tmp in stale:
        tmp.unlink(missing_ok=True)
    return stale


def _fsync_dir(folder: Path) -> None:
    """Persist the rename itself; not possible (nor needed) on every platform."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _open(path: Path):
    """A safetensors handle on ``path``, for use in a ``with`` block."""
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        return safe_open(str(path), framework="numpy")
    except Exception as e:  # safetensors raises several unrelated types
        raise CheckpointError(
            f"{path} is not a readable safetensors checkpoint ({e}); it may "
            "be truncated or corrupt: use an earlier checkpoint"
        ) from e


def _metadata(path: Path, handle, fmt: str = FORMAT) -> dict[str, str]:
    metadata = handle.metadata() or {}
    if metadata.get("format") != fmt:
        found = repr(metadata["format"]) if "format" in metadata else "no format tag"
        raise CheckpointError(
            f"{path} is not a maetok checkpoint: expected format {fmt!r}, found {found}"
        )
    return metadata


def _tensors(path: Path, handle) -> dict:
    try:
        return {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118 - a safetensors handle is not iterable
    except Exception as e:  # safetensors raises several unrelated types
        raise CheckpointError(
            f"cannot read the tensors of {path} ({e}); it may be "
            "truncated or corrupt: use an earlier checkpoint"
        ) from e


def _meta(path: Path, metadata: dict) -> dict:
    """The caller entries of the metadata, JSON-encoded ones decoded."""
    try:
        encoded = set(json.loads(metadata.get("meta_json", "[]")))
        return {
            k: json.loads(v) if k in encoded else v
            for k, v in metadata.items()
            if k not in _RESERVED
        }
    except json.JSONDecodeError as e:
        raise CheckpointError(f"checkpoint {path} has unreadable metadata: {e}") from e


def load_tree(path, fmt: str = FORMAT) -> tuple[dict, str, dict]:
    """Read any file ``save_tree`` wrote with format ``fmt``: (flat tensors, config JSON, meta)."""
    path = Path(path)
    with _open(path) as handle:
        metadata = _metadata(path, handle, fmt)
        flat = _tensors(path, handle)
    if "config" not in metadata:
        raise CheckpointError(f"checkpoint {path} has no config")
    return flat, metadata["config"], _meta(path, metadata)


def _config_of(path: Path, metadata: dict) -> Config:
    try:
        return Config.from_json(metadata["config"])
    except (KeyError, ConfigError) as e:
        raise CheckpointError(f"checkpoint {path} has a missing or invalid config: {e}") from e


def read_config(path) -> Config:
    """The config stored in a checkpoint, read from its metadata without loading tensors."""
    return read_header(path)[0]


def read_header(path) -> tuple[Config, dict]:
    """``(config, meta)`` of a checkpoint, from its metadata alone (no tensors are read)."""
    path = Path(path)
    with _open(path) as handle:
        metadata = _metadata(path, handle)
        return _config_of(path, metadata), _meta(path, metadata)


@dataclass(frozen=True)
class Checkpoint:
    """A checkpoint file read once: its tensors (flat, ``/``-joined keys), config and meta."""

    path: Path
    flat: dict
    cfg: Config
    meta: dict

    def check(self, cfg: Config | None = None, expected: Layout | None = None) -> dict:
        """The nested state, checked: with ``cfg``, the file's model section must equal
        ``cfg.model``; with ``expected`` (see ``layout``), keys, shapes and dtypes must match
        exactly; NaN or infinite values are refused. Each problem raises CheckpointError
        with every difference listed."""
        if cfg is not None:
            check_model(self.path, self.cfg, cfg)
        if expected is not None:
            _check_layout(self.path, layout(self.flat), expected)
        for key in sorted(self.flat):  # a NaN weight would only show up later, as a NaN loss
            if self.flat[key].dtype.kind in "fc" and not np.isfinite(self.flat[key]).all():
                raise CheckpointError(
                    f"checkpoint {self.path} holds NaN or infinite values, first in "
                    f"{key}; it cannot be used: take an earlier checkpoint"
                )
        return unflatten(self.flat)


def read_checkpoint(path) -> Checkpoint:
    """Open a checkpoint once and read everything in it (nothing checked but its format)."""
    path = Path(path)
    with _open(path) as handle:
        metadata = _metadata(path, handle)
        file_cfg = _config_of(path, metadata)
        flat = _tensors(path, handle)
    return Checkpoint(path, flat, file_cfg, _meta(path, metadata))


def load_checkpoint(
    path, cfg: Config | None = None, expected: Layout | None = None
) -> tuple[dict, Config, dict]:
    """Read a checkpoint; returns ``(state, cfg_in_file, meta)``, checked as
    ``Checkpoint.check(cfg, expected)`` does."""
    checkpoint = read_checkpoint(path)
    return checkpoint.check(cfg, expected), checkpoint.cfg, checkpoint.meta


def _fmt(value) -> str:
    return repr(value) if isinstance(value, str) else str(value)


def check_model(path: Path, found: Config, want: Config) -> None:
    """CheckpointError listing every model field (but compute-only ones) that differs."""
    a, b = found.to_dict()["model"], want.to_dict()["model"]
    diffs = [
        f"model.{k}: checkpoint {_fmt(a[k])}, expected {_fmt(b[k])}"
        for k in sorted(a)
        if a[k] != b[k] and k not in compute_only(ModelConfig)
    ]
    if diffs:  # one line: the command line prints user errors as a single line
        raise CheckpointError(
            f"checkpoint {path} was saved with a different model config "
            f"({'; '.join(diffs)}); use a matching checkpoint, or the model "
            "options it was saved with"
        )


def _listing(title: str, items: list[str], sep: str) -> str:
    more = f"{sep}... and {len(items) - _LIST} more" if len(items) > _LIST else ""
    return f"{len(items)} {title} [{sep.join(items[:_LIST])}{more}]"


def _check_layout(path: Path, got: Layout, expected: Layout) -> None:
    missing = sorted(set(expected) - set(got))
    unexpected = sorted(set(got) - set(expected))
    common = sorted(set(got) & set(expected))
    shapes = [
        f"{k}: checkpoint {got[k][0]}, expected {tuple(expected[k][0])}"
        for k in common
        if got[k][0] != tuple(expected[k][0])
    ]
    dtypes = [
        f"{k}: checkpoint {got[k][1]}, expected {_dtype_name(expected[k][1])}"
        for k in common
        if got[k][1] != _dtype_name(expected[k][1])
    ]
    parts = [
        _listing(title, items, sep)
        for title, items, sep in (
            ("missing key(s)", missing, ", "),
            ("unexpected key(s)", unexpected, ", "),
            ("shape mismatch(es)", shapes, "; "),
            ("dtype mismatch(es)", dtypes, "; "),
        )
        if items
    ]
    if parts:
        raise CheckpointError(
            f"checkpoint {path} does not match the state this config and "
            f"backend expect: {'; '.join(parts)}"
        )


# ----------------------------------------------------------------- diffusion checkpoints


def file_sha256(path) -> str:
    """Hex sha256 of a file's bytes (ties a diffusion checkpoint to its tokenizer)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def tensor_digest(path, fmt: str = FORMAT) -> str:
    """Hex sha256 of a checkpoint's tensors (names, dtypes, shapes and bytes, in name order),
    blind to its metadata: two runs that computed the same state give the same digest even
    when they wrote to different folders."""
    flat, _, _ = load_tree(path, fmt)
    digest = hashlib.sha256()
    for key in sorted(flat):
        array = np.ascontiguousarray(flat[key])
        digest.update(f"{key}\0{array.dtype.str}\0{array.shape}\n".encode())
        digest.update(array.tobytes())
    return digest.hexdigest()


def save_diffusion(path, tree: dict, cfg: DiffusionConfig, meta: dict | None = None) -> Path:
    """Write a diffusion model's tree (state and latent statistics) with its config and meta."""
    return save_tree(path, tree, cfg.to_json(), meta, DIFFUSION_FORMAT)


def load_diffusion(path, expected=None) -> tuple[dict, DiffusionConfig, dict]:
    """Read a diffusion checkpoint: (nested tree, config, meta).

    ``expected``, a Layout or a function from the stored config to one, is checked exactly.
    """
    path = Path(path)
    flat, config_json, meta = load_tree(path, DIFFUSION_FORMAT)
    try:
        cfg = DiffusionConfig.from_json(config_json)
    except ConfigError as e:
        raise CheckpointError(f"checkpoint {path} has an invalid diffusion config: {e}") from e
    if callable(expected):
        expected = expected(cfg)
    if expected is not None:
        _check_layout(path, layout(flat), expected)
    return unflatten(flat), cfg, meta
