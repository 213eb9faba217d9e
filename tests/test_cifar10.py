"""CIFAR-10 preparation on tiny archives of the real layout, built in tmp_path."""

import io
import json
import tarfile

import numpy as np
import pytest
from PIL import Image

from maetok import cifar10
from maetok.data import ImageFolder
from maetok.errors import DataError


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def _encode(image: np.ndarray, fmt: str) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format=fmt, **({"quality": 95} if fmt == "JPEG" else {}))
    return buf.getvalue()


def make_archives(folder, rng, per_class=2, n_test=7, size=32, classes=cifar10.CLASSES):
    """Write the two archives; returns (train images by path, test images, test labels)."""
    folder.mkdir(parents=True, exist_ok=True)
    train = {}
    with tarfile.open(folder / cifar10.TRAIN_ARCHIVE, "w:gz") as tar:
        for c, name in enumerate(classes):
            for i in range(per_class):
                # flat colour per image: survives JPEG almost exactly, and differs by class
                image = np.full((size, size, 3), (20 * c + 5 * i) % 256, np.uint8)
                path = f"train/{name}/{i:04d}.jpg"
                train[path] = image
                _add(tar, path, _encode(image, "JPEG"))
    test = rng.integers(0, 256, (n_test, size, size, 3), dtype=np.uint8)
    labels = rng.integers(0, 10, n_test)
    meta = {
        "classes": list(cifar10.CLASSES),
        "images": [
            {
                "id": i,
                "image_path": f"test_images/{i:05d}.png",
                "label_id": int(y),
                "class_name": cifar10.CLASSES[y],
            }
            for i, y in enumerate(labels)
        ],
    }
    with tarfile.open(folder / cifar10.TEST_ARCHIVE, "w:gz") as tar:
        for i in rng.permutation(n_test):  # archive order is not the official order
            _add(tar, f"test_images/{i:05d}.png", _encode(test[i], "PNG"))
        _add(tar, "metadata.json", json.dumps(meta).encode())
    return train, test, labels


def test_prepare_writes_arrays_in_official_order(tmp_path, rng):
    train, test, labels = make_archives(tmp_path / "src", rng)
    cache = cifar10.prepare(tmp_path / "src", tmp_path / "cache")
    images, y = cifar10.load_split("train", cache=cache)
    assert images.shape == (20, 32, 32, 3) and images.dtype == np.uint8 and y.dtype == np.int32
    paths = sorted(train)
    expected = [cifar10.CLASSES.index(p.split("/")[1]) for p in paths]
    np.testing.assert_array_equal(y, expected)
    for i, p in enumerate(paths):  # JPEG of a flat colour comes back within a level or two
        assert np.abs(images[i].astype(int) - train[p]).max() <= 2
    t_images, t_labels = cifar10.load_split("test", cache=cache)
    np.testing.assert_array_equal(t_images, test)  # PNG: lossless, metadata order
    np.testing.assert_array_equal(t_labels, labels)
    # the extracted training folder is an ImageFolder for `maetok train --data`
    assert len(ImageFolder(cache / "train", min_size=32)) == 20
    assert not [p for p in cache.iterdir() if p.name.startswith(".")]  # no temporaries left


def test_prepare_twice_is_a_no_op_and_load_prepares(tmp_path, rng):
    make_archives(tmp_path / "src", rng, per_class=1, n_test=3)
    cache = tmp_path / "cache"
    images, _ = cifar10.load_split("test", source=tmp_path / "src", cache=cache)
    assert len(images) == 3
    stamp = (cache / "train.npz").stat().st_mtime_ns
    (tmp_path / "src" / cifar10.TRAIN_ARCHIVE).unlink()  # not needed any more
    cifar10.prepare(tmp_path / "src", cache)
    assert (cache / "train.npz").stat().st_mtime_ns == stamp


def test_default_cache_follows_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("MAETOK_CACHE", str(tmp_path))
    assert cifar10.default_cache() == tmp_path / "cifar10"
    monkeypatch.delenv("MAETOK_CACHE")
    assert cifar10.default_cache().parts[-3:] == (".cache", "maetok", "cifar10")


def test_errors_name_the_problem(tmp_path, rng):
    with pytest.raises(DataError, match="does not exist"):
        cifar10.prepare(tmp_path / "nowhere", tmp_path / "cache")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=r"has no train_jpg.tar.gz"):
        cifar10.prepare(tmp_path / "empty", tmp_path / "cache")
    with pytest.raises(DataError, match="pass the CIFAR-10 folder"):
        cifar10.load_split("train", cache=tmp_path / "cache")
    with pytest.raises(DataError, match="split"):
        cifar10.load_split("val", cache=tmp_path / "cache")

    bad = tmp_path / "corrupt"
    make_archives(bad, rng, per_class=1, n_test=2)
    (bad / cifar10.TRAIN_ARCHIVE).write_bytes(b"not a gzip file at all")
    with pytest.raises(DataError, match="cannot unpack"):
        cifar10.prepare(bad, tmp_path / "cache1")
    assert not list((tmp_path / "cache1").iterdir())  # nothing half-extracted is left

    make_archives(tmp_path / "big", rng, per_class=1, n_test=2, size=40)
    with pytest.raises(DataError, match="40×40, expected 32×32"):
        cifar10.prepare(tmp_path / "big", tmp_path / "cache2")
