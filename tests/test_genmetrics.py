"""Feature-set measurements against distributions whose answers are known in closed form."""

import math

import numpy as np
import pytest

from maetok.genmetrics import (
    fit_gmm,
    frechet_distance,
    gmm_nll,
    linear_probe,
    precision_recall,
)


def _rotation(rng, d):
    q, r = np.linalg.qr(rng.standard_normal((d, d)))
    return q * np.sign(np.diag(r))


def test_frechet_distance_matches_the_gaussian_formula(rng):
    d, n = 6, 40_000
    mu_a, mu_b = rng.normal(0, 1, d), rng.normal(0, 1, d)
    sd_a, sd_b = rng.uniform(0.5, 2.0, d), rng.uniform(0.5, 2.0, d)
    # same rotation for both: the covariances are full (not diagonal) but still commute,
    # so the distance is |Δμ|² + Σ(σa − σb)² exactly
    rot = _rotation(rng, d)
    a = (rng.standard_normal((n, d)) * sd_a + mu_a) @ rot.T
    b = (rng.standard_normal((n, d)) * sd_b + mu_b) @ rot.T
    analytic = np.sum((mu_a - mu_b) ** 2) + np.sum((sd_a - sd_b) ** 2)
    assert frechet_distance(a, b) == pytest.approx(analytic, rel=0.03, abs=0.02)
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-8)
    assert frechet_distance(a, b) == pytest.approx(frechet_distance(b, a), rel=1e-9)


def test_frechet_distance_non_commuting_covariances(rng):
    # 2-D case with a closed form: tr(√(A^½ B A^½)) = √(tr AB + 2√det AB) for 2×2 matrices
    a_cov = np.array([[2.0, 0.6], [0.6, 1.0]])
    b_cov = np.array([[0.5, -0.3], [-0.3, 1.5]])
    n = 60_000
    a = rng.multivariate_normal([0, 0], a_cov, n)
    b = rng.multivariate_normal([1, -1], b_cov, n)
    prod = a_cov @ b_cov
    cross = math.sqrt(np.trace(prod) + 2 * math.sqrt(np.linalg.det(prod)))
    analytic = 2.0 + np.trace(a_cov) + np.trace(b_cov) - 2 * cross
    assert frechet_distance(a, b) == pytest.approx(analytic, rel=0.03)


def test_precision_recall_separates_fidelity_from_coverage(rng):
    real = rng.standard_normal((1500, 8))
    same = rng.standard_normal((1500, 8))
    p, r = precision_recall(real, same, k=3)
    assert p > 0.85 and r > 0.85
    far = rng.standard_normal((1500, 8)) + 10.0
    p, r = precision_recall(real, far, k=3)
    assert p < 0.01 and r < 0.01
    # a generator that covers only the core of the distribution: faithful but not diverse
    collapsed = 0.3 * rng.standard_normal((1500, 8))
    p, r = precision_recall(real, collapsed, k=3)
    assert p > 0.95 and r < 0.3


def test_precision_recall_is_chunk_independent(rng, monkeypatch):
    from maetok import genmetrics

    real, fake = rng.standard_normal((300, 5)), 1.3 * rng.standard_normal((250, 5))
    whole = precision_recall(real, fake, k=4)
    monkeypatch.setattr(genmetrics, "_CHUNK_BYTES", 4 * 300 * 7)  # 7 rows per block
    assert precision_recall(real, fake, k=4) == whole


def _blobs(rng, n, d, classes, sep):
    centres = rng.standard_normal((classes, d)) * sep
    y = rng.integers(0, classes, n)
    # badly scaled features: standardisation inside the probe must cope
    scale = np.logspace(-2, 2, d)
    return (centres[y] + rng.standard_normal((n, d))) * scale, y


def test_linear_probe_reads_separable_classes_and_not_shuffled_ones(rng):
    x, y = _blobs(rng, 3000, 16, 5, sep=3.0)
    acc = linear_probe(x[:2000], y[:2000], x[2000:], y[2000:], 5, steps=200)
    assert acc > 0.97
    shuffled = rng.permutation(y)  # labels that the features say nothing about
    acc = linear_probe(x[:2000], shuffled[:2000], x[2000:], shuffled[2000:], 5, steps=200)
    assert abs(acc - 0.2) < 0.05


def test_linear_probe_is_deterministic_and_accepts_images(rng):
    x, y = _blobs(rng, 600, 12, 3, sep=1.0)
    x = x.reshape(600, 2, 2, 3)  # flattened per sample inside
    a = linear_probe(x[:400], y[:400], x[400:], y[400:], 3, steps=50, seed=1)
    assert a == linear_probe(x[:400], y[:400], x[400:], y[400:], 3, steps=50, seed=1)
    assert 0.5 < a <= 1.0


def test_gmm_finds_the_modes_and_the_entropy(rng):
    d = 4
    weights = np.array([0.5, 0.3, 0.2])
    means = np.array([[0.0] * d, [12.0] * d, [0.0, 12.0, -12.0, 0.0]])
    sds = rng.uniform(0.5, 1.5, (3, d))

    def sample(n):
        z = rng.choice(3, n, p=weights)
        return means[z] + sds[z] * rng.standard_normal((n, d))

    train, held = sample(4000), sample(4000)
    nll = gmm_nll(train, held, components=(1, 2, 3, 4, 6), seed=0)
    # modes this far apart barely overlap, so the entropy is that of the label plus the
    # weighted Gaussian entropies, to within e^-40 or so
    entropy = -np.sum(weights * np.log(weights)) + np.sum(
        weights * 0.5 * np.sum(np.log(2 * np.pi * np.e * sds**2), axis=1)
    )
    assert nll[1] > nll[2] > nll[3] + 0.3
    assert nll[3] == pytest.approx(entropy / d, abs=0.02)
    assert abs(nll[4] - nll[3]) < 0.02 and abs(nll[6] - nll[3]) < 0.03
    w, mu, _ = fit_gmm(train, 3, seed=0)
    order = np.argsort(-w)
    np.testing.assert_allclose(w[order], weights, atol=0.03)
    np.testing.assert_allclose(mu[order], means, atol=0.15)


def test_gmm_rejects_impossible_requests(rng):
    x = rng.standard_normal((10, 3))
    with pytest.raises(ValueError, match="11 components"):
        gmm_nll(x, x, components=(11,))
    with pytest.raises(ValueError, match="feature sizes"):
        gmm_nll(x, x[:, :2], components=(1,))
