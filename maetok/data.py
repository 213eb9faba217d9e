"""The image pipeline: datasets, reproducible batches with crops and masks, prefetching.

Everything random here is a pure function of ``(cfg.train.seed, step)`` (docs/design.md §6): which
images a step sees, where they are cropped, whether they are flipped and which tokens are
masked. A resumed run therefore sees exactly the batches it would have seen, and the JAX
and torch backends can be fed the same numbers.

Images leave this module channel-last, ``(B, H, W, C)`` float32 in [-1, 1] (docs/design.md §2).
"""

from __future__ import annotations

import hashlib
import os
import threading
import warnings
from collections import Counter, deque
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from maetok.config import Config
from maetok.errors import ConfigError, DataError
from maetok.masks import STREAM_AUGMENT, STREAM_DATA, mask_for_step, step_rng

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")


def from_uint8(images: np.ndarray) -> np.ndarray:
    """uint8 pixels in [0, 255] → float32 in [-1, 1], any shape."""
    return np.asarray(images, np.float32) / 127.5 - 1.0


def to_uint8(images) -> np.ndarray:
    """float in [-1, 1] (anything ``np.asarray`` accepts) → uint8, clipped and rounded."""
    x = (np.asarray(images, np.float32) + 1.0) * 127.5
    return np.clip(np.rint(x), 0, 255).astype(np.uint8)


class ImageFolder:
    """Every .jpg/.jpeg/.png under ``root`` (recursive, through links to folders, sorted), each
    at least ``min_size``².

    Indexing decodes every file in full, in parallel threads with a progress bar, so a bad
    dataset fails before training starts: a file that cannot be decoded (corrupt, truncated)
    raises DataError naming it, or with ``skip_broken`` is left out and counted in
    ``skipped``; an image too small to crop raises. Decoded images are kept (up to
    ``cache_bytes``) so small datasets such as BSDS500 are decoded once, not once per epoch.
    ``names[i]`` is the path of item ``i`` relative to ``root``; ``fingerprint`` is a digest
    of the names and sizes of the files used, which tells a changed folder apart.
    """

    def __init__(
        self,
        root,
        min_size: int,
        cache_bytes: int = 2 << 30,
        skip_broken: bool = False,
        progress: bool = True,
    ):
        self.root = Path(root)
        self._cache: dict[int, np.ndarray] = {}  # read-only arrays: they are shared
        self._cache_left = cache_bytes
        self._lock = threading.Lock()
        if not self.root.is_dir():
            raise DataError(f"data folder {self.root} does not exist (or is not a folder)")
        found = _image_files(self.root)
        if not found:
            raise DataError(
                f"no images in data folder {self.root}: looked for "
                f"{', '.join(IMAGE_EXTENSIONS)} files (any case, in sub-folders too)"
            )
        self.paths = found
        sizes, broken = self._decode_all(progress)
        if broken and not skip_broken:
            more = f" (and {len(broken) - 1} more)" if len(broken) > 1 else ""
            raise DataError(
                f"{broken[0][1]}{more}; remove or replace the file(s), or pass "
                "--skip-broken to leave them out"
            )
        self.skipped = [str(found[i]) for i, _ in broken]
        bad = {i for i, _ in broken}
        keep = [i for i in range(len(found)) if i not in bad]
        if not keep:
            raise DataError(f"none of the {len(found)} image files in {self.root} could be read")
        if broken:
            warnings.warn(
                f"skipped {len(broken)} of {len(found)} images in {self.root} that "
                f"cannot be decoded: {', '.join(self.skipped[:3])}"
                + (" ..." if len(broken) > 3 else ""),
                stacklevel=2,
            )
            new_index = {old: new for new, old in enumerate(keep)}
            self._cache = {new_index[i]: im for i, im in self._cache.items() if i in new_index}
        self.paths = [found[i] for i in keep]
        too_small = [
            f"{found[i]} is {sizes[i][0]}×{sizes[i][1]}" for i in keep if min(sizes[i]) < min_size
        ]
        if too_small:
            more = f" (and {len(too_small) - 3} more)" if len(too_small) > 3 else ""
            raise DataError(
                f"image {'; '.join(too_small[:3])}{more}: smaller than the "
                f"{min_size}×{min_size} crop; use a smaller --image-size or "
                "remove the file(s)"
            )
        self.names = [p.relative_to(self.root).as_posix() for p in self.paths]
        digest = hashlib.sha256()
        for name, path in zip(self.names, self.paths):
            digest.update(f"{name}\0{path.stat().st_size}\n".encode())
        self.fingerprint = digest.hexdigest()[:16]

    def _decode_all(self, progress: bool):
        """Decode every file once: ``(sizes, broken)``, sizes[i] = (width, height) and
        broken a sorted list of (index, message) for the files that failed."""
        from tqdm import tqdm

        sizes: list[tuple[int, int]] = [(0, 0)] * len(self.paths)
        broken = []

        def one(i):
            try:
                image = self[i]
            except DataError as e:
                return i, str(e)
            sizes[i] = (image.shape[1], image.shape[0])
            return i, None

        workers = min(8, os.cpu_count() or 2)
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="maetok-index") as pool:
            # delay: a folder indexed in under a second shows no bar at all
            for i, error in tqdm(
                pool.map(one, range(len(self.paths))),
                total=len(self.paths),
                desc=f"checking {self.root.name or self.root}",
                unit="image",
                disable=not progress,
                delay=1.0,
                dynamic_ncols=True,
            ):
                if error is not None:
                    broken.append((i, error))
        return sizes, broken

    def __len__(self) -> int:
        return len(self.paths)

    def name(self, i: int) -> str:
        return str(self.paths[i])

    def __getitem__(self, i: int) -> np.ndarray:
        """uint8 ``(H, W, 3)`` RGB, whatever the file's mode (grey, RGBA, palette, 16-bit)."""
        cached = self._cache.get(i)
        if cached is not None:
            return cached
        path = self.paths[i]
        try:
            with Image.open(path) as im:
                image = _to_rgb(ImageOps.exif_transpose(im))
        except Exception as e:  # report any decoder failure with the file name
            raise DataError(f"cannot decode image {path}: {e}") from e
        image.flags.writeable = False
        with self._lock:
            if image.nbytes <= self._cache_left and i not in self._cache:
                self._cache[i] = image
                self._cache_left -= image.nbytes
        return image


def _image_files(root: Path) -> list[Path]:
    """Every image file under ``root``, sorted, following links to folders (so a training
    folder may be a few links to other folders), each real folder visited once."""
    found, seen = [], set()
    for folder, subfolders, files in os.walk(root, followlinks=True):
        real = os.path.realpath(folder)
        if real in seen:  # a link back up the tree, or two links to one folder
            subfolders.clear()
            continue
        seen.add(real)
        subfolders.sort()  # the same folders win, whatever order the file system lists
        found += [
            Path(folder) / f
            for f in files
            if Path(f).suffix.lower() in IMAGE_EXTENSIONS and (Path(folder) / f).is_file()
        ]
    return sorted(found)


def _to_rgb(im: Image.Image) -> np.ndarray:
    if im.mode in ("I;16", "I;16L", "I;16B", "I"):
        # Pillow clips 16-bit values to 255 when converting to RGB; rescale instead.
        grey = np.rint(np.asarray(im, np.float64) / 257.0).clip(0, 255).astype(np.uint8)
        return np.repeat(grey[..., None], 3, axis=-1)
    if im.mode == "P" and "transparency" in im.info:
        im = im.convert("RGBA")  # the direct P → RGB conversion warns about such palettes
    return np.asarray(im.convert("RGB"), np.uint8)


def _crop(image: np.ndarray, top: int, left: int, size: int, what: str) -> np.ndarray:
    h, w = image.shape[:2]
    if h < size or w < size:
        raise DataError(
            f"{what} is {w}×{h}, smaller than the {size}×{size} crop; use a "
            "smaller --image-size or remove the file"
        )
    return image[top : top + size, left : left + size]


def center_crop(image: np.ndarray, size: int, what: str = "image") -> np.ndarray:
    """The central ``size``² window of a ``(H, W, C)`` image (no resizing)."""
    h, w = image.shape[:2]
    return _crop(image, (h - size) // 2, (w - size) // 2, size, what)


class BatchSource:
    """Batches for training step ``step``, a pure function of ``(cfg.train.seed, step)``.

    Sample ``g = step·B + i`` of the run is item ``perm_e[g mod len]`` of epoch
    ``e = g // len``, each epoch drawing its own permutation. With ``train=True`` each image
    gets a uniformly placed crop and a horizontal flip with probability 0.5; with
    ``train=False`` a centre crop and no flip.

    ``dataset`` needs ``len()``, ``dataset[i]`` → uint8 (H, W, 3) and, for error messages,
    optionally ``name(i)``; ``maetok.synthetic.SyntheticImages`` and ``ImageFolder`` have all three.

    ``rows`` (a slice of ``range(B)``) makes ``batch`` return only those rows of the global
    batch, for one process of a data-parallel run: the random draws are those of the whole
    batch, so the rows are exactly the ones a single process would have, and only their
    images are decoded.
    """

    def __init__(self, dataset, cfg: Config, train: bool = True, rows: slice | None = None):
        if cfg.model.channels != 3:
            raise ConfigError(
                f"the image pipeline yields RGB images, so model.channels must "
                f"be 3, got {cfg.model.channels}"
            )
        if len(dataset) == 0:
            raise DataError("the dataset is empty")
        self.dataset, self.cfg, self.train = dataset, cfg, train
        self.rows = slice(None) if rows is None else rows
        self._name = getattr(dataset, "name", lambda i: f"dataset item {i}")
        self._perms: dict[int, np.ndarray] = {}
        self._lock = threading.Lock()

    def _perm(self, epoch: int) -> np.ndarray:
        with self._lock:
            perm = self._perms.get(epoch)
        if perm is None:
            perm = np.random.default_rng([self.cfg.train.seed, epoch, STREAM_DATA]).permutation(
                len(self.dataset)
            )
            with self._lock:  # a step spans at most a few epochs; keep only recent ones
                self._perms = {e: p for e, p in self._perms.items() if e >= epoch - 1}
                self._perms[epoch] = perm
        return perm

    def indices(self, step: int) -> np.ndarray:
        """(B,) dataset indices of the samples of ``step``."""
        n, b = len(self.dataset), self.cfg.train.batch_size
        g = step * b + np.arange(b)
        return np.array([self._perm(int(e))[r] for e, r in zip(g // n, g % n)], np.int64)

    def batch(self, step: int) -> dict:
        """``images`` (B, H, W, C) float32 in [-1, 1]; ``mask`` (B, N) float32, 1 = masked;
        ``mask_ratio`` (float) and ``step`` (int). B counts ``rows`` only, when given."""
        size, b = self.cfg.model.image_size, self.cfg.train.batch_size
        # One draw per sample whatever its image size, so the stream is stable.
        u = step_rng(self.cfg.train.seed, step, STREAM_AUGMENT).random((b, 3))[self.rows]
        crops = []
        for i, idx in enumerate(self.indices(step)[self.rows]):
            image, what = self.dataset[int(idx)], self._name(int(idx))
            if self.train:
                h, w = image.shape[:2]
                top, left = int(u[i, 0] * (h - size + 1)), int(u[i, 1] * (w - size + 1))
                crop = _crop(image, top, left, size, what)
                crops.append(crop[:, ::-1] if u[i, 2] < 0.5 else crop)
            else:
                crops.append(center_crop(image, size, what))
        mask, ratio = mask_for_step(step, self.cfg.train, self.cfg.model.num_patches)
        return {
            "images": from_uint8(np.stack(crops)),  # (B, H, W, C)
            "mask": mask[self.rows],  # (B, N)
            "mask_ratio": float(ratio),
            "step": int(step),
        }


class Prefetcher:
    """Iterate ``source.batch(s)`` for ``s`` in ``[start, stop)``, computed ahead in threads.

    Up to ``depth`` batches are in flight on ``workers`` threads; batches come out in step
    order, and an exception raised while building one is re-raised here. Use it as a
    context manager (or call ``close()``) so no worker thread outlives the loop.
    """

    def __init__(self, source, start: int, stop: int, depth: int = 4, workers: int = 2):
        if depth < 1 or workers < 1:
            raise ValueError(f"depth and workers must be >= 1, got {depth} and {workers}")
        self._source, self._next, self._stop, self._depth = source, start, stop, depth
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="maetok-data")
        self._pending: deque = deque()
        self._fill()

    def _fill(self) -> None:
        while len(self._pending) < self._depth and self._next < self._stop:
            self._pending.append(self._pool.submit(self._source.batch, self._next))
            self._next += 1

    def __iter__(self) -> Prefetcher:
        return self

    def __next__(self) -> dict:
        if not self._pending:
            self.close()
            raise StopIteration
        try:
            batch = self._pending.popleft().result()
        except BaseException:
            self.close()
            raise
        self._fill()
        return batch

    def close(self) -> None:
        """Cancel batches not started yet and wait for the running ones; idempotent."""
        self._next = self._stop
        self._pending.clear()
        self._pool.shutdown(wait=True, cancel_futures=True)

    def __enter__(self) -> Prefetcher:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def load_eval_images(folder, size: int, skip_broken: bool = False) -> tuple[np.ndarray, list[str]]:
    """Centre ``size``² crops of every image in ``folder``, sorted by name.

    Returns ``(images, names)``: images (B, size, size, 3) float32 in [-1, 1] and the
    file names relative to ``folder``. Images are cropped from full resolution, not resized.
    """
    ds = ImageFolder(folder, min_size=size, skip_broken=skip_broken)
    # Filled in place: a list of crop views would keep every full-size image alive.
    crops = np.empty((len(ds), size, size, 3), np.uint8)
    for i in range(len(ds)):
        crops[i] = center_crop(ds[i], size, ds.name(i))
    return from_uint8(crops), list(ds.names)


def save_images(folder, images, names: list[str]) -> list[Path]:
    """Write (B, H, W, 3) images in [-1, 1] as ``folder/<name>.png``; returns the paths.

    A name's extension is replaced by .png and its sub-folders are created.
    """
    pixels = to_uint8(images)
    if len(pixels) != len(names):
        raise ValueError(f"{len(pixels)} images but {len(names)} names")
    out = [Path(folder) / Path(name).with_suffix(".png") for name in names]
    seen = Counter(out)
    clashes = sorted(n for n, p in zip(names, out) if seen[p] > 1)
    if clashes:
        raise DataError(f"images {clashes} would be written to the same .png; rename them")
    for path, image in zip(out, pixels):
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(path)
    return out
