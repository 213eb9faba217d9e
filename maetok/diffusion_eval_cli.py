"""Command-line pieces of the diffusability study: ``prepare``, ``classifier`` and ``eval``.

``register(subparsers)`` adds both to an argparse sub-command group; each sets
``fn`` to its handler, which ``maetok.cli.main`` calls and whose ``MAETokError`` it prints
as one line. Mounted under ``maetok diffusion``:

    maetok diffusion prepare --cifar DATA/cifar10             unpack CIFAR-10 into the cache
    maetok diffusion classifier --cifar DATA/cifar10          train (or reuse) the classifier
    maetok diffusion eval --samples S.npz --tokenizer CKPT --out report.json
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from maetok.errors import CheckpointError, ConfigError, DataError

CLASSIFIER_NAME = "classifier.safetensors"


def _cache(args) -> Path:
    from maetok.cifar10 import default_cache

    return Path(args.cache) if args.cache else default_cache()


def _classifier_path(explicit, args) -> Path:
    return Path(explicit) if explicit else _cache(args) / CLASSIFIER_NAME


def _widths(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(w) for w in text.split(","))
    except ValueError as e:
        raise ConfigError(f"--widths takes 4 integers separated by commas, got {text!r}") from e


def cmd_prepare(args) -> int:
    from maetok.cifar10 import prepare

    if not args.cifar:
        raise ConfigError(
            "prepare needs --cifar, the folder holding train_jpg.tar.gz and test_png.tar.gz"
        )
    cache = prepare(args.cifar, _cache(args))
    print(
        f"maetok: CIFAR-10 ready in {cache} (train images for `maetok train --data`: "
        f"{cache / 'train'})"
    )
    return 0


def cmd_classifier(args) -> int:
    from maetok.cifar10 import load_split
    from maetok.classifier_spec import ClassifierConfig
    from maetok_jax.classifier import load_classifier, train_classifier

    out = _classifier_path(args.out, args)
    if out.exists() and not args.overwrite:
        *_, meta = load_classifier(out, with_meta=True)
        print(
            f"maetok: reusing classifier {out} (test accuracy "
            f"{100 * meta['test_accuracy']:.2f}%); pass --overwrite to train a new one"
        )
        return 0
    changes = {
        k: v
        for k, v in (
            ("epochs", args.epochs),
            ("batch_size", args.batch_size),
            ("seed", args.seed),
            ("compute_dtype", args.dtype),
            ("lr", args.lr),
        )
        if v is not None
    }
    if args.widths:
        changes["widths"] = _widths(args.widths)
    cfg = ClassifierConfig(**changes)
    cache = _cache(args)
    train = load_split("train", source=args.cifar, cache=cache)
    test = load_split("test", source=args.cifar, cache=cache)
    print(
        f"maetok: training the CIFAR-10 classifier (widths {cfg.widths}, {cfg.epochs} epochs, "
        f"batch {cfg.batch_size}, {cfg.compute_dtype}) on {len(train[0])} images → {out}"
    )
    train_classifier(cfg, *train, *test, out, progress=not args.no_progress)
    return 0


def _load_samples(path) -> tuple[np.ndarray, np.ndarray | None]:
    try:
        with np.load(path) as data:
            images = data["images"]
            labels = data.get("labels")
    except (OSError, ValueError, KeyError) as e:
        raise DataError(
            f"cannot read samples {path} (an .npz with 'images' uint8 "
            f"(N, H, W, 3) and optionally 'labels' (N,)): {e}"
        ) from e
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        raise DataError(
            f"samples {path}: 'images' must be uint8 (N, H, W, 3), got "
            f"{images.dtype} {images.shape}"
        )
    if labels is not None and labels.shape != (len(images),):
        raise DataError(
            f"samples {path}: {len(images)} images but 'labels' of shape {labels.shape}"
        )
    return images, labels


def _components(text: str) -> tuple[int, ...]:
    try:
        ks = tuple(int(k) for k in text.split(",") if k.strip())
    except ValueError:
        ks = ()
    if not ks or min(ks) < 1:
        raise ConfigError(f"--components takes positive integers separated by commas, got {text!r}")
    return ks


def cmd_eval(args) -> int:
    from maetok.cifar10 import load_split

    if not args.samples and not args.tokenizer:
        raise ConfigError("eval needs --samples FILE.npz and/or --tokenizer CHECKPOINT")
    components = _components(args.components)
    cache = _cache(args)
    report: dict = {}
    if args.samples:
        from maetok_jax.generation_metrics import sample_metrics

        images, labels = _load_samples(args.samples)
        classifier = _classifier_path(args.classifier, args)
        if not classifier.exists():
            raise CheckpointError(
                f"no classifier at {classifier}; train one with `maetok "
                "diffusion classifier` or pass --classifier PATH"
            )
        ref_images, ref_labels = load_split(args.ref, source=args.cifar, cache=cache)
        report["samples"] = {
            "file": str(args.samples),
            "reference": args.ref,
            **sample_metrics(images, labels, ref_images, ref_labels, classifier),
        }
    if args.tokenizer:
        from maetok_jax.generation_metrics import tokenizer_metrics

        train = load_split("train", source=args.cifar, cache=cache)
        test = load_split("test", source=args.cifar, cache=cache)
        report["tokenizers"] = {
            str(path): tokenizer_metrics(
                path,
                *train,
                *test,
                use_ema=args.ema,
                components=components,
                gmm_train=args.gmm_train,
            )
            for path in args.tokenizer
        }
    _print_report(report)
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report, indent=2))
        print(f"maetok: wrote {out}")
    return 0


def _print_report(report: dict) -> None:
    if "samples" in report:
        s = report["samples"]
        print(f"samples {s['file']} ({s['num_samples']}) against CIFAR-10 {s['reference']}:")
        for key in ("fd_c10", "precision", "recall", "class_consistency", "reference_accuracy"):
            if key in s:
                print(f"  {key:20s}{s[key]:10.4f}")
    for path, t in report.get("tokenizers", {}).items():
        curve = "  ".join(f"K={k}: {v:.4f}" for k, v in t["gmm_nll"].items())
        print(
            f"tokenizer {path} (latents {t['latent_shape']}): PSNR {t['psnr']:.2f} dB, "
            f"linear probe {100 * t['linear_probe']:.2f}%\n  GMM held-out NLL "
            f"(nats/dim): {curve}"
        )


def _data_options(p) -> None:
    p.add_argument(
        "--cifar",
        help="folder holding train_jpg.tar.gz and test_png.tar.gz "
        "(needed once, to prepare the cache)",
    )
    p.add_argument(
        "--cache",
        help="prepared CIFAR-10 (default: $MAETOK_CACHE/cifar10 or ~/.cache/maetok/cifar10)",
    )


def register(subparsers) -> None:
    """Add the ``prepare``, ``classifier`` and ``eval`` sub-commands to an argparse group."""
    p = subparsers.add_parser("prepare", help="unpack and decode CIFAR-10 once into the cache")
    _data_options(p)
    p.set_defaults(fn=cmd_prepare)

    p = subparsers.add_parser(
        "classifier",
        help="train the CIFAR-10 classifier whose features the study measures samples in",
    )
    _data_options(p)
    p.add_argument("--out", help=f"checkpoint (default: CACHE/{CLASSIFIER_NAME})")
    p.add_argument("--epochs", type=int)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--lr", type=float, help="one-cycle peak learning rate")
    p.add_argument("--seed", type=int)
    p.add_argument("--dtype", choices=("float32", "bfloat16"), help="compute dtype")
    p.add_argument("--widths", help="stem and stage widths, e.g. 64,128,256,512")
    p.add_argument("--overwrite", action="store_true", help="train again over --out")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(fn=cmd_classifier)

    p = subparsers.add_parser(
        "eval",
        help="fd_c10 / precision / recall / class consistency "
        "of samples; PSNR, linear probe, GMM NLL of tokenizers",
    )
    _data_options(p)
    p.add_argument("--samples", help=".npz with 'images' uint8 (N, 32, 32, 3) and 'labels' (N,)")
    p.add_argument("--classifier", help=f"classifier checkpoint (default: CACHE/{CLASSIFIER_NAME})")
    p.add_argument(
        "--ref",
        choices=("train", "test"),
        default="test",
        help="reference images for the sample metrics",
    )
    p.add_argument(
        "--tokenizer",
        action="append",
        metavar="CHECKPOINT",
        help="a tokenizer checkpoint to measure (repeatable)",
    )
    p.add_argument("--ema", action="store_true", help="use the tokenizers' EMA parameters")
    p.add_argument("--components", default="1,2,4,8,16,32", help="GMM component counts")
    p.add_argument(
        "--gmm-train", type=int, default=10_000, help="training latents the GMMs are fitted to"
    )
    p.add_argument("--out", help="write the report as JSON here")
    p.set_defaults(fn=cmd_eval)
