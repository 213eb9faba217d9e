"""``maetok diffusion``: a latent diffusion model on a tokenizer's CIFAR-10 latents.

    maetok diffusion train  --tokenizer CKPT --cifar DIR --out DIR [--preset small] ...
    maetok diffusion sample --checkpoint OUT/diffusion.safetensors [--num N] [--per-class] ...

``train`` encodes the CIFAR-10 training split with the tokenizer (once: the latents are
cached in the output folder under the tokenizer's sha256), normalises each latent channel
by its mean and std over the training set, and trains the DiT of ``maetok_jax.dit`` by flow
matching (``maetok_jax.flow``). ``sample`` integrates the EMA model from noise, undoes the
normalisation and decodes with the tokenizer the model was trained on. The JAX backend
runs both. Bad input is one ``maetok: error: …`` line with exit status 2 (``maetok.cli``).
"""

from __future__ import annotations

import itertools
import os
import uuid
from pathlib import Path

import numpy as np

from maetok import checkpoint as ckpt
from maetok.diffusion_config import PRESETS, SAMPLERS, preset
from maetok.diffusion_eval_cli import register as register_study_commands
from maetok.errors import CheckpointError, ConfigError, DataError, MAETokError

ENCODE_BATCH = 500  # images per tokenizer call when encoding the training split


# ------------------------------------------------------------------------------ tokenizer


def _tokenizer(path, use_ema: bool):
    """(config, JAX backend, device parameters, sha256) of a tokenizer checkpoint for CIFAR-10."""
    from maetok.cifar10 import SIZE
    from maetok.trainer import get_backend, params_from_checkpoint

    path = Path(path)
    cfg = ckpt.read_config(path)
    m = cfg.model
    if m.image_size != SIZE or m.channels != 3:
        raise ConfigError(
            f"tokenizer {path} works on {m.image_size}×{m.image_size}×{m.channels} "
            f"images; CIFAR-10 needs a tokenizer for {SIZE}×{SIZE}×3"
        )
    backend = get_backend("jax")(cfg)
    params = backend.to_device_tree(params_from_checkpoint(path, cfg, use_ema=use_ema))
    return cfg, backend, params, ckpt.file_sha256(path)


def _in_batches(fn, arrays: np.ndarray, batch: int, desc: str | None = None) -> np.ndarray:
    """``fn`` over fixed-size chunks of ``arrays`` (the last one padded: one compiled shape)."""
    from tqdm import tqdm

    outs = []
    for i in tqdm(
        range(0, len(arrays), batch), desc=desc, unit="batch", disable=desc is None, leave=False
    ):
        chunk = arrays[i : i + batch]
        pad = batch - len(chunk)
        if pad:
            chunk = np.concatenate([chunk, np.repeat(chunk[-1:], pad, axis=0)])
        outs.append(fn(chunk)[: batch - pad])
    return np.concatenate(outs)


def _latents(args, backend, params, sha: str, out: Path) -> tuple[np.ndarray, np.ndarray]:
    """The tokenizer's latents (N, L, h) of the CIFAR-10 training split and its labels (N,)."""
    from maetok.cifar10 import load_split
    from maetok.data import from_uint8

    cache = out / f"latents-{sha[:16]}{'-ema' if args.ema else ''}.npz"
    if cache.is_file():
        with np.load(cache) as f:
            return f["latents"], f["labels"]
    images, labels = load_split("train", source=args.cifar, cache=args.cache)
    latents = _in_batches(
        lambda x: backend.encode(params, from_uint8(x)),
        images,
        ENCODE_BATCH,
        desc="encoding CIFAR-10 train",
    )
    tmp = out / f".{cache.stem}.{uuid.uuid4().hex[:12]}.npz"  # complete or absent
    try:
        np.savez(tmp, latents=latents, labels=labels)
        os.replace(tmp, cache)
    finally:
        tmp.unlink(missing_ok=True)
    return latents, labels


# ---------------------------------------------------------------------------------- train


def _config(args, m):
    from maetok.cli import _overrides

    changes = {}
    for pair in args.set or []:
        # the flat config has no sections: ``lr=3e-4`` is read as ``diffusion.lr=3e-4``
        changes.update(_overrides([f"diffusion.{pair}"])["diffusion"])
    for flag in ("steps", "batch_size", "seed"):
        if getattr(args, flag) is not None:
            changes[flag] = getattr(args, flag)
    for field, value in (("num_tokens", m.num_latent_tokens), ("token_dim", m.latent_dim)):
        if field in changes and changes[field] != value:
            raise ConfigError(f"diffusion.{field} is fixed by the tokenizer ({value})")
        changes[field] = value
    return preset(args.preset, **changes)


def cmd_train(args) -> int:
    from maetok_jax import diffusion_train as dtrain

    out = Path(args.out)
    path = out / dtrain.CHECKPOINT_NAME
    tok_cfg, backend, params, sha = _tokenizer(args.tokenizer, args.ema)
    if args.resume:
        if not path.exists():
            raise MAETokError(f"--resume: no checkpoint at {path}; train without --resume first")
        tree, cfg, meta = ckpt.load_diffusion(path)
        if meta.get("tokenizer_sha256") != sha or bool(meta.get("tokenizer_ema")) != args.ema:
            raise CheckpointError(
                f"--resume: {path} was trained on tokenizer "
                f"{meta.get('tokenizer')} (sha256 {meta.get('tokenizer_sha256')}"
                f", ema {meta.get('tokenizer_ema')}), not on {args.tokenizer} "
                f"(sha256 {sha}, ema {args.ema})"
            )
        if args.set or args.batch_size is not None or args.seed is not None:
            raise ConfigError("--resume continues the stored config; only --steps may change")
        if args.steps is not None:
            cfg = cfg.replace(steps=args.steps)
        norm = tree["norm"]
    else:
        if path.exists():
            raise MAETokError(
                f"{out} already holds a diffusion checkpoint; pass --resume to "
                "continue it or choose another --out"
            )
        cfg = _config(args, tok_cfg.model)
        norm = None
    out.mkdir(parents=True, exist_ok=True)
    latents, labels = _latents(args, backend, params, sha, out)
    if labels.min() < 0 or labels.max() >= cfg.num_classes:
        raise DataError(
            f"labels must lie in [0, {cfg.num_classes}), found [{labels.min()}, {labels.max()}]"
        )
    if norm is None:
        norm = dtrain.latent_norm(latents)
    (out / "diffusion_config.json").write_text(cfg.to_json())
    meta = {
        "tokenizer": str(Path(args.tokenizer).resolve()),
        "tokenizer_sha256": sha,
        "tokenizer_ema": args.ema,
    }
    print(
        f"maetok: diffusion on {len(latents)} latents {latents.shape[1:]} for {cfg.steps} "
        f"steps, batch {cfg.batch_size}, width {cfg.width}, depth {cfg.depth} → {out}"
    )
    normalised = (latents - norm["mean"]) / norm["std"]
    last = dtrain.fit(
        cfg, normalised, labels, norm, out, meta, resume=args.resume, progress=not args.no_progress
    )
    if last:
        print(
            f"maetok: done at step {last['step'] + 1}: loss {last['loss']:.4f}, "
            f"{last['samples_per_s']:.0f} samples/s; checkpoint {path}"
        )
    return 0


# --------------------------------------------------------------------------------- sample


def cmd_sample(args) -> int:
    import jax

    from maetok.cifar10 import CLASSES
    from maetok.data import to_uint8
    from maetok.viz import save_class_grid
    from maetok_jax import diffusion_train as dtrain
    from maetok_jax.flow import sample

    tree, cfg, meta = ckpt.load_diffusion(args.checkpoint, dtrain.expected_layout)
    if args.num <= 0 or args.batch_size <= 0:
        raise ConfigError(
            f"--num and --batch-size must be positive, got {args.num} and {args.batch_size}"
        )
    if args.steps is not None and args.steps <= 0:
        raise ConfigError(f"--steps must be positive, got {args.steps}")
    if args.guidance is not None and args.guidance < 0:
        raise ConfigError(f"--guidance must be >= 0, got {args.guidance}")
    tokenizer = args.tokenizer or meta.get("tokenizer")
    _, backend, tok_params, sha = _tokenizer(tokenizer, bool(meta.get("tokenizer_ema")))
    if sha != meta.get("tokenizer_sha256"):
        trained_on = str(meta.get("tokenizer_sha256", "?"))[:16]
        raise CheckpointError(
            f"tokenizer {tokenizer} (sha256 {sha[:16]}…) is not the one this "
            f"model was trained on (sha256 {trained_on}…)"
        )

    n = args.num * cfg.num_classes if args.per_class else args.num
    labels = np.arange(n) // args.num if args.per_class else np.arange(n) % cfg.num_classes
    labels = labels.astype(np.int32)
    sampler = args.sampler or cfg.sampler
    steps = args.steps or cfg.sample_steps
    guidance = cfg.guidance if args.guidance is None else args.guidance
    ema = jax.tree_util.tree_map(jax.numpy.asarray, tree["ema"])
    root = jax.random.key(args.seed)
    calls = itertools.count()  # batch i draws its noise from fold_in(key(seed), i)

    def generate(chunk):  # normalised latents → tokenizer latents → images in [-1, 1]
        key = jax.random.fold_in(root, next(calls))
        z = np.asarray(sample(ema, key, chunk, cfg, sampler, steps, guidance))
        return backend.decode(tok_params, z * tree["norm"]["std"] + tree["norm"]["mean"])

    images = to_uint8(
        _in_batches(
            generate,
            labels,
            min(args.batch_size, n),
            desc=f"sampling ({sampler}, {steps} steps, g={guidance})",
        )
    )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    np.savez(out, images=images, labels=labels)
    msg = f"maetok: wrote {n} samples ({images.shape}) to {out}"
    if args.grid:
        save_class_grid(args.grid, images, labels, CLASSES[: cfg.num_classes])
        msg += f" and a grid to {args.grid}"
    print(msg)
    return 0


# --------------------------------------------------------------------------------- parser


def add_parser(subparsers) -> None:
    """Mount ``maetok diffusion {prepare, classifier, train, sample, eval}`` on the main
    command's sub-parsers."""
    parser = subparsers.add_parser(
        "diffusion",
        help="latent diffusion on a tokenizer's "
        "CIFAR-10 latents: prepare, classifier, train, sample, eval",
    )
    sub = parser.add_subparsers(dest="diffusion_command", required=True)

    p = sub.add_parser("train", help="encode CIFAR-10 train with a tokenizer, train a DiT on it")
    p.add_argument("--tokenizer", required=True, help="tokenizer checkpoint (.safetensors)")
    p.add_argument("--ema", action="store_true", help="use the tokenizer's EMA parameters")
    p.add_argument(
        "--cifar",
        required=True,
        help="CIFAR-10 folder holding train_jpg.tar.gz and test_png.tar.gz",
    )
    p.add_argument("--cache", help="where CIFAR-10 is unpacked (default: ~/.cache/maetok/cifar10)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--preset", choices=sorted(PRESETS), default="small")
    p.add_argument("--steps", type=int)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--seed", type=int)
    p.add_argument(
        "--set",
        action="append",
        metavar="FIELD=VALUE",
        help="override any DiffusionConfig field, e.g. --set lr=1e-4 (repeatable)",
    )
    p.add_argument("--resume", action="store_true", help="continue OUT/diffusion.safetensors")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(fn=cmd_train)

    p = sub.add_parser("sample", help="sample images with the EMA model, decoded by the tokenizer")
    p.add_argument("--checkpoint", required=True, help="OUT/diffusion.safetensors")
    p.add_argument(
        "--tokenizer",
        help="tokenizer checkpoint (default: the path stored in the "
        "checkpoint; its sha256 must match)",
    )
    p.add_argument(
        "--num", type=int, default=100, help="number of samples, labels cycling over the classes"
    )
    p.add_argument("--per-class", action="store_true", help="--num samples of every class")
    p.add_argument("--sampler", choices=SAMPLERS, help="default: the config's")
    p.add_argument("--steps", type=int, help="ODE steps (default: the config's)")
    p.add_argument(
        "--guidance", type=float, help="classifier-free guidance scale (default: the config's)"
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=500, help="samples per compiled call")
    p.add_argument("--out", default="samples.npz", help="npz with images uint8 (N,32,32,3), labels")
    p.add_argument("--grid", help="PNG with one row per class")
    p.set_defaults(fn=cmd_sample)

    register_study_commands(sub)  # prepare, classifier, eval
