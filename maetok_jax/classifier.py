"""The CIFAR-10 classifier in JAX: network, augmentation, train step, training, features.

The network and its tree are described in ``maetok.classifier_spec``. BatchNorm uses the
batch's statistics while training and running statistics otherwise; the running
statistics live in a tree of their own (``stats``) beside the parameters, so the
optimiser never sees them. Images enter as uint8 and are mapped to [-1, 1] on the
device; augmentation (reflect-padded random crop, horizontal flip) happens on the
device too, from ``fold_in(key, step)``.

Training follows the fast ResNet-9 recipe: SGD with Nesterov momentum, L2 weight decay,
label smoothing, a one-cycle learning rate, batch 512, about 18 epochs.
"""

from __future__ import annotations

import functools
import time

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from maetok.checkpoint import load_tree, save_tree
from maetok.classifier_spec import (
    FORMAT,
    STAGES,
    ClassifierConfig,
    init_classifier,
    spec_classifier,
    spec_classifier_stats,
)
from maetok.errors import CheckpointError, ConfigError, DataError, NonFiniteLossError
from maetok.schedules import one_cycle
from maetok.tree import flatten, unflatten
from maetok_jax.optim import make_optimizer

tree_map = jax.tree_util.tree_map


# ---------------------------------------------------------------------------------- network


def _dtype(cfg: ClassifierConfig):
    return jnp.bfloat16 if cfg.compute_dtype == "bfloat16" else jnp.float32


def _conv_bn_relu(p, s, x, cfg: ClassifierConfig, train: bool):
    """3×3 'same' conv → BatchNorm → ReLU; returns (y, new running stats)."""
    y = jax.lax.conv_general_dilated(
        x,
        p["conv"]["w"].astype(x.dtype),
        (1, 1),
        "SAME",
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
    )
    yf = y.astype(jnp.float32)  # statistics in float32 whatever the compute dtype
    s = s["bn"]
    if train:
        mean, var = yf.mean((0, 1, 2)), yf.var((0, 1, 2))  # (C,)
        m = cfg.bn_momentum
        new = {
            "mean": m * s["mean"] + (1 - m) * jax.lax.stop_gradient(mean),
            "var": m * s["var"] + (1 - m) * jax.lax.stop_gradient(var),
        }
    else:
        mean, var, new = s["mean"], s["var"], s
    scale = p["bn"]["scale"] * jax.lax.rsqrt(var + cfg.bn_eps)
    yf = (yf - mean) * scale + p["bn"]["bias"]
    return jax.nn.relu(yf).astype(x.dtype), {"bn": new}


def _max_pool2(x):
    return jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, (1, 2, 2, 1), (1, 2, 2, 1), "VALID")


def forward(params, stats, images, cfg: ClassifierConfig, train: bool):
    """images (B, H, W, 3) in [-1, 1] → (logits (B, K) f32, features (B, F) f32, new stats)."""
    x = images.astype(_dtype(cfg))
    new_stats = {}
    x, new_stats["stem"] = _conv_bn_relu(params["stem"], stats["stem"], x, cfg, train)
    for name, residual in STAGES:
        p, s = params[name], stats[name]
        x, ns = _conv_bn_relu(p, s, x, cfg, train)
        x = _max_pool2(x)  # (B, H/2, W/2, C)
        if residual:
            r, ns["res1"] = _conv_bn_relu(p["res1"], s["res1"], x, cfg, train)
            r, ns["res2"] = _conv_bn_relu(p["res2"], s["res2"], r, cfg, train)
            x = x + r
        new_stats[name] = ns
    features = x.astype(jnp.float32).max(axis=(1, 2))  # (B, F) global max-pool
    logits = (features @ params["head"]["w"]) * cfg.logit_scale  # (B, K)
    return logits, features, new_stats


def classify(params, stats, images, cfg: ClassifierConfig):
    """Inference (running BatchNorm statistics): images (B, H, W, 3) in [-1, 1] →
    ``(logits (B, K), features (B, F))``; the features are the study's FD feature space."""
    logits, features, _ = forward(params, stats, images, cfg, train=False)
    return logits, features


def _to_unit_range(images_uint8):
    return images_uint8.astype(jnp.float32) / 127.5 - 1.0  # maetok.data.from_uint8, on device


def augment(images_uint8, key, cfg: ClassifierConfig):
    """uint8 (B, H, W, 3) → float (B, H, W, 3) in [-1, 1]: a random crop of the image
    reflect-padded by ``cfg.pad`` pixels, then a horizontal flip with probability ½."""
    x = _to_unit_range(images_uint8)
    b, h, w, c = x.shape
    k_crop, k_flip = jax.random.split(key)
    if cfg.pad:
        q = cfg.pad
        padded = jnp.pad(x, ((0, 0), (q, q), (q, q), (0, 0)), mode="reflect")
        offsets = jax.random.randint(k_crop, (b, 2), 0, 2 * q + 1)
        x = jax.vmap(lambda im, o: jax.lax.dynamic_slice(im, (o[0], o[1], 0), (h, w, c)))(
            padded, offsets
        )
    flip = jax.random.bernoulli(k_flip, 0.5, (b, 1, 1, 1))
    return jnp.where(flip, x[:, :, ::-1], x)


def smoothed_cross_entropy(logits, labels, smoothing: float):
    """Mean over the batch of (1 − ε)·CE(label) + ε·CE(uniform)."""
    logp = jax.nn.log_softmax(logits.astype(jnp.float32))
    nll = -jnp.take_along_axis(logp, labels[:, None], axis=1)[:, 0]
    return jnp.mean((1 - smoothing) * nll - smoothing * logp.mean(axis=1))


# ------------------------------------------------------------------------------- train step


def init_train_state(cfg: ClassifierConfig) -> dict:
    params, stats = tree_map(jnp.asarray, init_classifier(cfg))
    return {
        "step": jnp.zeros((), jnp.int32),
        "params": params,
        "stats": stats,
        "opt": make_optimizer(cfg, nesterov=True)[0](params),
    }


def make_train_step(cfg: ClassifierConfig):
    """``step(state, images, labels, idx (B,), lr, key) → (state, metrics)``.

    ``images`` uint8 (N, H, W, 3) and ``labels`` (N,) are the whole training set, left on
    the device; ``idx`` picks the batch. The crops and flips use ``fold_in(key, step)``.
    """

    _, opt_update = make_optimizer(cfg, nesterov=True)

    def step(state, images, labels, idx, lr, key):
        x = augment(images[idx], jax.random.fold_in(key, state["step"]), cfg)
        y = labels[idx]

        def loss_fn(params):
            logits, _, stats = forward(params, state["stats"], x, cfg, train=True)
            loss = smoothed_cross_entropy(logits, y, cfg.label_smoothing)
            return loss, (stats, jnp.mean(jnp.argmax(logits, axis=1) == y))

        (loss, (stats, acc)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state["params"])
        params, opt = opt_update(grads, state["opt"], state["params"], lr)
        new = {"step": state["step"] + 1, "params": params, "stats": stats, "opt": opt}
        return new, {"loss": loss, "accuracy": acc.astype(jnp.float32)}

    return step


# ----------------------------------------------------------------------- training and use


def _check_data(images, labels, cfg: ClassifierConfig, what: str) -> None:
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        raise DataError(
            f"{what} images must be uint8 (N, H, W, 3), got {images.dtype} {images.shape}"
        )
    if images.shape[1] % 8 or images.shape[2] % 8:
        raise DataError(
            f"{what} images are {images.shape[2]}×{images.shape[1]}; the "
            "classifier pools three times, so both sides must be multiples of 8"
        )
    if labels is not None:
        if labels.shape != (len(images),):
            raise DataError(f"{what}: {len(images)} images but labels of shape {labels.shape}")
        if len(labels) and not 0 <= labels.min() <= labels.max() < cfg.num_classes:
            raise DataError(
                f"{what} labels must lie in [0, {cfg.num_classes}), found "
                f"{labels.min()}..{labels.max()}"
            )


def train_classifier(
    cfg: ClassifierConfig,
    train_images,
    train_labels,
    test_images,
    test_labels,
    out_path,
    progress: bool = True,
) -> dict:
    """Train on uint8 images with int labels, measure the test accuracy, save atomically.

    Returns ``test_accuracy``, ``train_loss``/``train_accuracy`` (last epoch, augmented),
    ``steps``, ``seconds`` (training only) and ``path``.
    """
    train_images, test_images = np.asarray(train_images), np.asarray(test_images)
    train_labels = np.asarray(train_labels, np.int32)
    test_labels = np.asarray(test_labels, np.int32)
    _check_data(train_images, train_labels, cfg, "training")
    _check_data(test_images, test_labels, cfg, "test")
    per_epoch = len(train_images) // cfg.batch_size
    if per_epoch < 1:
        raise ConfigError(
            f"batch size {cfg.batch_size} exceeds the {len(train_images)} training images"
        )
    total = cfg.epochs * per_epoch
    images, labels = jax.device_put(train_images), jax.device_put(train_labels)
    state = init_train_state(cfg)
    step_fn = jax.jit(make_train_step(cfg), donate_argnums=0)
    key = jax.random.key(cfg.seed)
    start, last = time.perf_counter(), {}
    with tqdm(total=total, desc="classifier", unit="step", disable=not progress) as bar:
        for epoch in range(cfg.epochs):
            perm = np.random.default_rng([cfg.seed, epoch]).permutation(len(train_images))
            metrics = []
            for i in range(per_epoch):
                s = epoch * per_epoch + i
                idx = perm[i * cfg.batch_size : (i + 1) * cfg.batch_size].astype(np.int32)
                state, m = step_fn(
                    state,
                    images,
                    labels,
                    idx,
                    np.float32(one_cycle(s, total, cfg.lr, cfg.warmup_fraction)),
                    key,
                )
                metrics.append(m)
                bar.update(1)
            last = {k: float(jnp.mean(jnp.stack([m[k] for m in metrics]))) for k in metrics[0]}
            if not np.isfinite(last["loss"]):
                raise NonFiniteLossError(
                    f"classifier loss became {last['loss']} in epoch "
                    f"{epoch + 1}; lower --lr or use --dtype float32"
                )
            bar.set_postfix(
                epoch=epoch + 1, loss=f"{last['loss']:.3f}", acc=f"{last['accuracy']:.3f}"
            )
    seconds = time.perf_counter() - start
    params, stats = (tree_map(np.asarray, state[k]) for k in ("params", "stats"))
    _, logits = classifier_features(params, stats, cfg, test_images)
    accuracy = float(np.mean(np.argmax(logits, axis=1) == test_labels))
    path = save_tree(
        out_path,
        {"params": params, "stats": stats},
        cfg.to_json(),
        {"test_accuracy": accuracy, "steps": total, "train_seconds": seconds},
        FORMAT,
    )
    print(
        f"maetok: classifier test accuracy {100 * accuracy:.2f}% after {cfg.epochs} "
        f"epochs ({seconds:.1f} s) → {path}"
    )
    return {
        "test_accuracy": accuracy,
        "train_loss": last["loss"],
        "train_accuracy": last["accuracy"],
        "steps": total,
        "seconds": seconds,
        "path": str(path),
    }


def load_classifier(path, with_meta: bool = False):
    """``(params, stats, cfg)`` of a checkpoint written by ``train_classifier`` (numpy
    trees), checked against the tree its config describes; ``with_meta`` appends the
    metadata (``test_accuracy`` …) as a fourth item."""
    flat, config_json, meta = load_tree(path, FORMAT)
    tree = unflatten(flat)
    try:
        cfg = ClassifierConfig.from_json(config_json)
    except ConfigError as e:
        raise CheckpointError(
            f"classifier checkpoint {path} has a missing or invalid config: {e}"
        ) from e
    for key, spec in (("params", spec_classifier(cfg)), ("stats", spec_classifier_stats(cfg))):
        want = {k: s.shape for k, s in flatten(spec).items()}
        have = {k: v.shape for k, v in flatten(tree.get(key, {})).items()}
        if want != have:
            raise CheckpointError(
                f"classifier checkpoint {path}: {key} do not match its config "
                f"(missing {sorted(set(want) - set(have))[:5]}, unexpected "
                f"{sorted(set(have) - set(want))[:5]}, wrong shape "
                f"{sorted(k for k in want if k in have and want[k] != have[k])[:5]})"
            )
    out = (tree["params"], tree["stats"], cfg)
    return (*out, meta) if with_meta else out


@functools.lru_cache(maxsize=8)
def _features_fn(cfg: ClassifierConfig):
    return jax.jit(lambda p, s, x: classify(p, s, _to_unit_range(x), cfg))


def classifier_features(
    params, stats, cfg: ClassifierConfig, images_uint8, batch_size: int = 1000
) -> tuple[np.ndarray, np.ndarray]:
    """uint8 images (N, H, W, 3) → ``(features (N, F), logits (N, K))`` float32 numpy.

    Batches have one shape (the last is padded), so the network compiles once per config.
    """
    images = np.asarray(images_uint8)
    _check_data(images, None, cfg, "classifier input")
    fn = _features_fn(cfg)
    params, stats = tree_map(jnp.asarray, params), tree_map(jnp.asarray, stats)
    b = max(1, min(batch_size, len(images)))
    feats, logits = [], []
    for i in range(0, len(images), b):
        chunk = images[i : i + b]
        n = len(chunk)
        if n < b:
            chunk = np.concatenate([chunk, np.zeros((b - n, *chunk.shape[1:]), np.uint8)])
        lg, ft = fn(params, stats, jnp.asarray(chunk))
        logits.append(np.asarray(lg)[:n])
        feats.append(np.asarray(ft)[:n])
    return np.concatenate(feats), np.concatenate(logits)
