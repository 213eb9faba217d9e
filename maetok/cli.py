"""The ``maetok`` command line: train, reconstruct, encode, decode, eval.

Every command takes ``--backend jax|torch`` (JAX by default). A problem with the user's
input (config, data, checkpoint, a NaN loss) is printed as one line, ``maetok: error: …``,
with exit status 2; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from maetok.config import PRESETS, Config, preset
from maetok.errors import ConfigError, DataError, MAETokError


def _parse_value(text: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def _overrides(pairs: list[str]) -> dict:
    """``["train.lr=3e-4", "loss.use_adv=true"]`` → {"train": {"lr": 3e-4}, "loss": {...}}."""
    out: dict = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        section, dot, name = key.partition(".")
        if not sep or not dot:
            raise ConfigError(f"--set expects SECTION.FIELD=VALUE (e.g. train.lr=3e-4), got {pair!r}")
        out.setdefault(section, {})[name] = _parse_value(value)
    return out


def _train_config(args) -> Config:
    if args.config:
        try:
            cfg = Config.from_json(Path(args.config).read_text())
        except OSError as e:
            raise ConfigError(f"cannot read --config {args.config}: {e.strerror}") from e
    else:
        cfg = preset(args.preset)
    changes = _overrides(args.set or [])
    train = changes.setdefault("train", {})
    for flag, field in (("steps", "steps"), ("batch_size", "batch_size"), ("stage", "stage"),
                        ("lr", "lr"), ("seed", "seed")):
        if getattr(args, flag) is not None:
            train[field] = getattr(args, flag)
    if args.dtype:
        changes.setdefault("model", {})["compute_dtype"] = args.dtype
    if args.image_size:
        changes.setdefault("model", {})["image_size"] = args.image_size
    if args.stage == 2 and "anneal_steps" not in train and args.steps:
        train["anneal_steps"] = args.steps
    return cfg.replace(**{k: v for k, v in changes.items() if v})


def _dataset(data: str | None, cfg: Config):
    from maetok.data import ImageFolder, SyntheticImages
    if data is None:
        return SyntheticImages(cfg.model.image_size, seed=cfg.train.seed)
    return ImageFolder(data, cfg.model.image_size)


def cmd_train(args) -> int:
    from maetok import checkpoint as ckpt
    from maetok.trainer import CHECKPOINT_NAME, train

    out = Path(args.out)
    if args.compile and args.backend != "torch":
        raise ConfigError("--compile applies to --backend torch; the JAX step is always "
                          "jit-compiled")
    if args.resume:
        path = out / CHECKPOINT_NAME
        if not path.exists():
            raise MAETokError(f"--resume: no checkpoint at {path}; train without --resume first")
        cfg = ckpt.read_config(path)
        if args.steps is not None:
            cfg = cfg.replace(train={"steps": args.steps})
    else:
        cfg = _train_config(args)
        if (out / CHECKPOINT_NAME).exists() and not args.overwrite:
            raise MAETokError(f"{out} already holds a checkpoint; pass --resume to continue it, "
                              "--overwrite to start again, or choose another --out")
        if args.overwrite and (out / "metrics.jsonl").exists():
            (out / "metrics.jsonl").unlink()
        if cfg.train.stage == 2 and not args.init_from:
            raise ConfigError("stage 2 starts from a Stage-1 checkpoint: pass --init-from PATH")
    dataset = _dataset(args.data, cfg)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2))
    print(f"maetok: training stage {cfg.train.stage} for {cfg.train.steps} steps, batch "
          f"{cfg.train.batch_size}, {type(dataset).__name__} ({len(dataset)} images), "
          f"backend {args.backend} → {out}")
    last = train(cfg, dataset, out, args.backend, init_from=args.init_from, resume=args.resume,
                 progress=not args.no_progress, device=args.device, compile=args.compile,
                 devices=args.devices, shard_params=args.shard_params)
    if last:
        print(f"maetok: done at step {int(last['step']) + 1}: loss {last['loss']:.4f}, "
              f"rec {last['rec']:.4f}, {last['images_per_s']:.1f} images/s"
              + (f", peak device memory {last['peak_memory_gib']:.2f} GiB"
                 if "peak_memory_gib" in last else "")
              + f"; checkpoint {out / CHECKPOINT_NAME}")
    return 0


def _load_for_inference(args):
    from maetok import checkpoint as ckpt
    from maetok.trainer import get_backend, params_from_checkpoint

    cfg = ckpt.read_config(args.checkpoint)
    backend = get_backend(args.backend)(cfg, args.device)
    params = params_from_checkpoint(args.checkpoint, cfg, use_ema=args.ema)
    return cfg, backend, backend.to_device_tree(params)


def _batches(n: int, size: int):
    for i in range(0, n, size):
        yield slice(i, min(n, i + size))


def cmd_reconstruct(args) -> int:
    from maetok.data import load_eval_images, save_images
    from maetok.evaluate import reconstruct_all

    cfg, backend, params = _load_for_inference(args)
    images, names = load_eval_images(args.input, cfg.model.image_size)
    recon = reconstruct_all(backend, params, images, args.batch_size, args.mask_ratio, args.seed)
    save_images(args.out, recon, [Path(n).stem + ".png" for n in names])
    print(f"maetok: wrote {len(names)} reconstructions to {args.out}")
    return 0


def cmd_encode(args) -> int:
    from maetok.data import load_eval_images

    cfg, backend, params = _load_for_inference(args)
    images, names = load_eval_images(args.input, cfg.model.image_size)
    latents = np.concatenate([backend.encode(params, images[sl])
                              for sl in _batches(len(images), args.batch_size)])
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    np.save(out, latents)
    out.with_suffix(".json").write_text(json.dumps({"names": names, "shape": list(latents.shape)}))
    print(f"maetok: wrote latents {latents.shape} to {out} (names in {out.with_suffix('.json')})")
    return 0


def cmd_decode(args) -> int:
    from maetok.data import save_images

    cfg, backend, params = _load_for_inference(args)
    try:
        latents = np.load(args.latents)
    except (OSError, ValueError) as e:
        raise DataError(f"cannot read latents {args.latents}: {e}") from e
    want = (cfg.model.num_latent_tokens, cfg.model.latent_dim)
    if latents.ndim != 3 or latents.shape[1:] != want:
        raise DataError(f"latents {args.latents} have shape {latents.shape}; this checkpoint "
                        f"expects (B, {want[0]}, {want[1]})")
    if not np.isfinite(latents).all():
        raise DataError(f"latents {args.latents} contain NaN or infinite values")
    meta = Path(args.latents).with_suffix(".json")
    names = json.loads(meta.read_text())["names"] if meta.exists() else None
    if not names or len(names) != len(latents):
        names = [f"{i:05d}" for i in range(len(latents))]
    images = np.concatenate([backend.decode(params, latents[sl])
                             for sl in _batches(len(latents), args.batch_size)])
    save_images(args.out, images, [Path(n).stem + ".png" for n in names])
    print(f"maetok: decoded {len(images)} images to {args.out}")
    return 0


def cmd_eval(args) -> int:
    from maetok.evaluate import evaluate

    cfg, backend, params = _load_for_inference(args)
    out = args.out or Path(args.checkpoint).parent / "eval"
    ratios = _ratios(args.mask_ratios)
    evaluate(cfg, backend, params, args.data, out, batch_size=args.batch_size,
             mask_ratios=ratios)
    return 0


def _ratios(text: str) -> tuple[float, ...]:
    try:
        ratios = tuple(float(r) for r in text.split(",") if r.strip())
    except ValueError:
        raise ConfigError(f"--mask-ratios takes numbers separated by commas, got {text!r}")
    bad = [r for r in ratios if not 0.0 <= r <= 1.0]
    if bad:
        raise ConfigError(f"--mask-ratios must lie in [0, 1], got {bad}")
    return ratios


def _common(p, checkpoint: bool = True):
    p.add_argument("--backend", choices=("jax", "torch"), default="jax")
    p.add_argument("--device", default=None, help="torch device (cpu, cuda); default: best available")
    if checkpoint:
        p.add_argument("--checkpoint", required=True, help="a .safetensors checkpoint")
        p.add_argument("--ema", action="store_true", help="use the EMA parameters")
        p.add_argument("--batch-size", type=int, default=16)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="maetok", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train a tokenizer (stage 1, or stage 2 from a checkpoint)")
    _common(p, checkpoint=False)
    p.add_argument("--preset", choices=sorted(PRESETS), default="tiny")
    p.add_argument("--config", help="a JSON config (as written to OUT/config.json) instead of --preset")
    p.add_argument("--data", help="image folder (jpg/png); default: the built-in synthetic images")
    p.add_argument("--out", default="runs/maetok", help="output folder")
    p.add_argument("--steps", type=int)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--stage", type=int, choices=(1, 2))
    p.add_argument("--lr", type=float)
    p.add_argument("--seed", type=int)
    p.add_argument("--dtype", choices=("float32", "bfloat16"), help="compute dtype")
    p.add_argument("--image-size", type=int, help="crop size (a multiple of the patch size)")
    p.add_argument("--init-from", help="stage 2: the Stage-1 checkpoint to start from")
    p.add_argument("--resume", action="store_true", help="continue OUT/checkpoint.safetensors")
    p.add_argument("--overwrite", action="store_true", help="start afresh over an existing OUT")
    p.add_argument("--set", action="append", metavar="SECTION.FIELD=VALUE",
                   help="override any config field, e.g. --set loss.use_adv=true (repeatable)")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--compile", action="store_true",
                   help="torch: run the train step under torch.compile (minutes to compile; "
                        "the fastest path on a GPU). The JAX step is always jit-compiled")
    p.add_argument("--devices", type=int, metavar="N",
                   help="data parallelism over N devices. JAX: the mesh size per process "
                        "(default: every local device). torch: one process per device, "
                        "launched with torchrun --nproc_per_node N; the count comes from "
                        "torchrun and --devices, if given, must match it")
    p.add_argument("--shard-params", action="store_true",
                   help="JAX: shard parameters and optimiser state over the devices (FSDP) "
                        "instead of a full copy per device")
    p.set_defaults(fn=cmd_train)

    p = sub.add_parser("reconstruct", help="images in → reconstructions out (PNG)")
    _common(p)
    p.add_argument("--input", required=True, help="image folder")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--mask-ratio", type=float, default=0.0, help="mask this fraction of tokens")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(fn=cmd_reconstruct)

    p = sub.add_parser("encode", help="images → latent tokens (.npy, B×L×latent_dim)")
    _common(p)
    p.add_argument("--input", required=True, help="image folder")
    p.add_argument("--out", required=True, help="output .npy file")
    p.set_defaults(fn=cmd_encode)

    p = sub.add_parser("decode", help="latent tokens (.npy) → images (PNG)")
    _common(p)
    p.add_argument("--latents", required=True, help=".npy written by `maetok encode`")
    p.add_argument("--out", required=True, help="output folder")
    p.set_defaults(fn=cmd_decode)

    p = sub.add_parser("eval", help="PSNR/SSIM on centre crops of a folder, with a picture sheet")
    _common(p)
    p.add_argument("--data", required=True, help="image folder")
    p.add_argument("--out", help="folder for eval.json and the sheet (default: next to the checkpoint)")
    p.add_argument("--mask-ratios", default="", metavar="R,R,...",
                   help="also report PSNR with this fraction of tokens masked (e.g. 0.1,0.5): "
                        "shows how the encoder depends on the mask tokens it was trained with")
    p.set_defaults(fn=cmd_eval)

    from maetok.parity import add_parser as add_parity_parser
    add_parity_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.fn(args)
    except MAETokError as e:
        lines = [line.strip() for line in str(e).splitlines() if line.strip()]
        print(f"maetok: error: {' '.join(lines)}", file=sys.stderr)  # always one line
        return 2
    except KeyboardInterrupt:
        print("maetok: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
