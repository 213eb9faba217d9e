"""The Marble plugin's configuration and inputs: config, images, and the statistics it reports.

``MAETokParadigm(config)`` receives a plain dict from ``brain.load_paradigm("maetok", {...})``.
``parse_settings`` turns it into ``Settings``: the Stage-1 ``maetok.config.Config`` (a preset
plus overrides, validated by ``maetok.config``), the plugin's own options (``name``,
``stage2_start``, ``pretrain_steps``, ...) and an ``ImageSource``. Config fields are set
with the keys of ``maetok train --set``, ``"SECTION.FIELD"`` (``"model.enc_width"``,
``"loss.use_adv"``, ``"train.lr"``), or by section (``{"train": {"lr": 1e-3}}``). Every
problem raises ``ConfigError`` naming the key and what would be valid; an unknown key lists
the known ones.

Images enter the tokenizer channel-last, ``(B, H, W, C)`` float32 in [-1, 1] (docs/design.md §2).
``as_images`` is the one place where other layouts are converted: uint8 in [0, 255] is
rescaled, and a torch tensor (or array) whose channel axis is axis 1 (NCHW) is transposed.

The statistics the plugin reports (``latent_summary``, ``walk_averages``) are plain numpy
functions, kept here so the plugin module reads as the hooks and the train loop only.
"""

from __future__ import annotations

import dataclasses
import inspect
import os
import re
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from maetok.cli import config_overrides
from maetok.config import Config, LossConfig, ModelConfig, TrainConfig, preset
from maetok.data import BatchSource, ImageFolder, from_uint8
from maetok.errors import ConfigError, DataError
from maetok.evaluate import COLLAPSE_REL_VAR, latent_stats
from maetok.synthetic import SyntheticImages

# The plugin's own keys, with their defaults.
PLUGIN_DEFAULTS: dict[str, Any] = {
    "preset": "tiny",  # maetok preset the overrides apply to
    "name": "maetok",  # report namespace: training/<name>, <name>/tokens, <name>/aux, ...
    "stage2_start": None,  # paradigm iteration at which Stage 2 starts; None: never
    "pretrain_steps": 0,  # iterations run once, at the first before_walk
    "stats_every": 10,  # latent statistics (<name>/tokens) every this many iterations
    "history_limit": 10000,  # per-iteration records kept in .history (oldest dropped)
    "device": None,  # None: the Wanderer's device (w._device)
    "init_from": None,  # encoder and decoder from a checkpoint, an export, or "pretrained"
    "images": None,  # (N, H, W, C) float in [-1, 1] or uint8; torch NCHW accepted
    "batch_fn": None,  # callable(step) → images of one batch
    "image_folder": None,  # path of a folder of .png/.jpg images
    "synthetic_count": 1024,  # size of the default synthetic dataset
    "model": None,  # Config fields by section, {"model": {"enc_width": 64}}, as an
    "loss": None,  # alternative to one "SECTION.FIELD" key per field (``maetok train
    "train": None,  # --set``'s keys: "model.enc_width", "loss.use_adv", "train.lr", ...)
}
KNOWN_KEYS = tuple(sorted(PLUGIN_DEFAULTS))
_SECTIONS = {"model": ModelConfig, "loss": LossConfig, "train": TrainConfig}
_SOURCES = ("images", "batch_fn", "image_folder")


@dataclasses.dataclass(frozen=True)
class Settings:
    cfg: Config  # the Stage-1 config; Stage 2 is cfg with train.stage = 2
    name: str
    stage2_start: int | None
    pretrain_steps: int
    stats_every: int
    history_limit: int
    device: str | None
    init_from: str | None  # a path, or "pretrained" (the package's shipped tokenizer)
    source: ImageSource
    summary: dict  # the JSON-able options, stored in checkpoints

    def stage_cfg(self, stage: int) -> Config:
        return self.cfg if stage == 1 else self.cfg.replace(train={"stage": 2})


def parse_settings(config: Mapping[str, Any] | None) -> Settings:
    """Validate the plugin's mapping; raises ConfigError (or DataError for the images)."""
    if config is None:
        config = {}
    if not isinstance(config, Mapping):
        raise ConfigError(
            f"the MAETokParadigm config must be a mapping, got {type(config).__name__}"
        )
    unknown = sorted(str(k) for k in config if k not in PLUGIN_DEFAULTS and "." not in str(k))
    if unknown:
        fields = {f.name: part for part, c in _SECTIONS.items() for f in dataclasses.fields(c)}
        hints = [f"{k} → {fields[k]}.{k}" for k in unknown if k in fields]
        raise ConfigError(
            f"unknown MAETokParadigm option(s) {unknown}"
            + (f" (config fields take their section: {', '.join(hints)})" if hints else "")
            + f"; known: {', '.join(KNOWN_KEYS)}, and every config field as SECTION.FIELD "
            "(e.g. model.enc_width, loss.use_adv, train.lr)"
        )
    opts = {**PLUGIN_DEFAULTS, **{k: v for k, v in config.items() if k in PLUGIN_DEFAULTS}}
    dotted = [(k, v) for k, v in config.items() if k not in PLUGIN_DEFAULTS]

    # An open-ended walk has no last step for a cosine to reach: hold lr after warm-up.
    sections: dict[str, dict] = {"model": {}, "loss": {}, "train": {"lr_schedule": "constant"}}
    for part in ("model", "loss", "train"):
        given = opts[part] or {}
        if not isinstance(given, Mapping):
            raise ConfigError(f"option {part!r} must be a mapping of {part} fields, got {given!r}")
        sections[part].update(given)
    for part, fields in config_overrides(dotted, "a MAETokParadigm option").items():
        sections.setdefault(part, {}).update(fields)  # Config.replace names a wrong section
    if not isinstance(opts["preset"], str):
        raise ConfigError(f"option 'preset' must be a preset name, got {opts['preset']!r}")
    cfg = preset(opts["preset"]).replace(**sections)  # validates every field
    if cfg.train.stage != 1:
        raise ConfigError(
            "train.stage is managed by the paradigm (Stage 1 first); use "
            "stage2_start to choose when Stage 2 begins"
        )
    cfg.replace(train={"stage": 2})  # a Stage-2 problem surfaces now, not mid-walk

    name = opts["name"]
    if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9_.-]+", name):
        raise ConfigError(
            f"option 'name' must be a non-empty word (letters, digits, _ . -), got {name!r}"
        )
    stage2 = opts["stage2_start"]
    if stage2 is not None:
        stage2 = _int(stage2, "stage2_start", 1, "None (no Stage 2) or an iteration >= 1")
    device = opts["device"]
    if device is not None and not isinstance(device, str):
        raise ConfigError(f"option 'device' must be None or a torch device string, got {device!r}")
    init_from = opts["init_from"]
    if init_from is not None:
        if not isinstance(init_from, (str, os.PathLike)):
            raise ConfigError(
                f"option 'init_from' must be a checkpoint path or 'pretrained', got {init_from!r}"
            )
        from maetok import checkpoint as ckpt
        from maetok.pretrained import resolve

        init_from = str(resolve(None if init_from == "pretrained" else init_from))
        ckpt.check_model(init_from, ckpt.read_config(init_from), cfg)  # fails now, not mid-walk
    summary = {
        "preset": opts["preset"],
        "name": name,
        "stage2_start": stage2,
        "pretrain_steps": _int(opts["pretrain_steps"], "pretrain_steps", 0),
        "stats_every": _int(opts["stats_every"], "stats_every", 1),
        "history_limit": _int(opts["history_limit"], "history_limit", 1),
    }  # not init_from: a checkpoint restores the whole state, whatever the start was
    return Settings(
        cfg=cfg,
        name=name,
        stage2_start=stage2,
        pretrain_steps=summary["pretrain_steps"],
        stats_every=summary["stats_every"],
        history_limit=summary["history_limit"],
        device=device,
        init_from=init_from,
        source=make_source(opts, cfg),
        summary=summary,
    )


def _int(value, key: str, low: int, what: str | None = None) -> int:
    ok = isinstance(value, (int, np.integer)) and not isinstance(value, bool) and value >= low
    if not ok:
        raise ConfigError(f"option {key!r} must be {what or f'an integer >= {low}'}, got {value!r}")
    return int(value)


# ---------------------------------------------------------------------------- images
def as_images(x, channels: int, what: str = "images") -> np.ndarray:
    """Images → (B, H, W, C) float32 in [-1, 1].

    Accepts numpy arrays or torch tensors (detached and copied to the host), batched
    (B, ·, ·, ·) or single (·, ·, ·); channel-last, or channel-first when axis 1 has
    ``channels`` entries and the last axis does not. uint8 is read as [0, 255]; floats
    must already lie in [-1, 1] (a [0, 1] image is accepted as is, which is legal but dim).
    """
    if hasattr(x, "detach") and hasattr(x, "cpu"):  # torch, without importing it here
        x = x.detach().cpu().numpy()
    a = np.asarray(x)
    if a.ndim == 3:
        a = a[None]
    if a.ndim != 4:
        raise DataError(f"{what} must have 4 axes (B, H, W, C), got shape {a.shape}")
    if a.shape[-1] != channels and a.shape[1] == channels:
        a = a.transpose(0, 2, 3, 1)  # NCHW → NHWC
    if a.shape[-1] != channels:
        raise DataError(
            f"{what} of shape {a.shape} have no axis of {channels} channels "
            "(expected (B, H, W, C) or (B, C, H, W))"
        )
    if a.dtype == np.uint8:
        return from_uint8(a)
    if a.dtype.kind not in "fiu":
        raise DataError(f"{what} must be uint8 or floating point, got {a.dtype}")
    a = a.astype(np.float32)
    if a.size and not np.isfinite(a).all():
        raise DataError(f"{what} contain NaN or infinite values")
    lo, hi = (float(a.min()), float(a.max())) if a.size else (0.0, 0.0)
    if lo < -1.001 or hi > 1.001:
        raise DataError(
            f"{what} as floats must lie in [-1, 1], found [{lo:.3g}, {hi:.3g}]; "
            "pass uint8 for [0, 255] pixels or rescale with x / 127.5 - 1"
        )
    return np.clip(a, -1.0, 1.0)


class _ArrayImages:
    """A dataset over in-memory images, for ``BatchSource`` (crops, flips, epochs).

    ``BatchSource`` maps items from [0, 255] to [-1, 1]; uint8 input stays exact, float
    input is handed over on the [0, 255] scale as float32 (off by at most one ulp).
    """

    def __init__(self, images: np.ndarray):
        self.data = images if images.dtype == np.uint8 else (images + 1.0) * np.float32(127.5)

    def __len__(self) -> int:
        return len(self.data)

    def name(self, i: int) -> str:
        return f"images[{i}]"

    def __getitem__(self, i: int) -> np.ndarray:
        return self.data[i]


class ImageSource:
    """``batch(step)`` → (B, H, W, C) float32 in [-1, 1], a pure function of the step."""

    def __init__(
        self, cfg: Config, dataset=None, batch_fn: Callable | None = None, description: str = ""
    ):
        self.cfg, self.batch_fn, self.description = cfg, batch_fn, description
        self._pipeline = BatchSource(dataset, cfg, train=True) if dataset is not None else None
        self._fn_takes_step = batch_fn is not None and _accepts_one_argument(batch_fn)

    def batch(self, step: int) -> np.ndarray:
        m = self.cfg.model
        if self._pipeline is not None:
            return self._pipeline.batch(step)["images"]
        out = self.batch_fn(step) if self._fn_takes_step else self.batch_fn()
        if isinstance(out, Mapping):
            if "images" not in out:
                raise DataError(f"batch_fn returned a dict without 'images' (keys {sorted(out)})")
            out = out["images"]
        images = as_images(out, m.channels, "the images from batch_fn")
        want = (m.image_size, m.image_size)
        if images.shape[1:3] != want:
            raise DataError(
                f"batch_fn returned images of {images.shape[1]}×{images.shape[2]} "
                f"pixels; the tokenizer takes {want[0]}×{want[1]} (image_size)"
            )
        if images.shape[0] == 0:
            raise DataError("batch_fn returned an empty batch")
        return images


def _accepts_one_argument(fn: Callable) -> bool:
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):  # some builtins have no signature: pass the step
        return True
    try:
        sig.bind(0)
        return True
    except TypeError:
        return False


def make_source(opts: Mapping[str, Any], cfg: Config) -> ImageSource:
    given = [k for k in _SOURCES if opts.get(k) is not None]
    if len(given) > 1:
        raise ConfigError(
            f"give at most one image source, got {given}; choose one of {', '.join(_SOURCES)}"
        )
    m = cfg.model
    if opts.get("batch_fn") is not None:
        if not callable(opts["batch_fn"]):
            raise ConfigError(f"option 'batch_fn' must be callable, got {opts['batch_fn']!r}")
        return ImageSource(cfg, batch_fn=opts["batch_fn"], description="batch_fn")
    if m.channels != 3:
        raise ConfigError(
            f"the image pipeline (images, image_folder, synthetic) yields RGB, "
            f"so channels must be 3, got {m.channels}; use batch_fn for other data"
        )
    if opts.get("images") is not None:
        raw = opts["images"]
        if hasattr(raw, "detach") and hasattr(raw, "cpu"):
            raw = raw.detach().cpu().numpy()
        arr = np.asarray(raw)
        images = (
            arr
            if arr.dtype == np.uint8 and arr.ndim == 4 and arr.shape[-1] == 3
            else as_images(arr, 3, "option 'images'")
        )
        if images.shape[0] == 0:
            raise DataError("option 'images' holds no images")
        if min(images.shape[1:3]) < m.image_size:
            raise DataError(
                f"option 'images' are {images.shape[2]}×{images.shape[1]}, smaller "
                f"than the {m.image_size}×{m.image_size} crop (image_size)"
            )
        return ImageSource(
            cfg, dataset=_ArrayImages(images), description=f"{len(images)} in-memory images"
        )
    if opts.get("image_folder") is not None:
        folder = ImageFolder(opts["image_folder"], m.image_size)
        return ImageSource(
            cfg, dataset=folder, description=f"{len(folder)} images from {opts['image_folder']}"
        )
    count = _int(opts.get("synthetic_count", 1024), "synthetic_count", 1)
    return ImageSource(
        cfg,
        dataset=SyntheticImages(m.image_size, count, cfg.train.seed),
        description=f"{count} synthetic images",
    )


# ---------------------------------------------------------------------------- statistics
def latent_summary(h: np.ndarray) -> dict:
    """Latent tokens (B, L, d) → mean/std, per-token variance, and collapse indicators.

    ``collapse`` (= ``dead_dim_fraction``) is the fraction of latent dims whose variance is
    below ``COLLAPSE_REL_VAR`` × the median dim's; ``token_usage`` is the fraction of the L
    tokens that pass the same test, so 1.0 means every token carries information.
    """
    out = latent_stats(h)
    token_var = h.var(axis=(0, 2))  # (L,)
    ref = max(float(np.median(token_var)), 1e-12)
    out.update(
        token_var_min=float(token_var.min()),
        token_var_mean=float(token_var.mean()),
        token_var_max=float(token_var.max()),
        token_usage=float(np.mean(token_var >= COLLAPSE_REL_VAR * ref)),
        collapse=out["dead_dim_fraction"],
    )
    return out


_NOT_AVERAGED = {
    "iteration",
    "stage",
    "stage_step",
    "wanderer_step",
    "pretrain",
    "dead_end",
    "walk",
}


def walk_averages(records: list[dict]) -> dict:
    """``mean_<metric>`` over the iteration records (a metric absent from some is averaged
    over those that have it, e.g. the mask loss across a Stage-2 switch)."""
    keys = dict.fromkeys(k for r in records for k in r if k not in _NOT_AVERAGED)
    return {f"mean_{k}": float(np.mean([r[k] for r in records if k in r])) for k in keys}
