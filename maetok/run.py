"""A run folder: its lock, the identity of the run it holds and the history of changes.

A run is its config, its data (an image folder with a fingerprint of its file list, or the
built-in synthetic images) and its backend. All three are stored in every checkpoint: the
config as the checkpoint's config, the others as the metadata entries ``data`` and
``backend``, next to ``history``, the list of changes made on purpose when it was resumed.
``resume`` rebuilds exactly that run and refuses, with one line naming it, any input that
differs from it, unless the user asked for that change (``--set``, ``--lr``,
``--change data``); such a change is recorded in ``history`` from the next checkpoint on.

``claim`` holds a run folder exclusively: a lock file with the owner's PID and host, which a
second run into the same folder respects, and which is taken over when its owner is gone.
When one run spans several processes, only the first claims and writes the folder
(``is_writer_process``).
"""

from __future__ import annotations

import json
import os
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from maetok import checkpoint as ckpt
from maetok.config import Config, ModelConfig, compute_only
from maetok.errors import CheckpointError, ConfigError, DataError, MAETokError

CHECKPOINT_NAME = "checkpoint.safetensors"
LOCK_NAME = "maetok.lock"
_UNREADABLE_LOCK_S = 10.0  # a lock file still empty after this long was left by a crash
_held: set[Path] = set()  # run folders this process holds: claim is re-entrant


# ---------------------------------------------------------------------------------- lock
@contextmanager
def claim(out) -> Iterator[Path]:
    """Hold the run folder ``out`` (created if needed) for the duration of the block.

    Raises MAETokError naming the owner when another live process holds it. Inside, no
    other run writes to ``out``, so the temporary files of saves that were killed halfway
    are removed here. A folder this call created and left empty is removed again.
    """
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} is a file, not a folder; choose a folder")
    key = out.resolve()
    if key in _held:
        yield out
        return
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    lock = out / LOCK_NAME
    _acquire(lock)
    _held.add(key)
    try:
        ckpt.remove_stale_temps(out)
        yield out
    finally:
        _held.discard(key)
        lock.unlink(missing_ok=True)
        if created and not any(out.iterdir()):
            out.rmdir()


def is_writer_process() -> bool:
    """False in every process but the first of a launch of several (``torchrun``'s ``RANK``
    of ``WORLD_SIZE``, or ``JAX_PROCESS_ID`` of ``JAX_NUM_PROCESSES``): those train beside
    it but leave the run folder to it. The Backends agree (``Backend.is_writer``)."""
    for rank, count in (("RANK", "WORLD_SIZE"), ("JAX_PROCESS_ID", "JAX_NUM_PROCESSES")):
        if int(os.environ.get(count, "1")) > 1 and int(os.environ.get(rank, "0")) != 0:
            return False
    return True


def _owner() -> dict:
    return {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "since": time.strftime("%Y-%m-%d %H:%M:%S"),
    }


def _acquire(lock: Path) -> None:
    for _ in range(3):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            owner = _read_lock(lock)
            if owner is not None and not _is_stale(lock, owner):
                raise MAETokError(_in_use(lock, owner)) from None
            lock.unlink(missing_ok=True)  # its owner is gone: take it over
            continue
        with os.fdopen(fd, "w") as f:
            json.dump(_owner(), f)
        return
    raise MAETokError(f"cannot take the lock {lock}: other runs keep racing for it")


def _read_lock(lock: Path) -> dict | None:
    """The owner recorded in ``lock``; None when the lock is gone or was left unwritten."""
    try:
        owner = json.loads(lock.read_text())
        return owner if isinstance(owner, dict) and "pid" in owner else None
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        try:  # being written right now, or left empty by a crash
            fresh = time.time() - lock.stat().st_mtime < _UNREADABLE_LOCK_S
        except OSError:
            return None
        return {"pid": "?", "host": "?", "since": "just now"} if fresh else None


def _is_stale(lock: Path, owner: dict) -> bool:
    """True when the owner is a process of this host that no longer runs."""
    if owner.get("host") != socket.gethostname() or not isinstance(owner.get("pid"), int):
        return False  # another machine's process cannot be checked from here
    if owner["pid"] == os.getpid():
        return lock.parent.resolve() not in _held  # a previous life of this PID
    try:
        os.kill(owner["pid"], 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # alive, owned by another user
        return False
    return False


def _in_use(lock: Path, owner: dict) -> str:
    where = f"process {owner.get('pid')} on {owner.get('host')}, since {owner.get('since')}"
    hint = (
        "wait for it to finish or choose another --out"
        if owner.get("host") in (socket.gethostname(), "?")
        else f"wait for it to finish or choose another --out; if nothing runs there any more, "
        f"delete {lock}"
    )
    return f"{lock.parent} is in use by another maetok run ({where}): {hint}"


# ------------------------------------------------------------------------------ identity
def data_identity(dataset) -> dict:
    """What a run trains on, as stored in its checkpoints (JSON-ready)."""
    from maetok.data import ImageFolder
    from maetok.synthetic import SyntheticImages

    if isinstance(dataset, ImageFolder):
        return {
            "kind": "folder",
            "folder": str(dataset.root.resolve()),
            "images": len(dataset),
            "fingerprint": dataset.fingerprint,
        }
    if isinstance(dataset, SyntheticImages):
        return {
            "kind": "synthetic",
            "size": dataset.size,
            "count": dataset.count,
            "seed": dataset.seed,
        }
    return {"kind": type(dataset).__name__, "images": len(dataset)}


def describe_data(ident: dict) -> str:
    if ident.get("kind") == "folder":
        return (
            f"folder {ident['folder']} ({ident['images']} images, fingerprint "
            f"{ident['fingerprint']})"
        )
    if ident.get("kind") == "synthetic":
        return f"the synthetic images (seed {ident['seed']})"
    return f"a {ident.get('kind')} dataset of {ident.get('images')} images"


def open_dataset(data: str | None, cfg: Config, skip_broken: bool = False, progress: bool = True):
    """``data`` (an image folder) or, for None, the built-in synthetic images."""
    from maetok.data import ImageFolder
    from maetok.synthetic import SyntheticImages

    if data is None:
        return SyntheticImages(cfg.model.image_size, seed=cfg.train.seed)
    return ImageFolder(data, cfg.model.image_size, skip_broken=skip_broken, progress=progress)


def _dataset_of(ident: dict, cfg: Config, skip_broken: bool, progress: bool):
    """Reopen the data a run's checkpoint names."""
    from maetok.synthetic import SyntheticImages

    if ident["kind"] == "synthetic":
        return SyntheticImages(ident["size"], count=ident["count"], seed=ident["seed"])
    if ident["kind"] == "folder":
        if not Path(ident["folder"]).is_dir():
            raise DataError(
                f"--resume: the run's data folder {ident['folder']} is gone; pass "
                "--data FOLDER --change data to continue on another folder"
            )
        return open_dataset(ident["folder"], cfg, skip_broken, progress)
    raise DataError(
        f"--resume: the run was trained on {describe_data(ident)}, which the "
        "command line cannot reopen; pass --data FOLDER --change data"
    )


def config_diff(old: Config, new: Config) -> dict[str, list]:
    """``{"section.field": [old, new]}`` for every field that differs."""
    a, b = old.to_dict(), new.to_dict()
    return {
        f"{part}.{k}": [a[part][k], b[part][k]]
        for part in a
        for k in a[part]
        if a[part][k] != b[part][k]
    }


def _frozen(field: str) -> bool:
    """Fields a resumed run cannot change: its weights or its train state are shaped by them."""
    part, _, name = field.partition(".")
    return field == "train.stage" or (part == "model" and name not in compute_only(ModelConfig))


def describe_diff(diff: dict[str, list], limit: int = 4) -> str:
    """A ``config_diff`` on one line: its first ``limit`` fields as ``field old → new``."""
    items = [f"{k} {v[0]!r} → {v[1]!r}" for k, v in diff.items()]
    more = f" and {len(items) - limit} more" if len(items) > limit else ""
    return ", ".join(items[:limit]) + more


@dataclass
class Resumed:
    """What ``resume`` rebuilt: the run's config, data and backend with the changes asked
    for, the step of its checkpoint, ``changes`` (``{"what": [old, new]}``) to record, and
    the checkpoint itself, read once (``maetok.trainer.train(resume=...)`` takes it)."""

    cfg: Config
    dataset: object
    backend: str
    step: int | None
    changes: dict[str, list]
    checkpoint: ckpt.Checkpoint


def resume(
    out,
    changes: dict,
    *,
    base: Config | None = None,
    base_flag: str = "",
    data: str | None = None,
    backend: str | None = None,
    allow: tuple[str, ...] = (),
    skip_broken: bool = False,
    progress: bool = True,
) -> Resumed:
    """Rebuild the run in ``out`` from its checkpoint, with only the changes asked for.

    ``changes`` are config overrides by section (``{"train": {"lr": 1e-4}}``). ``base`` is a
    whole config the user passed as well (``base_flag`` names how, e.g. ``--preset tiny``):
    it must equal the run's. ``data``/``backend``, when given, must match the run's unless
    ``allow`` names them (``"data"``, ``"backend"``).
    """
    path = Path(out) / CHECKPOINT_NAME
    if not path.exists():
        raise CheckpointError(f"--resume: no checkpoint at {path}; train without --resume first")
    checkpoint = ckpt.read_checkpoint(path)  # the one read: the trainer takes it from here
    stored, meta = checkpoint.cfg, checkpoint.meta
    if base is not None and config_diff(stored, base):
        raise ConfigError(
            f"--resume: {base_flag} differs from the run's config "
            f"({describe_diff(config_diff(stored, base))}); a resumed run keeps its "
            f"config: drop {base_flag}, and change fields with --set "
            "SECTION.FIELD=VALUE"
        )
    cfg = stored.replace(**{k: v for k, v in changes.items() if v})
    changed = config_diff(stored, cfg)
    frozen = {k: v for k, v in changed.items() if _frozen(k)}
    if frozen:
        raise ConfigError(
            f"--resume cannot change {describe_diff(frozen)}: the checkpoint's state "
            "is shaped by it; start a new run (another --out, or --overwrite)"
        )

    run_backend = meta.get("backend")
    chosen = backend or run_backend or "jax"
    if run_backend and chosen != run_backend:
        if "backend" not in allow:
            raise ConfigError(
                f"--resume: this run was trained with --backend {run_backend}; "
                f"--backend {chosen} would continue it with other numerics: drop "
                "--backend, or pass --change backend to switch on purpose"
            )
        changed["backend"] = [run_backend, chosen]

    run_data = meta.get("data")
    if (
        data is not None
        and run_data is not None
        and "data" not in allow
        and str(Path(data).resolve()) != run_data.get("folder")
    ):
        raise DataError(
            f"--resume: the run was trained on {describe_data(run_data)}, not on "
            f"{data}; resume on the run's own data (drop --data), or pass --change "
            "data to continue on this data on purpose"
        )
    if data is None and run_data is not None:
        dataset = _dataset_of(run_data, cfg, skip_broken, progress)
    else:
        dataset = open_dataset(data, cfg, skip_broken, progress)
    now = data_identity(dataset)
    if run_data is not None and now != run_data:
        if "data" not in allow:
            same = now.get("folder") is not None and now.get("folder") == run_data.get("folder")
            what = (
                f"the data folder {now['folder']} has changed since the run's checkpoint "
                f"(then {run_data['images']} images, fingerprint {run_data['fingerprint']}; "
                f"now {now['images']}, {now['fingerprint']})"
                if same
                else f"the run was trained on {describe_data(run_data)}, not on "
                f"{describe_data(now)}"
            )
            raise DataError(
                f"--resume: {what}; resume on the run's own data (drop --data), or "
                "pass --change data to continue on this data on purpose"
            )
        changed["data"] = [describe_data(run_data), describe_data(now)]
    step = meta.get("step")
    return Resumed(
        cfg, dataset, chosen, step if isinstance(step, int) else None, changed, checkpoint
    )


def history_entry(step: int, changes: dict[str, list]) -> dict:
    """One row of a run's ``history``: what changed when it was resumed at ``step``."""
    return {"step": int(step), "time": time.strftime("%Y-%m-%d %H:%M:%S"), "changes": changes}


def describe_changes(changes: dict[str, list]) -> str:
    return describe_diff(changes, limit=len(changes))
