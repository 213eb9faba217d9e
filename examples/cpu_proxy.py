"""A CPU-sized stand-in for the BSDS500 recipe, for choosing levers without a GPU.

BSDS500 photos shrunk ×4 (about 120×80), random 64² crops, patch 8 (N = 64), L = 32 latent
tokens of width 8 (256 values: the equal-size thumbnail is 9×9, the same ~7× linear
compression as 37×37 at 256²), ViT widths 128 and depths 4/4, auxiliary decoders of one
block. One run of 600 steps at batch 32 takes 4–6 minutes on two cores. It prints the
validation PSNR at four points of the run, the PSNR of the final model at several mask
ratios, and the thumbnail baseline:

    python examples/cpu_proxy.py NAME '{"steps": 600, "model": {"query_pos": true}}' [BSDS500]
    python examples/cpu_proxy.py ae '{"train": {"mask_min": 0, "mask_max": 0},
                                      "model": {"aux_targets": []}}'

The JSON holds config overrides per section (``model``, ``loss``, ``train``), ``steps``, and
optionally ``"init": "OTHER"`` to start from the parameters a run named OTHER left in
``runs/proxy/OTHER.npz`` (for Stage 2: ``"train": {"stage": 2}``, as ``maetok train
--init-from`` does). BSDS500 is the folder holding ``train/`` and ``val/`` (default:
``../shared/data/bsds500`` beside the repository).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

from maetok.config import preset
from maetok.data import BatchSource, center_crop, from_uint8
from maetok.evaluate import thumbnail_baseline, thumbnail_side
from maetok.metrics import psnr
from maetok.tree import flatten, unflatten
from maetok_jax.model import forward
from maetok_jax.train import init_state, jit_train_step, step_inputs

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "bsds500"
SAVED = ROOT / "runs" / "proxy"
MODEL = dict(
    image_size=64,
    patch_size=8,
    num_latent_tokens=32,
    latent_dim=8,
    enc_width=128,
    enc_depth=4,
    enc_heads=4,
    dec_width=128,
    dec_depth=4,
    dec_heads=4,
    aux_width=64,
    aux_depth=1,
    aux_heads=2,
)
TRAIN = dict(batch_size=32, lr=2e-3, warmup_steps=50, ema_decay=0.0)


class Shrunk:
    """The photos of ``folder`` resized ×1/4 with bicubic resampling, uint8 (H, W, 3)."""

    def __init__(self, folder):
        self.images = []
        for path in sorted(Path(folder).glob("*.jpg")):
            with Image.open(path) as im:
                w, h = im.size
                self.images.append(
                    np.asarray(im.convert("RGB").resize((w // 4, h // 4), Image.BICUBIC))
                )

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return self.images[i]


def main(name: str, overrides: dict, data=DATA, saved=SAVED) -> dict:
    steps = int(overrides.get("steps", 600))
    cfg = preset(
        "seed",
        model={**MODEL, **overrides.get("model", {})},
        train={**TRAIN, "steps": steps, "anneal_steps": steps, **overrides.get("train", {})},
        loss=overrides.get("loss", {}),
    )
    train_set = Shrunk(Path(data) / "train")
    val = from_uint8(np.stack([center_crop(x, 64) for x in Shrunk(Path(data) / "val").images]))
    params = None
    if "init" in overrides:
        with np.load(Path(saved) / f"{overrides['init']}.npz") as f:
            params = unflatten(dict(f))
    state, step = init_state(cfg, cfg.train.seed, params=params), jit_train_step(cfg)
    fwd = jax.jit(lambda p, x, mk: forward(p, x, mk, cfg.model, with_aux=False)[0])

    def val_psnr(params, ratio=0.0):
        mask = np.random.default_rng(1).random((len(val), cfg.model.num_patches)) < ratio
        recon = np.asarray(fwd(params, jnp.asarray(val), jnp.asarray(mask, jnp.float32)))
        return round(float(psnr(val, np.clip(recon, -1, 1)).mean()), 2)

    source, t0, curve = BatchSource(train_set, cfg), time.time(), []
    for s in range(steps):
        state, metrics = step(state, *step_inputs(source.batch(s), cfg, s))
        if (s + 1) % max(1, steps // 4) == 0:
            curve.append(val_psnr(state["params"]))
    result = {
        "name": name,
        "val_psnr_curve": curve,
        "by_mask_ratio": {r: val_psnr(state["params"], r) for r in (0.0, 0.02, 0.1, 0.5)},
        "thumbnail_psnr": round(
            float(psnr(val, thumbnail_baseline(val, thumbnail_side(cfg.model))).mean()), 2
        ),
        "rec": round(float(metrics["rec"]), 4),
        "seconds": round(time.time() - t0),
    }
    Path(saved).mkdir(parents=True, exist_ok=True)
    np.savez(Path(saved) / f"{name}.npz", **flatten(jax.device_get(state["params"])))
    print(json.dumps(result), flush=True)
    return result


if __name__ == "__main__":
    if len(sys.argv) not in (3, 4):
        sys.exit(__doc__)
    main(sys.argv[1], json.loads(sys.argv[2]), *sys.argv[3:])
