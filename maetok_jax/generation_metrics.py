"""The diffusability study's measurements: generated samples and tokenizers' latent spaces.

``sample_metrics`` measures generated images in the feature space of the in-project
CIFAR-10 classifier (``maetok_jax.classifier``): ``fd_c10``, the Fréchet distance there
(it is *not* FID, whose Inception network is not used), k-NN precision and recall, and
class consistency, the classifier's agreement with the labels the samples were
generated for. ``tokenizer_metrics`` measures what a diffusion model will have to learn:
reconstruction PSNR, how linearly readable the latents are, and how many Gaussian modes
describe them (held-out NLL of diagonal mixtures).
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np

from maetok.data import from_uint8
from maetok.errors import DataError
from maetok.genmetrics import frechet_distance, gmm_nll, linear_probe, precision_recall
from maetok_jax.classifier import classifier_features, load_classifier

GMM_COMPONENTS = (1, 2, 4, 8, 16, 32)
_LOADED: dict = {}  # (classifier path, mtime) → (params, stats, cfg)
_REF_FEATURES: dict = {}  # (classifier key, digest of the reference images) → (features, logits)


def _digest(images: np.ndarray) -> str:
    h = hashlib.blake2b(digest_size=16)
    h.update(repr(images.shape).encode())
    h.update(np.ascontiguousarray(images).data)
    return h.hexdigest()


def _resolve(classifier):
    """``classifier`` as ``(params, stats, cfg, key, path)`` from a path or a loaded triple;
    ``key`` identifies the trained network (a retrained file gets a new one)."""
    if isinstance(classifier, (str, Path)):
        path = Path(classifier).resolve()
        key = (str(path), path.stat().st_mtime_ns if path.is_file() else None)
        if key not in _LOADED:
            _LOADED[key] = load_classifier(path)  # a missing file raises CheckpointError here
        return (*_LOADED[key], key, path)
    params, stats, cfg = classifier
    return params, stats, cfg, (cfg.to_json(), _digest(np.asarray(params["head"]["w"]))), None


def reference_features(classifier, ref_images_uint8) -> tuple[np.ndarray, np.ndarray]:
    """Classifier ``(features, logits)`` of the reference images, computed once per classifier.

    Kept in memory, and for a classifier given by path also beside its checkpoint
    (``<name>.ref-<digest>.npz``), so later runs of the study skip the 50 000 images.
    """
    params, stats, cfg, key, path = _resolve(classifier)
    images = np.asarray(ref_images_uint8)
    digest = _digest(images)
    if (key, digest) in _REF_FEATURES:
        return _REF_FEATURES[(key, digest)]
    disk = path.with_name(f"{path.stem}.ref-{digest}.npz") if path is not None else None
    if disk is not None and disk.is_file() and disk.stat().st_mtime >= path.stat().st_mtime:
        with np.load(disk) as data:
            out = (data["features"], data["logits"])
    else:
        out = classifier_features(params, stats, cfg, images)
        if disk is not None:
            tmp = disk.with_name(f".{disk.name}.tmp.npz")
            np.savez(tmp, features=out[0], logits=out[1])
            tmp.replace(disk)
    _REF_FEATURES[(key, digest)] = out
    return out


def _subset(n: int, size: int, seed: int, stream: int) -> np.ndarray:
    if size >= n:
        return np.arange(n)
    return np.sort(np.random.default_rng([seed, stream]).choice(n, size, replace=False))


def sample_metrics(
    images_uint8,
    labels,
    ref_images_uint8,
    ref_labels,
    classifier,
    k: int = 3,
    pr_samples: int = 10_000,
    seed: int = 0,
) -> dict:
    """Generated images against a reference set, in the classifier's feature space.

    ``images_uint8`` (N, H, W, 3) with ``labels`` (N,) the classes they were generated
    for (or None); ``classifier`` a checkpoint path or ``(params, stats, cfg)``. Returns
    ``fd_c10`` (all samples against all references), ``precision`` and ``recall`` (k-NN,
    on seeded subsets of equal size, at most ``pr_samples``), ``class_consistency``
    (when labels are given), ``reference_accuracy`` (when ``ref_labels`` are) and
    ``num_samples``. FD grows as N shrinks: compare runs at equal N.
    """
    images = np.asarray(images_uint8)
    if images.dtype != np.uint8 or images.ndim != 4 or len(images) < 2:
        raise DataError(
            f"samples must be uint8 (N, H, W, 3) with N >= 2, got {images.dtype} {images.shape}"
        )
    params, stats, cfg, _, _ = _resolve(classifier)
    feats, logits = classifier_features(params, stats, cfg, images)
    ref_feats, ref_logits = reference_features(classifier, ref_images_uint8)
    n = min(len(feats), len(ref_feats), pr_samples)
    precision, recall = precision_recall(
        ref_feats[_subset(len(ref_feats), n, seed, 0)], feats[_subset(len(feats), n, seed, 1)], k
    )
    out = {
        "fd_c10": frechet_distance(ref_feats, feats),
        "precision": precision,
        "recall": recall,
        "num_samples": len(images),
    }
    if labels is not None:
        labels = np.asarray(labels)
        if labels.shape != (len(images),):
            raise DataError(f"{len(images)} samples but labels of shape {labels.shape}")
        out["class_consistency"] = float(np.mean(np.argmax(logits, 1) == labels))
    if ref_labels is not None:
        out["reference_accuracy"] = float(
            np.mean(np.argmax(ref_logits, 1) == np.asarray(ref_labels))
        )
    return out


def normalise_latents(train: np.ndarray, *others: np.ndarray) -> list[np.ndarray]:
    """Latents (N, L, d) scaled per channel (the last axis, shared by all L tokens) to zero
    mean and unit variance with the statistics of ``train``; the others alike."""
    mean = train.mean(axis=(0, 1), dtype=np.float64)
    std = np.maximum(train.std(axis=(0, 1), dtype=np.float64), 1e-8)
    return [((x - mean) / std).astype(np.float32) for x in (train, *others)]


def tokenizer_metrics(
    tokenizer_checkpoint,
    train_images,
    train_labels,
    test_images,
    test_labels,
    use_ema: bool = False,
    components=GMM_COMPONENTS,
    gmm_train: int = 10_000,
    batch_size: int = 500,
    seed: int = 0,
    probe_steps: int = 300,
) -> dict:
    """Reconstruction and latent-space measurements of a tokenizer checkpoint (JAX backend).

    Images are uint8 (N, H, W, 3) at the tokenizer's image size. Returns ``psnr`` (test
    set, dB), ``linear_probe`` (test accuracy of a linear classifier on the flattened,
    normalised latents), ``gmm_nll`` ({K: held-out nats per dimension}: mixtures fitted
    to ``gmm_train`` seeded training latents, scored on the test latents) and
    ``latent_shape`` [L, d].
    """
    from maetok import checkpoint as ckpt
    from maetok.evaluate import encode_all, reconstruct_all
    from maetok.metrics import psnr
    from maetok.trainer import get_backend, params_from_checkpoint

    cfg = ckpt.read_config(tokenizer_checkpoint)
    size = cfg.model.image_size
    for what, images in (("training", train_images), ("test", test_images)):
        if np.asarray(images).shape[1:] != (size, size, 3):
            raise DataError(
                f"{what} images are {np.asarray(images).shape[1:]}; tokenizer "
                f"{tokenizer_checkpoint} expects ({size}, {size}, 3)"
            )
    backend = get_backend("jax")(cfg)
    params = backend.to_device_tree(params_from_checkpoint(tokenizer_checkpoint, cfg, use_ema))
    test = from_uint8(test_images)
    recon = reconstruct_all(backend, params, test, batch_size)
    z_train, z_test = normalise_latents(
        encode_all(backend, params, train_images, batch_size),
        encode_all(backend, params, test_images, batch_size),
    )
    num_classes = int(max(np.max(train_labels), np.max(test_labels))) + 1
    flat_train, flat_test = z_train.reshape(len(z_train), -1), z_test.reshape(len(z_test), -1)
    probe = linear_probe(
        flat_train, train_labels, flat_test, test_labels, num_classes, steps=probe_steps, seed=seed
    )
    fit = flat_train[_subset(len(flat_train), gmm_train, seed, 2)]
    nll = gmm_nll(fit, flat_test, tuple(k for k in components if k <= len(fit)), seed=seed)
    return {
        "psnr": float(psnr(test, recon).mean()),
        "linear_probe": probe,
        "gmm_nll": nll,
        "latent_shape": list(z_train.shape[1:]),
    }
