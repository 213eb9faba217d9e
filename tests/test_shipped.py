"""The pretrained tokenizer as this installation has it: none, and the commands say so in one
line; or one within the size limit, in float16, with its card, read alike by both backends
and beating the equal-size thumbnail on a photograph it never saw."""

import json

import numpy as np
import pytest
from matplotlib import cbook
from PIL import Image

from maetok import checkpoint as ckpt
from maetok import pretrained
from maetok.data import center_crop, from_uint8
from maetok.errors import CheckpointError
from maetok.evaluate import thumbnail_baseline, thumbnail_side
from maetok.metrics import psnr
from maetok.trainer import get_backend


def _photograph(size: int) -> np.ndarray:
    """(1, size, size, 3) in [-1, 1]: the centre of matplotlib's portrait of Grace Hopper,
    cropped from full resolution as ``maetok eval`` crops BSDS500 val."""
    with Image.open(cbook.get_sample_data("grace_hopper.jpg")) as im:
        pixels = np.asarray(im.convert("RGB"))
    return from_uint8(center_crop(pixels, size, "grace_hopper.jpg")[None])


def test_the_shipped_tokenizer_as_installed():
    card = pretrained.SHIPPED.with_suffix(".json")
    if not pretrained.SHIPPED.is_file():
        with pytest.raises(CheckpointError) as missing:
            pretrained.resolve(None)
        message = str(missing.value)
        assert "ships no pretrained tokenizer" in message and "--checkpoint" in message
        assert "\n" not in message
        assert not card.exists()  # no card for a file that is not there
    else:
        path = pretrained.resolve(None)
        assert path == pretrained.SHIPPED
        assert path.stat().st_size <= pretrained.MAX_SHIPPED_BYTES
        assert json.loads(card.read_text())["sha256"] == ckpt.file_sha256(path)
        flat, _, meta = ckpt.load_tree(path)
        assert meta["weights_only"] and all(a.dtype == np.float16 for a in flat.values())
        cfg, params = pretrained.load_params(path)
        cfg = cfg.replace(model={"compute_dtype": "float32"})  # on the CPU both in float32
        photo = _photograph(cfg.model.image_size)
        recon = {}
        for name in ("jax", "torch"):
            backend = get_backend(name)(cfg, "cpu")
            recon[name] = backend.reconstruct(backend.to_device_tree(params), photo)
        np.testing.assert_allclose(recon["torch"], recon["jax"], atol=1e-3)
        thumb = thumbnail_baseline(photo, thumbnail_side(cfg.model))
        assert psnr(photo, recon["jax"])[0] > psnr(photo, thumb)[0]
