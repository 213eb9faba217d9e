"""The CIFAR-10 classifier at tiny widths: tree, augmentation, loss, learning, checkpoints."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from maetok.classifier_spec import (
    ClassifierConfig,
    init_classifier,
    spec_classifier,
    spec_classifier_stats,
)
from maetok.errors import CheckpointError, ConfigError, DataError
from maetok.tree import flatten
from maetok_jax.classifier import (
    augment,
    classifier_features,
    classify,
    forward,
    load_classifier,
    smoothed_cross_entropy,
    train_classifier,
)

TINY = ClassifierConfig(
    widths=(8, 16, 16, 32), num_classes=3, epochs=3, batch_size=32, lr=0.2, compute_dtype="float32"
)
classify_jit = jax.jit(classify, static_argnums=3)


def stripes(rng, n, size=32):
    """A learnable 3-class problem: horizontal, vertical or diagonal stripes, with random
    period, phase and colours and pixel noise, so neither colour nor position gives it away."""
    y = rng.integers(0, 3, n)
    c = np.arange(size) + 0.5
    yy, xx = np.meshgrid(c, c, indexing="ij")
    out = np.empty((n, size, size, 3), np.uint8)
    for i in range(n):
        period, phase = rng.uniform(4, 10), rng.uniform(0, 2 * np.pi)
        coord = (yy, xx, (xx + yy) / np.sqrt(2))[y[i]]
        t = 0.5 + 0.5 * np.sin(2 * np.pi * coord / period + phase)
        a, b = rng.uniform(0, 255, (2, 3))
        out[i] = np.clip(a + t[..., None] * (b - a) + rng.normal(0, 20, (size, size, 3)), 0, 255)
    return out, y.astype(np.int32)


def test_default_config_is_the_resnet9_recipe_and_round_trips():
    cfg = ClassifierConfig()
    assert cfg.widths == (64, 128, 256, 512) and cfg.batch_size == 512
    assert cfg.label_smoothing == 0.2 and cfg.compute_dtype == "bfloat16" and cfg.feature_dim == 512
    assert ClassifierConfig.from_json(TINY.to_json()) == TINY
    shapes = {k: s.shape for k, s in flatten(spec_classifier(cfg)).items()}
    assert shapes["stem/conv/w"] == (3, 3, 3, 64) and shapes["layer3/res2/conv/w"] == (
        3,
        3,
        512,
        512,
    )
    assert shapes["head/w"] == (512, 10) and "layer2/res1/conv/w" not in shapes
    n_params = sum(int(np.prod(s)) for s in shapes.values())
    assert 6.4e6 < n_params < 6.7e6  # the ResNet-9 of the fast recipes has about 6.5 M
    stats = flatten(spec_classifier_stats(cfg))
    assert set(stats) == {
        k.replace("scale", m) for k in shapes if k.endswith("bn/scale") for m in ("mean", "var")
    }
    with pytest.raises(ConfigError, match="widths"):
        ClassifierConfig(widths=(8, 8))
    with pytest.raises(ConfigError, match="compute_dtype"):
        TINY.replace(compute_dtype="float16")
    with pytest.raises(ConfigError, match="unknown"):
        ClassifierConfig.from_json('{"depth": 3}')


def test_he_initialisation_scale():
    params, stats = init_classifier(ClassifierConfig())
    w = params["layer3"]["res1"]["conv"]["w"]  # fan_in 3·3·512
    assert w.std() == pytest.approx(np.sqrt(2 / (9 * 512)), rel=0.02)
    assert np.all(stats["layer1"]["res1"]["bn"]["var"] == 1.0)


def test_augment_crops_a_reflected_window_and_flips(rng):
    images = rng.integers(0, 256, (16, 8, 8, 3), dtype=np.uint8)
    cfg = TINY.replace(pad=2)
    out = np.asarray(augment(jnp.asarray(images), jax.random.key(3), cfg))
    unit = images.astype(np.float32) / 127.5 - 1
    padded = np.pad(unit, ((0, 0), (2, 2), (2, 2), (0, 0)), mode="reflect")
    flips = 0
    for i in range(16):
        windows = [padded[i, r : r + 8, c : c + 8] for r in range(5) for c in range(5)]
        match = [np.allclose(out[i], w, atol=1e-6) for w in windows]
        mirrored = [np.allclose(out[i], w[:, ::-1], atol=1e-6) for w in windows]
        assert any(match) or any(mirrored), i
        flips += not any(match)
    assert 2 <= flips <= 14  # about half
    again = np.asarray(augment(jnp.asarray(images), jax.random.key(3), cfg))
    other = np.asarray(augment(jnp.asarray(images), jax.random.key(4), cfg))
    assert np.array_equal(out, again) and not np.array_equal(out, other)


def test_smoothed_cross_entropy_matches_numpy(rng):
    logits = rng.normal(0, 2, (5, 4)).astype(np.float32)
    labels = rng.integers(0, 4, 5)
    logp = logits - np.log(np.exp(logits).sum(1, keepdims=True))
    want = np.mean(-0.8 * logp[np.arange(5), labels] - 0.2 * logp.mean(1))
    got = float(smoothed_cross_entropy(jnp.asarray(logits), jnp.asarray(labels), 0.2))
    assert got == pytest.approx(want, rel=1e-5)


def test_batchnorm_uses_batch_stats_in_training_and_running_stats_otherwise(rng):
    params, stats = init_classifier(TINY)
    x = jnp.asarray(rng.uniform(-1, 1, (6, 16, 16, 3)).astype(np.float32))
    _, _, new = jax.jit(forward, static_argnums=(3, 4))(params, stats, x, TINY, True)
    m = new["stem"]["bn"]["mean"]
    assert not np.allclose(m, 0) and np.allclose(
        m,
        0.1
        * np.asarray(
            jax.lax.conv_general_dilated(
                x,
                params["stem"]["conv"]["w"],
                (1, 1),
                "SAME",
                dimension_numbers=("NHWC", "HWIO", "NHWC"),
            ).mean((0, 1, 2))
        ),
        atol=1e-5,
    )
    # inference is per-sample: a sample's output does not depend on the rest of the batch
    a, fa = classify_jit(params, stats, x, TINY)
    b, _fb = classify_jit(params, stats, x[:2], TINY)
    np.testing.assert_allclose(a[:2], b, rtol=1e-5, atol=1e-6)
    assert fa.shape == (6, 32)


def test_bfloat16_compute_stays_close_to_float32(rng):
    params, stats = init_classifier(TINY)
    x = jnp.asarray(rng.uniform(-1, 1, (4, 16, 16, 3)).astype(np.float32))
    _l32, f32 = classify_jit(params, stats, x, TINY)
    l16, f16 = classify_jit(params, stats, x, TINY.replace(compute_dtype="bfloat16"))
    assert l16.dtype == jnp.float32 and f16.dtype == jnp.float32
    assert float(jnp.abs(f16 - f32).max()) < 0.05 * float(jnp.abs(f32).max())


def test_tiny_classifier_learns_stripes_and_round_trips(tmp_path, rng):
    x, y = stripes(rng, 520)
    out = tmp_path / "clf.safetensors"
    report = train_classifier(TINY, x[:384], y[:384], x[384:], y[384:], out, progress=False)
    assert report["steps"] == 3 * (384 // 32)  # 36 steps
    assert report["test_accuracy"] > 0.7  # chance is 1/3
    params, stats, cfg, meta = load_classifier(out, with_meta=True)
    assert cfg == TINY and meta["test_accuracy"] == report["test_accuracy"]
    feats, logits = classifier_features(params, stats, cfg, x[384:], batch_size=50)
    assert feats.shape == (136, 32) and logits.shape == (136, 3)
    assert np.mean(np.argmax(logits, 1) == y[384:]) == report["test_accuracy"]
    # batching does not change the answer (the last batch is padded)
    feats_one, _ = classifier_features(params, stats, cfg, x[384:390], batch_size=4)
    np.testing.assert_allclose(feats_one, feats[:6], rtol=1e-5, atol=1e-5)


def test_bad_inputs_and_checkpoints_are_reported(tmp_path, rng):
    x, y = stripes(rng, 40)
    with pytest.raises(DataError, match="labels must lie"):
        train_classifier(TINY, x, y + 3, x, y, tmp_path / "a.safetensors", progress=False)
    with pytest.raises(DataError, match="uint8"):
        train_classifier(
            TINY, x.astype(np.float32), y, x, y, tmp_path / "a.safetensors", progress=False
        )
    with pytest.raises(ConfigError, match="batch size"):
        train_classifier(
            TINY.replace(batch_size=64), x, y, x, y, tmp_path / "a.safetensors", progress=False
        )
    with pytest.raises(CheckpointError, match="does not exist"):
        load_classifier(tmp_path / "none.safetensors")
    from maetok.checkpoint import save_tree

    save_tree(tmp_path / "other.safetensors", {"w": np.ones(2, np.float32)}, "{}", fmt="x/1")
    with pytest.raises(CheckpointError, match="expected format 'maetok-classifier/1'"):
        load_classifier(tmp_path / "other.safetensors")
