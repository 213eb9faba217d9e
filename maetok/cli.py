"""The ``maetok`` command line: train, reconstruct, encode, decode, eval, export, diffusion.

Every command takes ``--backend jax|torch`` (JAX by default). A problem with the user's
input (arguments, config, data, checkpoint, a NaN loss) or with the machine (a full disk)
is printed as one line, ``maetok: error: …``, with exit status 2; anything else is a bug
and keeps its traceback. ``train`` stopped by SIGTERM or SIGINT saves a checkpoint first
and exits with 128 + the signal number.
"""

from __future__ import annotations

import argparse
import json
import sys
from contextlib import nullcontext
from pathlib import Path

import numpy as np

from maetok.config import PRESETS, Config, preset
from maetok.errors import ConfigError, DataError, MAETokError, TrainingStopped


def _parse_value(text: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def config_overrides(items, what: str = "a config key") -> dict:
    """``[("train.lr", 3e-4), ("loss.use_adv", True)]`` → {"train": {"lr": 3e-4}, "loss": {...}}.

    The one reader of ``SECTION.FIELD`` keys: ``--set`` and the Marble plugin's options.
    Sections and fields are checked when the result reaches ``Config.replace``.
    """
    out: dict = {}
    for key, value in items:
        section, dot, name = str(key).partition(".")
        if not dot:
            raise ConfigError(f"{what} must be SECTION.FIELD (e.g. train.lr), got {key!r}")
        out.setdefault(section, {})[name] = value
    return out


def _overrides(pairs: list[str]) -> dict:
    """``["train.lr=3e-4", "loss.use_adv=true"]`` → {"train": {"lr": 3e-4}, "loss": {...}}."""
    items = []
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or "." not in key:
            raise ConfigError(
                f"--set expects SECTION.FIELD=VALUE (e.g. train.lr=3e-4), got {pair!r}"
            )
        items.append((key, _parse_value(value)))
    return config_overrides(items)


def _changes(args) -> dict:
    """The config fields the user set: ``--set`` and the flags that stand for one."""
    changes = _overrides(args.set or [])
    train = changes.setdefault("train", {})
    for flag, field in (
        ("steps", "steps"),
        ("batch_size", "batch_size"),
        ("stage", "stage"),
        ("lr", "lr"),
        ("seed", "seed"),
    ):
        if getattr(args, flag) is not None:
            train[field] = getattr(args, flag)
    if getattr(args, "nondeterministic", False):
        train["deterministic"] = False
    if args.dtype:
        changes.setdefault("model", {})["compute_dtype"] = args.dtype
    if args.image_size:
        changes.setdefault("model", {})["image_size"] = args.image_size
    return {k: v for k, v in changes.items() if v}


def _base_config(args) -> tuple[Config | None, str]:
    """The whole config given by --config or --preset (None if neither), and which flag."""
    if args.config and args.preset:
        raise ConfigError("--config and --preset each give a whole config; pass only one")
    if args.config:
        try:
            text = Path(args.config).read_text()
        except OSError as e:
            raise ConfigError(f"cannot read --config {args.config}: {e.strerror}") from e
        try:
            return Config.from_json(text), f"--config {args.config}"
        except ConfigError as e:
            raise ConfigError(f"--config {args.config}: {e}") from e
    if args.preset:
        return preset(args.preset), f"--preset {args.preset}"
    return None, ""


def _train_config(args) -> Config:
    cfg = _base_config(args)[0] or preset("tiny")
    changes = _changes(args)
    train = changes.setdefault("train", {})
    if args.stage == 2 and "anneal_steps" not in train and args.steps:
        train["anneal_steps"] = args.steps
    return cfg.replace(**changes)


def cmd_train(args) -> int:
    from maetok import checkpoint as ckpt
    from maetok import run
    from maetok.trainer import CHECKPOINT_NAME, train

    out, progress = Path(args.out), not args.no_progress
    if args.resume:
        for flag in ("overwrite", "init_from"):
            if getattr(args, flag):
                raise ConfigError(
                    f"--resume continues the run in --out as it is; it does not "
                    f"take --{flag.replace('_', '-')}"
                )
    else:
        cfg = _train_config(args)  # a bad setting fails before --out is touched
        if args.change:
            raise ConfigError("--change applies to --resume only")
        if cfg.train.stage == 2 and not args.init_from:
            raise ConfigError("stage 2 starts from a Stage-1 checkpoint: pass --init-from PATH")
    # Several processes (torchrun): the first holds and writes --out, the rest only compute.
    writer = run.is_writer_process()
    say = print if writer else (lambda *_: None)
    with run.claim(out) if writer else nullcontext():
        changes = None
        if args.resume:  # --devices, --shard-params: free; a checkpoint resumes on any count
            base, base_flag = _base_config(args)
            resumed = run.resume(
                out,
                _changes(args),
                base=base,
                base_flag=base_flag,
                data=args.data,
                backend=args.backend,
                allow=tuple(args.change or ()),
                skip_broken=args.skip_broken,
                progress=progress and writer,
            )
            cfg, dataset, backend, changes = (
                resumed.cfg,
                resumed.dataset,
                resumed.backend,
                resumed.changes,
            )
            at = f" at step {resumed.step}" if resumed.step is not None else ""
            say(
                f"maetok: resuming {out}{at}"
                + (
                    f" with {run.describe_changes(changes)} (recorded in the run's history)"
                    if changes
                    else ""
                )
            )
        else:
            if (out / CHECKPOINT_NAME).exists() and not args.overwrite:
                raise MAETokError(
                    f"{out} already holds a checkpoint; pass --resume to continue "
                    "it, --overwrite to start again, or choose another --out"
                )
            dataset = run.open_dataset(args.data, cfg, args.skip_broken, progress and writer)
            backend = args.backend or "jax"
        if args.compile and backend != "torch":
            raise ConfigError(
                "--compile applies to --backend torch; the JAX step is always jit-compiled"
            )
        say(
            f"maetok: training stage {cfg.train.stage} for {cfg.train.steps} steps, batch "
            f"{cfg.train.batch_size}, {type(dataset).__name__} ({len(dataset)} images), "
            f"backend {backend} → {out}"
        )
        try:
            last = train(
                cfg,
                dataset,
                out,
                backend,
                init_from=args.init_from,
                resume=resumed.checkpoint if args.resume else False,
                progress=progress,
                device=args.device,
                compile=args.compile,
                devices=args.devices,
                shard_params=args.shard_params,
                changes=changes,
            )
        except TrainingStopped as e:
            if writer:
                raise
            return 128 + e.signum  # the writer says where its checkpoint is
    if last and writer:
        print(
            f"maetok: done at step {int(last['step']) + 1}: loss {last['loss']:.4f}, "
            f"rec {last['rec']:.4f}, {last['images_per_s']:.1f} images/s"
            + (
                f", peak device memory {last['peak_memory_gib']:.2f} GiB"
                if "peak_memory_gib" in last
                else ""
            )
            + f"; checkpoint {out / CHECKPOINT_NAME} (tensors sha256 "
            f"{ckpt.tensor_digest(out / CHECKPOINT_NAME)[:16]})"
        )
    return 0


def _folder_out(path: str) -> Path:
    """An output folder argument that is not an existing file."""
    out = Path(path)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} is a file, not a folder; choose a folder")
    return out


def _checked_params(args):
    """The config and parameters (numpy) of --checkpoint (a training checkpoint or an
    exported file; the shipped tokenizer when not given), checked before any backend loads."""
    from maetok.pretrained import load_params, resolve

    args.checkpoint = resolve(args.checkpoint)
    return load_params(args.checkpoint, use_ema=args.ema)


def _on_backend(args, cfg, params):
    """The backend chosen by --backend/--device and ``params`` on its device."""
    from maetok.trainer import get_backend

    backend = get_backend(args.backend)(cfg, args.device)
    return backend, backend.to_device_tree(params)


def _batches(n: int, size: int):
    for i in range(0, n, size):
        yield slice(i, min(n, i + size))


def cmd_reconstruct(args) -> int:
    from maetok.data import load_eval_images, save_images
    from maetok.evaluate import reconstruct_all

    out = _folder_out(args.out)
    cfg, params = _checked_params(args)
    images, names = load_eval_images(args.input, cfg.model.image_size, args.skip_broken)
    backend, params = _on_backend(args, cfg, params)
    recon = reconstruct_all(backend, params, images, args.batch_size, args.mask_ratio, args.seed)
    save_images(out, recon, [Path(n).stem + ".png" for n in names])
    print(f"maetok: wrote {len(names)} reconstructions to {out}")
    return 0


def cmd_encode(args) -> int:
    from maetok.data import load_eval_images

    out = Path(args.out)
    if out.is_dir():
        raise ConfigError(f"--out {out} is a folder; encode writes one .npy file")
    cfg, params = _checked_params(args)
    images, names = load_eval_images(args.input, cfg.model.image_size, args.skip_broken)
    backend, params = _on_backend(args, cfg, params)
    latents = np.concatenate(
        [backend.encode(params, images[sl]) for sl in _batches(len(images), args.batch_size)]
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    np.save(out, latents)
    out.with_suffix(".json").write_text(json.dumps({"names": names, "shape": list(latents.shape)}))
    print(f"maetok: wrote latents {latents.shape} to {out} (names in {out.with_suffix('.json')})")
    return 0


def cmd_decode(args) -> int:
    from maetok.data import save_images

    out = _folder_out(args.out)
    cfg, params = _checked_params(args)
    try:
        latents = np.load(args.latents)
    except (OSError, ValueError) as e:
        raise DataError(f"cannot read latents {args.latents}: {e}") from e
    want = (cfg.model.num_latent_tokens, cfg.model.latent_dim)
    if latents.ndim != 3 or latents.shape[1:] != want:
        raise DataError(
            f"latents {args.latents} have shape {latents.shape}; this checkpoint "
            f"expects (B, {want[0]}, {want[1]})"
        )
    if not np.isfinite(latents).all():
        raise DataError(f"latents {args.latents} contain NaN or infinite values")
    meta = Path(args.latents).with_suffix(".json")
    names = json.loads(meta.read_text())["names"] if meta.exists() else None
    if not names or len(names) != len(latents):
        names = [f"{i:05d}" for i in range(len(latents))]
    backend, params = _on_backend(args, cfg, params)
    images = np.concatenate(
        [backend.decode(params, latents[sl]) for sl in _batches(len(latents), args.batch_size)]
    )
    save_images(out, images, [Path(n).stem + ".png" for n in names])
    print(f"maetok: decoded {len(images)} images to {out}")
    return 0


def cmd_eval(args) -> int:
    from maetok.evaluate import evaluate

    ratios = _ratios(args.mask_ratios)
    cfg, params = _checked_params(args)
    out = _folder_out(args.out or Path(args.checkpoint).parent / "eval")
    backend, params = _on_backend(args, cfg, params)
    evaluate(
        cfg,
        backend,
        params,
        args.data,
        out,
        batch_size=args.batch_size,
        mask_ratios=ratios,
        skip_broken=args.skip_broken,
    )
    return 0


def cmd_export(args) -> int:
    from maetok.pretrained import export_weights

    out = Path(args.out)
    if out.is_dir():
        raise ConfigError(f"--out {out} is a folder; export writes one .safetensors file")
    path = export_weights(args.checkpoint, out, use_ema=args.ema)
    print(
        f"maetok: wrote {path} ({path.stat().st_size / 2**20:.1f} MiB: encoder and decoder, "
        f"{'EMA' if args.ema else 'raw'} weights, float16)"
    )
    return 0


def _ratios(text: str) -> tuple[float, ...]:
    try:
        ratios = tuple(float(r) for r in text.split(",") if r.strip())
    except ValueError as e:
        raise ConfigError(f"--mask-ratios takes numbers separated by commas, got {text!r}") from e
    bad = [r for r in ratios if not 0.0 <= r <= 1.0]
    if bad:
        raise ConfigError(f"--mask-ratios must lie in [0, 1], got {bad}")
    return ratios


class _Parser(argparse.ArgumentParser):
    """argparse that reports a bad argument as one ``maetok: error:`` line, exit status 2."""

    def error(self, message):
        self.exit(2, f"maetok: error: {message} (see {self.prog} --help)\n")


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from e
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _ratio(text: str) -> float:
    try:
        value = float(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1], got {text!r}") from e
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"must lie in [0, 1], got {text}")
    return value


def _common(p, checkpoint: bool = True):
    p.add_argument(
        "--backend",
        choices=("jax", "torch"),
        default=None if not checkpoint else "jax",
        help="default: jax (train --resume: the run's own backend)",
    )
    p.add_argument(
        "--device",
        default=None,
        help="cpu or cuda (torch: also cuda:N; JAX: the platform, e.g. cpu, cuda, "
        "tpu); default: the best available",
    )
    if checkpoint:
        p.add_argument(
            "--checkpoint",
            help="a `maetok train` checkpoint or a `maetok export` file (default: the "
            "pretrained tokenizer shipped with the package, if this installation has one)",
        )
        p.add_argument("--ema", action="store_true", help="use the EMA parameters")
        p.add_argument("--batch-size", type=_positive_int, default=16)


def _skip_broken(p):
    p.add_argument(
        "--skip-broken",
        action="store_true",
        help="leave out images that cannot be decoded (counted in a warning) "
        "instead of stopping with their name",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="maetok", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train a tokenizer (stage 1, or stage 2 from a checkpoint)")
    _common(p, checkpoint=False)
    p.add_argument("--preset", choices=sorted(PRESETS), help="default: tiny")
    p.add_argument(
        "--config", help="a JSON config (as written to OUT/config.json) instead of --preset"
    )
    p.add_argument(
        "--data",
        help="image folder (jpg/png); default: the built-in synthetic images "
        "(with --resume: the run's own data)",
    )
    _skip_broken(p)
    p.add_argument("--out", default="runs/maetok", help="output folder")
    p.add_argument("--steps", type=int)
    p.add_argument("--batch-size", type=_positive_int)
    p.add_argument("--stage", type=int, choices=(1, 2))
    p.add_argument("--lr", type=float)
    p.add_argument("--seed", type=int)
    p.add_argument("--dtype", choices=("float32", "bfloat16"), help="compute dtype")
    p.add_argument("--image-size", type=int, help="crop size (a multiple of the patch size)")
    p.add_argument("--init-from", help="stage 2: the Stage-1 checkpoint to start from")
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue the run in OUT exactly: its config, data and backend; fields "
        "given with --set (or --lr, --steps, ...) change on purpose and are "
        "recorded in the run's history",
    )
    p.add_argument(
        "--change",
        action="append",
        choices=("data", "backend"),
        help="with --resume: accept a --data or --backend other than the run's",
    )
    p.add_argument("--overwrite", action="store_true", help="start afresh over an existing OUT")
    p.add_argument(
        "--set",
        action="append",
        metavar="SECTION.FIELD=VALUE",
        help="override any config field, e.g. --set loss.use_adv=true (repeatable)",
    )
    p.add_argument("--no-progress", action="store_true")
    p.add_argument(
        "--nondeterministic",
        action="store_true",
        help="let the GPU pick its fastest kernels, some of which (atomics, autotuning) "
        "give slightly different results run to run; by default training is "
        "reproducible (train.deterministic)",
    )
    p.add_argument(
        "--compile",
        action="store_true",
        help="torch: run the train step under torch.compile (one transformer block "
        "compiled, about 30 s on a GPU; the fastest torch path). The JAX step is always "
        "jit-compiled",
    )
    p.add_argument(
        "--devices",
        type=int,
        metavar="N",
        help="data parallelism over N devices. JAX: the mesh size per process "
        "(default: every local device). torch: one process per device, "
        "launched with torchrun --nproc_per_node N; the count comes from "
        "torchrun and --devices, if given, must match it",
    )
    p.add_argument(
        "--shard-params",
        action="store_true",
        help="JAX: shard parameters and optimiser state over the devices (FSDP) "
        "instead of a full copy per device",
    )
    p.set_defaults(fn=cmd_train)

    p = sub.add_parser("reconstruct", help="images in → reconstructions out (PNG)")
    _common(p)
    p.add_argument("--input", required=True, help="image folder")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--mask-ratio", type=_ratio, default=0.0, help="mask this fraction of tokens")
    _skip_broken(p)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(fn=cmd_reconstruct)

    p = sub.add_parser("encode", help="images → latent tokens (.npy, B×L×latent_dim)")
    _common(p)
    p.add_argument("--input", required=True, help="image folder")
    p.add_argument("--out", required=True, help="output .npy file")
    _skip_broken(p)
    p.set_defaults(fn=cmd_encode)

    p = sub.add_parser("decode", help="latent tokens (.npy) → images (PNG)")
    _common(p)
    p.add_argument("--latents", required=True, help=".npy written by `maetok encode`")
    p.add_argument("--out", required=True, help="output folder")
    p.set_defaults(fn=cmd_decode)

    p = sub.add_parser("eval", help="PSNR/SSIM on centre crops of a folder, with a picture sheet")
    _common(p)
    p.add_argument("--data", required=True, help="image folder")
    p.add_argument(
        "--out", help="folder for eval.json and the sheet (default: next to the checkpoint)"
    )
    p.add_argument(
        "--mask-ratios",
        default="",
        metavar="R,R,...",
        help="also report PSNR with this fraction of tokens masked (e.g. 0.1,0.5): "
        "shows how the encoder depends on the mask tokens it was trained with",
    )
    _skip_broken(p)
    p.set_defaults(fn=cmd_eval)

    p = sub.add_parser(
        "export", help="a checkpoint's encoder and decoder, 16-bit, for inference and sharing"
    )
    p.add_argument("--checkpoint", required=True, help="a `maetok train` checkpoint")
    p.add_argument("--out", required=True, help="the .safetensors file to write")
    p.add_argument("--ema", action="store_true", help="export the EMA weights")
    p.set_defaults(fn=cmd_export)

    from maetok.parity import add_parser as add_parity_parser

    add_parity_parser(sub)
    from maetok.diffusion_cli import add_parser as add_diffusion_parser

    add_diffusion_parser(sub)
    return parser


def _one_line(text: str) -> str:
    return " ".join(line.strip() for line in str(text).splitlines() if line.strip())


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.fn(args)
    except MAETokError as e:
        print(f"maetok: error: {_one_line(e)}", file=sys.stderr)  # always one line
        return 2
    except OSError as e:  # the machine's side: a full disk, a read-only folder, a quota
        where = f" ({e.filename})" if e.filename else ""
        print(f"maetok: error: {_one_line(e.strerror or e)}{where}", file=sys.stderr)
        return 2
    except TrainingStopped as e:
        print(f"maetok: {e}", file=sys.stderr)
        return 128 + e.signum
    except KeyboardInterrupt:
        print("maetok: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
