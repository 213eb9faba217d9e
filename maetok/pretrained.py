"""Weights-only tokenizer files, and the pretrained tokenizer the package ships.

``maetok export`` turns a training checkpoint into what inference needs: the encoder and the
latent decoder (the raw or the EMA weights) in 16-bit floats, with the config, and nothing
else: no optimiser state, no EMA copy, no auxiliary decoders, no discriminator. It is an
ordinary maetok checkpoint (``maetok.checkpoint``) whose metadata says ``weights_only``, so
every command and both backends read it like any other; ``load_params`` returns float32.

``reconstruct``, ``encode``, ``decode`` and ``eval`` use ``SHIPPED`` when no ``--checkpoint``
is given. ``python examples/recipe.py ship RUN`` writes it from a finished recipe run that
beats the equal-size thumbnail on BSDS500 val (README, Quality), at most
``MAX_SHIPPED_BYTES``, with its model card ``maetok-seed.json`` beside it; this installation
has one only if ``SHIPPED`` exists, and without it those commands ask for ``--checkpoint``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from maetok import checkpoint as ckpt
from maetok.config import Config
from maetok.errors import CheckpointError

INFERENCE_GROUPS = ("encoder", "decoder")  # what reconstruct, encode and decode read
SHIPPED = Path(__file__).parent / "weights" / "maetok-seed.safetensors"
FLOAT16_MAX = float(np.finfo(np.float16).max)
MAX_SHIPPED_BYTES = 40 * 10**6  # the package carries SHIPPED: 40 MB at most


def resolve(path) -> Path:
    """``path``, or the shipped tokenizer for None; CheckpointError if there is none."""
    if path is not None:
        return Path(path)
    if not SHIPPED.is_file():
        raise CheckpointError(
            "no --checkpoint given, and this installation ships no pretrained tokenizer; "
            "pass --checkpoint PATH (a `maetok train` checkpoint or a `maetok export` file)"
        )
    return SHIPPED


def export_weights(checkpoint, out, use_ema: bool = False) -> Path:
    """Write the inference weights of ``checkpoint`` (its EMA with ``use_ema``) to ``out``
    in float16, with the config and the source's sha256; refuses weights float16 cannot
    hold."""
    from maetok.tree import iter_leaves, map_tree

    cfg, params = load_params(checkpoint, use_ema=use_ema)
    inference = {group: params[group] for group in INFERENCE_GROUPS}
    for key, leaf in iter_leaves(inference):
        if np.abs(leaf).max(initial=0.0) > FLOAT16_MAX:
            raise CheckpointError(
                f"{checkpoint}: {key} exceeds the float16 range; it cannot be exported in 16 bits"
            )
    tree = map_tree(lambda a: np.asarray(a).astype(np.float16), inference)
    meta = {
        "weights_only": True,
        "source_sha256": ckpt.file_sha256(checkpoint),
        "weights": "ema" if use_ema else "raw",
    }
    return ckpt.save_tree(out, {"params": tree}, cfg.to_json(), meta)


def load_params(path, use_ema: bool = False, model: Config | None = None) -> tuple[Config, dict]:
    """``(config, parameters as float32 numpy)`` of a training checkpoint or an exported
    file, read once and checked against its config (and with ``model``, its model section
    against that config's). An exported file holds one set of weights, so ``use_ema`` is
    refused for it."""
    from maetok.params import spec_params
    from maetok.trainer import check_params, params_of
    from maetok.tree import map_tree

    checkpoint = ckpt.read_checkpoint(path)
    cfg, path = checkpoint.cfg, checkpoint.path
    tree = checkpoint.check(model or cfg)
    if not checkpoint.meta.get("weights_only"):
        return cfg, params_of(path, tree, cfg, use_ema)
    if use_ema:
        raise CheckpointError(
            f"{path} is an exported file with one set of weights; leave out --ema"
        )
    spec = spec_params(cfg.model)
    check_params(path, tree["params"], {g: spec[g] for g in INFERENCE_GROUPS})
    return cfg, map_tree(lambda a: np.asarray(a, np.float32), tree["params"])
