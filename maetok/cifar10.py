"""CIFAR-10 as arrays: the two archives unpacked once into a cache, decoded to ``.npz``.

The source folder holds ``train_jpg.tar.gz`` (``train/<class>/NNNN.jpg``, 50 000 JPEGs)
and ``test_png.tar.gz`` (``test_images/NNNNN.png``, 10 000 PNGs, and ``metadata.json``
with the label of each test image in the official order). ``prepare`` turns them into::

    <cache>/train/<class>/*.jpg      the extracted training images (an ImageFolder for
                                     ``maetok train --data <cache>/train``)
    <cache>/test/test_images/*.png   the extracted test archive, with its metadata.json
    <cache>/train.npz, test.npz      images uint8 (N, 32, 32, 3), labels int32 (N,)

Each step is atomic (extract or write beside the target, then rename), so an interrupted
``prepare`` leaves nothing half-made behind, and a finished one is not repeated.
"""

from __future__ import annotations

import json
import os
import shutil
import tarfile
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from maetok.errors import DataError

CLASSES: tuple[str, ...] = (
    "airplane",
    "automobile",
    "bird",
    "cat",
    "deer",
    "dog",
    "frog",
    "horse",
    "ship",
    "truck",
)
SIZE = 32
TRAIN_ARCHIVE, TEST_ARCHIVE = "train_jpg.tar.gz", "test_png.tar.gz"
SPLITS = ("train", "test")


def default_cache() -> Path:
    """``$MAETOK_CACHE/cifar10`` if the variable is set, else ``~/.cache/maetok/cifar10``."""
    root = os.environ.get("MAETOK_CACHE")
    return (Path(root) if root else Path.home() / ".cache" / "maetok") / "cifar10"


def _extract(archive: Path, cache: Path, member: str, target: Path) -> None:
    """Unpack ``archive`` beside ``target`` and rename its ``member`` folder (or all) there."""
    tmp = cache / f".extract-{target.name}-{uuid.uuid4().hex[:12]}"
    try:
        try:
            with tarfile.open(archive, "r:gz") as tar:
                tar.extractall(tmp, filter="data")  # "data": no absolute paths, links out, devices
        except (tarfile.TarError, OSError, EOFError) as e:
            raise DataError(f"cannot unpack {archive}: {e}; download the archive again") from e
        src = tmp / member if member else tmp
        if not src.is_dir():
            raise DataError(f"{archive} has no {member}/ folder; is it the CIFAR-10 archive?")
        os.replace(src, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _decode(path: Path) -> np.ndarray:
    try:
        with Image.open(path) as im:
            image = np.asarray(im.convert("RGB"), np.uint8)
    except Exception as e:  # any decoder failure means this file cannot be used
        raise DataError(f"cannot decode CIFAR-10 image {path}: {e}") from e
    if image.shape != (SIZE, SIZE, 3):
        raise DataError(
            f"CIFAR-10 image {path} is {image.shape[1]}×{image.shape[0]}, "
            f"expected {SIZE}×{SIZE}; is the archive the CIFAR-10 one?"
        )
    return image


def _decode_all(paths: list[Path], what: str) -> np.ndarray:
    """(N, 32, 32, 3) uint8, decoded on a thread pool (Pillow releases the GIL)."""
    out = np.empty((len(paths), SIZE, SIZE, 3), np.uint8)
    with ThreadPoolExecutor(max_workers=min(16, os.cpu_count() or 1)) as pool:
        for i, image in enumerate(
            tqdm(
                pool.map(_decode, paths, chunksize=256),
                total=len(paths),
                desc=f"decoding CIFAR-10 {what}",
                unit="img",
                leave=False,
            )
        ):
            out[i] = image
    return out


def _train_listing(folder: Path) -> tuple[list[Path], np.ndarray]:
    """Every image under ``train/<class>/``, sorted by path, with its class index."""
    unknown = sorted(p.name for p in folder.iterdir() if p.is_dir() and p.name not in CLASSES)
    if unknown:
        raise DataError(
            f"{folder} has class folder(s) {unknown} that are not CIFAR-10 classes "
            f"({', '.join(CLASSES)})"
        )
    paths = sorted(p for p in folder.glob("*/*") if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
    if not paths:
        raise DataError(f"no images in {folder}/<class>/; is the archive the CIFAR-10 one?")
    labels = np.array([CLASSES.index(p.parent.name) for p in paths], np.int32)
    return paths, labels


def _test_listing(folder: Path) -> tuple[list[Path], np.ndarray]:
    """The test images in the order of ``metadata.json``, with their class indices."""
    meta_path = folder / "metadata.json"
    try:
        meta = json.loads(meta_path.read_text())
        classes, entries = tuple(meta["classes"]), meta["images"]
        paths = [folder / e["image_path"] for e in entries]
        labels = np.array([int(e["label_id"]) for e in entries], np.int32)
        names = [e["class_name"] for e in entries]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise DataError(f"cannot read the CIFAR-10 test labels {meta_path}: {e!r}") from e
    if classes != CLASSES:
        raise DataError(f"{meta_path} lists classes {list(classes)}, expected {list(CLASSES)}")
    bad = [
        i
        for i, (y, n) in enumerate(zip(labels, names))
        if not 0 <= y < len(CLASSES) or CLASSES[y] != n
    ]
    if bad:
        raise DataError(f"{meta_path}: label_id and class_name disagree for image(s) {bad[:5]}")
    return paths, labels


def _save_npz(path: Path, images: np.ndarray, labels: np.ndarray) -> None:
    tmp = path.parent / f".{path.stem}.{uuid.uuid4().hex[:12]}.npz"
    try:
        np.savez(tmp, images=images, labels=labels)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def prepare(source: str | Path, cache: str | Path | None = None) -> Path:
    """Unpack and decode the two archives in ``source`` into ``cache``; returns the cache.

    Work already done (an extracted folder, a written ``.npz``) is not repeated, so a
    second call returns at once.
    """
    source = Path(source)
    cache = Path(cache) if cache is not None else default_cache()
    if all((cache / f"{s}.npz").is_file() for s in SPLITS) and (cache / "train").is_dir():
        return cache
    if not source.is_dir():
        raise DataError(
            f"CIFAR-10 folder {source} does not exist (or is not a folder); it "
            f"should hold {TRAIN_ARCHIVE} and {TEST_ARCHIVE}"
        )
    for name in (TRAIN_ARCHIVE, TEST_ARCHIVE):
        if not (source / name).is_file():
            raise DataError(f"CIFAR-10 folder {source} has no {name}")
    cache.mkdir(parents=True, exist_ok=True)
    if not (cache / "train").is_dir():
        _extract(source / TRAIN_ARCHIVE, cache, "train", cache / "train")
    if not (cache / "test").is_dir():
        _extract(source / TEST_ARCHIVE, cache, "", cache / "test")
    for split, listing in (("train", _train_listing), ("test", _test_listing)):
        out = cache / f"{split}.npz"
        if not out.is_file():
            paths, labels = listing(cache / split)
            _save_npz(out, _decode_all(paths, split), labels)
    return cache


def load_split(
    split: str, source: str | Path | None = None, cache: str | Path | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """``(images, labels)`` of ``split`` ("train" or "test"): uint8 (N, 32, 32, 3), int32 (N,).

    Reads the cache, preparing it first from ``source`` when it is not there yet.
    """
    if split not in SPLITS:
        raise DataError(f"CIFAR-10 split must be one of {SPLITS}, got {split!r}")
    cache = Path(cache) if cache is not None else default_cache()
    path = cache / f"{split}.npz"
    if not path.is_file():
        if source is None:
            raise DataError(
                f"no prepared CIFAR-10 in {cache}; pass the CIFAR-10 folder (the one "
                f"holding {TRAIN_ARCHIVE} and {TEST_ARCHIVE}) to prepare it"
            )
        prepare(source, cache)
    try:
        with np.load(path) as data:
            images, labels = data["images"], data["labels"]
    except (OSError, ValueError, KeyError) as e:
        raise DataError(f"cannot read {path} ({e}); delete it to prepare it again") from e
    if (
        images.dtype != np.uint8
        or images.shape[1:] != (SIZE, SIZE, 3)
        or labels.shape != (len(images),)
    ):
        raise DataError(
            f"{path} holds images {images.dtype}{images.shape} and labels "
            f"{labels.shape}; delete it to prepare it again"
        )
    return images, labels.astype(np.int32)
