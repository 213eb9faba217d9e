"""The image pipeline: synthetic data, image folders, reproducible batches, prefetching."""

import threading

import numpy as np
import pytest
from PIL import Image

from maetok.config import preset
from maetok.data import (
    BatchSource,
    ImageFolder,
    Prefetcher,
    center_crop,
    from_uint8,
    load_eval_images,
    save_images,
    to_uint8,
)
from maetok.errors import DataError
from maetok.synthetic import SyntheticImages


def test_synthetic_images_are_deterministic_and_varied():
    a, b = SyntheticImages(48, count=16, seed=3), SyntheticImages(48, count=16, seed=3)
    first = a[5]
    assert first.shape == (48, 48, 3) and first.dtype == np.uint8
    assert a[5].tobytes() == b[5].tobytes() == first.tobytes()  # cached and fresh agree
    assert a[5].tobytes() != a[6].tobytes()
    assert SyntheticImages(48, count=16, seed=4)[5].tobytes() != first.tobytes()
    for i in range(8):  # every image has real content: colour spread and many distinct values
        img = a[i].astype(np.float64)
        assert img.std() > 10 and len(np.unique(a[i])) > 50
    with pytest.raises(IndexError):
        a[16]


def test_synthetic_cache_is_bounded():
    assert SyntheticImages(32).cache_items == 4096  # 12 MB: everything stays
    assert SyntheticImages(512).cache_items * 512 * 512 * 3 <= 256 << 20
    ds = SyntheticImages(16, count=50, cache_items=5)
    first = [ds[i] for i in range(8)]
    assert sorted(ds._cache) == [3, 4, 5, 6, 7]
    assert ds[0] is not first[0] and ds[0].tobytes() == first[0].tobytes()  # drawn again


def test_uint8_round_trip(rng):
    pixels = rng.integers(0, 256, (2, 5, 5, 3), dtype=np.uint8)
    x = from_uint8(pixels)
    assert x.dtype == np.float32 and x.min() >= -1 and x.max() <= 1
    np.testing.assert_array_equal(to_uint8(x), pixels)
    np.testing.assert_array_equal(to_uint8(np.array([-3.0, 3.0])), [0, 255])


@pytest.fixture
def folder(tmp_path, rng):
    """Five readable images (RGB png/jpg, grey, RGBA, 16-bit grey) and one corrupt file."""
    root = tmp_path / "imgs"
    (root / "sub").mkdir(parents=True)
    Image.fromarray(rng.integers(0, 256, (40, 50, 3), dtype=np.uint8)).save(root / "a.png")
    Image.fromarray(rng.integers(0, 256, (44, 36, 3), dtype=np.uint8)).save(root / "sub/b.JPG")
    Image.fromarray(rng.integers(0, 256, (36, 36), dtype=np.uint8)).save(root / "c_grey.png")
    Image.fromarray(rng.integers(0, 256, (36, 40, 4), dtype=np.uint8)).save(root / "d_rgba.png")
    Image.fromarray(rng.integers(0, 65536, (36, 36), dtype=np.uint16)).save(root / "e_16bit.png")
    (root / "zz_broken.jpg").write_bytes(rng.bytes(300))
    (root / "notes.txt").write_text("not an image")
    return root


def test_image_folder_reads_every_mode_as_rgb_and_skips_broken_files_on_request(folder):
    with pytest.warns(UserWarning, match="skipped 1 of 6 images.*zz_broken.jpg"):
        ds = ImageFolder(folder, min_size=32, skip_broken=True)
    assert ds.skipped == [str(folder / "zz_broken.jpg")]
    assert ds.names == ["a.png", "c_grey.png", "d_rgba.png", "e_16bit.png", "sub/b.JPG"]
    shapes = [ds[i].shape for i in range(len(ds))]
    assert shapes == [(40, 50, 3), (36, 36, 3), (36, 40, 3), (36, 36, 3), (44, 36, 3)]
    assert all(ds[i].dtype == np.uint8 for i in range(len(ds)))
    grey = ds[1]
    np.testing.assert_array_equal(grey[..., 0], grey[..., 2])
    sixteen = np.asarray(Image.open(folder / "e_16bit.png"), np.float64)
    np.testing.assert_allclose(ds[3][..., 0], sixteen / 257, atol=0.51)  # rescaled, not clipped
    assert ds[3].std() > 30
    np.testing.assert_array_equal(ds[0], np.asarray(Image.open(folder / "a.png")))


def test_a_broken_file_is_reported_by_name_when_the_folder_is_indexed(folder):
    with pytest.raises(DataError, match=r"zz_broken.jpg.*--skip-broken"):
        ImageFolder(folder, min_size=32)
    (folder / "zz_broken.jpg").unlink()
    # A truncated JPEG has a good header: only decoding the whole file finds it.
    jpeg = folder / "sub" / "b.JPG"
    (folder / "cut.jpg").write_bytes(jpeg.read_bytes()[: len(jpeg.read_bytes()) // 2])
    with Image.open(folder / "cut.jpg") as im:
        assert im.size == (36, 44)  # what a header-only check sees
    with pytest.raises(DataError, match=r"cut.jpg"):
        ImageFolder(folder, min_size=32)


def test_fingerprint_follows_the_file_list(folder):
    (folder / "zz_broken.jpg").unlink()
    first = ImageFolder(folder, min_size=32).fingerprint
    assert ImageFolder(folder, min_size=32).fingerprint == first
    Image.fromarray(np.zeros((40, 40, 3), np.uint8)).save(folder / "new.png")
    assert ImageFolder(folder, min_size=32).fingerprint != first


def test_image_folder_errors(tmp_path, folder, rng):
    with pytest.raises(DataError, match="does not exist"):
        ImageFolder(tmp_path / "nope", 32)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=r"empty.*\.jpg, \.jpeg, \.png"):
        ImageFolder(tmp_path / "empty", 32)
    bad = tmp_path / "bad"
    bad.mkdir()
    for name in ("x.jpg", "y.png"):
        (bad / name).write_bytes(rng.bytes(200))
    with pytest.raises(DataError, match="none of the 2"):
        ImageFolder(bad, 32, skip_broken=True)
    with pytest.warns(UserWarning), pytest.raises(DataError, match=r"c_grey.png is 36×36.*40×40"):
        ImageFolder(folder, min_size=40, skip_broken=True)


def test_decode_failure_after_indexing_names_the_file(folder):
    (folder / "zz_broken.jpg").unlink()
    ds = ImageFolder(folder, min_size=32, cache_bytes=0)  # nothing kept: read again on use
    (folder / "a.png").write_bytes((folder / "a.png").read_bytes()[:60])  # header only
    with pytest.raises(DataError, match=r"a.png"):
        ds[0]


def _source(train=True, **train_overrides):
    cfg = preset("tiny", train={"batch_size": 6, **train_overrides})
    return BatchSource(SyntheticImages(40, count=20, seed=1), cfg, train=train), cfg


def test_batches_are_reproducible_and_well_formed():
    src, cfg = _source()
    b0, again, b1 = src.batch(3), _source()[0].batch(3), src.batch(4)
    np.testing.assert_array_equal(b0["images"], again["images"])
    np.testing.assert_array_equal(b0["mask"], again["mask"])
    assert b0["mask_ratio"] == again["mask_ratio"] and b0["step"] == 3
    assert not np.array_equal(b0["images"], b1["images"])
    assert not np.array_equal(b0["mask"], b1["mask"])
    assert b0["images"].shape == (6, 32, 32, 3) and b0["images"].dtype == np.float32
    assert b0["mask"].shape == (6, cfg.model.num_patches) and b0["mask"].dtype == np.float32
    assert -1 <= b0["images"].min() < -0.5 and 0.5 < b0["images"].max() <= 1
    assert set(np.unique(b0["mask"])) == {0.0, 1.0}
    for step in range(20):
        r = src.batch(step)["mask_ratio"]
        assert isinstance(r, float) and 0.4 <= r <= 0.6
    assert _source(seed=7)[0].batch(3)["images"].tobytes() != b0["images"].tobytes()


def test_epochs_visit_every_image_once():
    src, _ = _source()  # 20 images, batches of 6: steps 0-9 cover three epochs exactly
    seen = np.concatenate([src.indices(s) for s in range(10)])
    for epoch in range(3):
        assert sorted(seen[20 * epoch : 20 * (epoch + 1)]) == list(range(20))
    assert not np.array_equal(seen[:20], seen[20:40])  # a fresh order each epoch


def test_train_crops_vary_and_eval_uses_centre_crops():
    train, _ = _source()
    evaluation, _ = _source(train=False)
    ds = train.dataset
    batch, idx = evaluation.batch(2), evaluation.indices(2)
    want = from_uint8(np.stack([center_crop(ds[int(i)], 32) for i in idx]))
    np.testing.assert_array_equal(batch["images"], want)
    # Training crops: every one is some window of its image, possibly mirrored.
    tb, tidx = train.batch(2), train.indices(2)
    offsets, flips = set(), 0
    for img, i in zip(tb["images"], tidx):
        full = from_uint8(ds[int(i)])
        hits = [
            (y, x, f)
            for y in range(9)
            for x in range(9)
            for f in (0, 1)
            if np.array_equal(
                img, full[y : y + 32, x : x + 32][:, ::-1] if f else full[y : y + 32, x : x + 32]
            )
        ]
        assert hits, "a training crop is not a window of its image"
        offsets.add(hits[0][:2])
        flips += hits[0][2]
    assert len(offsets) > 1 and 0 < flips < 6


def test_prefetcher_matches_direct_calls_in_order():
    src, _ = _source()
    direct = [src.batch(s) for s in range(2, 9)]
    with Prefetcher(src, 2, 9, depth=3, workers=3) as it:
        got = list(it)
    assert [b["step"] for b in got] == list(range(2, 9))
    for a, b in zip(direct, got):
        np.testing.assert_array_equal(a["images"], b["images"])
        np.testing.assert_array_equal(a["mask"], b["mask"])


class _Failing:
    def batch(self, step):
        if step == 3:
            raise DataError("bad image at step 3")
        return {"step": step}


def test_prefetcher_propagates_errors_and_stops_its_threads():
    before = threading.active_count()
    it = Prefetcher(_Failing(), 0, 100, depth=4, workers=2)
    assert [next(it)["step"] for _ in range(3)] == [0, 1, 2]
    with pytest.raises(DataError, match="step 3"):
        next(it)
    with pytest.raises(StopIteration):
        next(it)  # closed: nothing more comes out
    assert threading.active_count() == before


def test_eval_images_round_trip(folder, tmp_path):
    with pytest.warns(UserWarning):
        images, names = load_eval_images(folder, 32, skip_broken=True)
    assert images.shape == (5, 32, 32, 3) and images.dtype == np.float32
    assert names[0] == "a.png" and names[-1] == "sub/b.JPG"
    original = np.asarray(Image.open(folder / "a.png"))
    np.testing.assert_array_equal(to_uint8(images[0]), original[4:36, 9:41])  # centre crop
    paths = save_images(tmp_path / "out", images, names)
    assert paths[-1] == tmp_path / "out" / "sub" / "b.png"
    np.testing.assert_array_equal(np.asarray(Image.open(paths[-1])), to_uint8(images[-1]))


def test_save_images_refuses_colliding_names(rng, tmp_path):
    images = rng.uniform(-1, 1, (2, 8, 8, 3))
    with pytest.raises(DataError, match=r"\['x.jpg', 'x.png'\]"):
        save_images(tmp_path, images, ["x.jpg", "x.png"])
    assert list(tmp_path.iterdir()) == []


def test_image_folder_follows_links_to_folders_once(tmp_path, rng):
    """A training folder made of links to other folders (as the recipe builds it) sees
    every image of each, and a link back up the tree is not walked twice."""
    for name, count in (("photos", 3), ("bsds", 2)):
        (tmp_path / name).mkdir()
        for i in range(count):
            pixels = rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(tmp_path / name / f"{i}.png")
    train = tmp_path / "train"
    train.mkdir()
    (train / "photos").symlink_to(tmp_path / "photos")
    (train / "bsds").symlink_to(tmp_path / "bsds")
    (train / "bsds_again").symlink_to(tmp_path / "bsds")
    (tmp_path / "photos" / "loop").symlink_to(train)
    folder = ImageFolder(train, 32, progress=False)
    assert len(folder) == 5
    assert sorted(folder.names)[:2] == ["bsds/0.png", "bsds/1.png"]
    assert {n.split("/")[0] for n in folder.names} == {"photos", "bsds"}
