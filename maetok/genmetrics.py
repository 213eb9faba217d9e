"""Measurements on feature sets: Fréchet distance, precision/recall, linear probe, GMM fit.

Framework-free (numpy only) and deterministic given a seed, so the same numbers come out
whichever backend produced the features. Features are ``(N, F)`` arrays; anything with
more axes is flattened per sample where that makes sense (the probe and the GMM).

- ``frechet_distance``: the distance between Gaussians fitted to two feature sets.
- ``precision_recall``: k-nearest-neighbour manifolds of Kynkäänniemi et al. (2019):
  precision = fraction of generated samples inside the real manifold, recall = fraction
  of real samples inside the generated one.
- ``linear_probe``: test accuracy of multinomial logistic regression on standardised
  features, the classic measure of how linearly readable a representation is.
- ``gmm_nll``: held-out negative log-likelihood of diagonal Gaussian mixtures with an
  increasing number of components. A latent space a diffusion model finds easy to learn
  is well described by few modes, so its curve flattens early.
"""

from __future__ import annotations

import math

import numpy as np

_CHUNK_BYTES = 128 << 20  # memory for one block of pairwise distances


def _as_features(x, name: str) -> np.ndarray:
    x = np.asarray(x)
    if x.ndim < 2 or len(x) < 2:
        raise ValueError(f"{name} must be (N, ...) with N >= 2 samples, got shape {x.shape}")
    return x.reshape(len(x), -1)


# --------------------------------------------------------------------------- Fréchet distance


def _sqrtm_psd(a: np.ndarray) -> np.ndarray:
    """Square root of a symmetric positive semi-definite matrix (tiny negative eigenvalues → 0)."""
    w, v = np.linalg.eigh(a)
    return (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T


def frechet_distance(feats_a, feats_b) -> float:
    """‖μa − μb‖² + tr(Sa + Sb − 2·(Sa^½ Sb Sa^½)^½) of Gaussians fitted to two sets (N, F).

    Written with symmetric eigendecompositions only: ``Sa^½ Sb Sa^½`` is symmetric PSD and
    has the same eigenvalues as ``Sa·Sb``, so the trace of its root is a sum of square roots.
    """
    a = _as_features(feats_a, "feats_a").astype(np.float64)
    b = _as_features(feats_b, "feats_b").astype(np.float64)
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"feature sizes differ: {a.shape[1]} and {b.shape[1]}")
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)  # (F, F)
    root_a = _sqrtm_psd(cov_a)
    middle = root_a @ cov_b @ root_a
    eig = np.linalg.eigvalsh((middle + middle.T) / 2)
    cross = np.sqrt(np.clip(eig, 0.0, None)).sum()
    return float(np.sum((mu_a - mu_b) ** 2) + np.trace(cov_a) + np.trace(cov_b) - 2.0 * cross)


# ------------------------------------------------------------------------- precision / recall


def _row_chunks(rows: int, cols: int):
    step = max(1, _CHUNK_BYTES // (4 * max(1, cols)))
    for i in range(0, rows, step):
        yield slice(i, min(rows, i + step))


def _sq_dists(a: np.ndarray, b: np.ndarray, b_sq: np.ndarray) -> np.ndarray:
    """(n, m) squared Euclidean distances, float32, clipped at 0 (cancellation)."""
    d = np.sum(a * a, axis=1, keepdims=True) + b_sq[None, :] - 2.0 * (a @ b.T)
    return np.maximum(d, 0.0, out=d)


def _knn_radii(x: np.ndarray, k: int) -> np.ndarray:
    """(N,) squared distance from each point to its k-th nearest other point."""
    x_sq = np.sum(x * x, axis=1)
    out = np.empty(len(x), np.float32)
    for rows in _row_chunks(len(x), len(x)):
        d = _sq_dists(x[rows], x, x_sq)
        d[np.arange(d.shape[0]), np.arange(rows.start, rows.stop)] = -1.0  # self comes first
        out[rows] = np.partition(d, k, axis=1)[:, k]  # index 0 is self, so k-th neighbour at k
    return out


def precision_recall(real_feats, fake_feats, k: int = 3) -> tuple[float, float]:
    """k-NN precision and recall (Kynkäänniemi et al. 2019) of ``fake`` against ``real``.

    Each sample's manifold ball has the radius of its k-th nearest neighbour in its own set;
    a fake sample counts for precision if it lies in some real ball, and a real sample for
    recall if it lies in some fake ball. Distances are computed in blocks of about 128 MB.
    """
    real = _as_features(real_feats, "real_feats").astype(np.float32)
    fake = _as_features(fake_feats, "fake_feats").astype(np.float32)
    if min(len(real), len(fake)) <= k:
        raise ValueError(
            f"need more than k={k} samples in each set, got {len(real)} real and {len(fake)} fake"
        )
    centre = real.mean(0)  # centred float32 keeps the |a|² + |b|² − 2ab cancellation small
    real, fake = real - centre, fake - centre
    r_real, r_fake = _knn_radii(real, k), _knn_radii(fake, k)
    real_sq = np.sum(real * real, axis=1)
    in_real = np.zeros(len(fake), bool)  # fake sample i inside the real manifold
    in_fake = np.zeros(len(real), bool)  # real sample j inside the fake manifold
    for rows in _row_chunks(len(fake), len(real)):
        d = _sq_dists(fake[rows], real, real_sq)  # (n_fake_chunk, n_real)
        in_real[rows] = np.any(d <= r_real[None, :], axis=1)
        in_fake |= np.any(d <= r_fake[rows, None], axis=0)
    return float(in_real.mean()), float(in_fake.mean())


# ------------------------------------------------------------------------------ linear probe


def _standardise(train: np.ndarray, *others: np.ndarray) -> list[np.ndarray]:
    mean, std = train.mean(0), train.std(0)
    std = np.where(std > 1e-8 * max(1.0, float(std.max())), std, 1.0)  # constant features stay 0
    return [((x - mean) / std).astype(np.float32) for x in (train, *others)]


def _fit_softmax(
    x: np.ndarray, y: np.ndarray, num_classes: int, weight_decay: float, steps: int
) -> tuple[np.ndarray, np.ndarray]:
    """Multinomial logistic regression by Nesterov-accelerated full-batch gradient descent.

    The loss is mean cross-entropy + ½·wd·‖W‖² (bias not decayed). Its Hessian is bounded
    by ½·λmax(XᵀX/n) + wd, so the step 1/L is safe without a line search.
    """
    n, f = x.shape
    onehot = np.eye(num_classes, dtype=np.float32)[y]  # (n, K)
    gram_max = _top_eigenvalue(x)
    lr = 1.0 / (0.5 * (gram_max + 1.0) + weight_decay)  # +1: the bias column
    w, b = np.zeros((f, num_classes), np.float32), np.zeros(num_classes, np.float32)
    w_prev, b_prev = w, b
    for t in range(1, steps + 1):
        mom = (t - 1) / (t + 2)
        wl, bl = w + mom * (w - w_prev), b + mom * (b - b_prev)  # look-ahead point
        logits = x @ wl + bl
        logits -= logits.max(1, keepdims=True)
        p = np.exp(logits)
        p /= p.sum(1, keepdims=True)
        g = (p - onehot) / n  # (n, K)
        w_prev, b_prev = w, b
        w = wl - lr * (x.T @ g + weight_decay * wl)
        b = bl - lr * g.sum(0)
    return w, b


def _top_eigenvalue(x: np.ndarray, iters: int = 30) -> float:
    """λmax of XᵀX/n by power iteration (seeded, so the step size is deterministic)."""
    v = np.random.default_rng(0).standard_normal(x.shape[1]).astype(np.float32)
    lam = 1.0
    for _ in range(iters):
        u = x.T @ (x @ v) / len(x)
        lam = float(np.linalg.norm(u))
        v = u / max(lam, 1e-12)
    return lam * 1.05  # power iteration approaches from below


def _accuracy(x, y, w, b) -> float:
    return float(np.mean(np.argmax(x @ w + b, axis=1) == y))


PROBE_WEIGHT_DECAYS = (1e-5, 1e-4, 1e-3, 1e-2)


def linear_probe(
    train_x,
    train_y,
    test_x,
    test_y,
    num_classes: int,
    steps: int = 300,
    seed: int = 0,
    weight_decay: float | None = None,
) -> float:
    """Test accuracy of a linear softmax classifier on standardised, flattened features.

    ``weight_decay=None`` picks it from ``PROBE_WEIGHT_DECAYS`` by accuracy on a seeded 10 %
    validation split of the training set, then refits on the whole training set.
    """
    x_train, x_test = _as_features(train_x, "train_x"), _as_features(test_x, "test_x")
    y_train, y_test = np.asarray(train_y, np.int64), np.asarray(test_y, np.int64)
    if len(y_train) != len(x_train) or len(y_test) != len(x_test):
        raise ValueError("features and labels differ in length")
    if weight_decay is None:
        perm = np.random.default_rng(seed).permutation(len(x_train))
        val, fit = perm[: max(1, len(perm) // 10)], perm[max(1, len(perm) // 10) :]
        xf, xv = _standardise(x_train[fit], x_train[val])
        scores = [
            _accuracy(xv, y_train[val], *_fit_softmax(xf, y_train[fit], num_classes, wd, steps))
            for wd in PROBE_WEIGHT_DECAYS
        ]
        weight_decay = PROBE_WEIGHT_DECAYS[int(np.argmax(scores))]  # first best: least decay
    xs, xt = _standardise(x_train, x_test)
    w, b = _fit_softmax(xs, y_train, num_classes, weight_decay, steps)
    return _accuracy(xt, y_test, w, b)


# --------------------------------------------------------------------------- Gaussian mixture

_LOG_2PI = math.log(2.0 * math.pi)


def _log_gauss(
    x: np.ndarray, x_sq: np.ndarray, means: np.ndarray, variances: np.ndarray
) -> np.ndarray:
    """(N, K) log N(x | μk, diag σk²), as three matrix products rather than an (N, K, D) array."""
    prec = 1.0 / variances  # (K, D)
    quad = x_sq @ prec.T - 2.0 * x @ (means * prec).T + np.sum(means**2 * prec, axis=1)
    return -0.5 * (quad + np.sum(np.log(variances), axis=1) + x.shape[1] * _LOG_2PI)


def _logsumexp(a: np.ndarray) -> np.ndarray:
    top = a.max(axis=1, keepdims=True)
    return (top + np.log(np.exp(a - top).sum(axis=1, keepdims=True)))[:, 0]


def _kmeans_pp(x: np.ndarray, x_sq: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    """k-means++ seeding: each new centre drawn with probability ∝ squared distance."""
    norms = x_sq.sum(1)  # (N,)
    picks = [int(rng.integers(len(x)))]
    d2 = np.full(len(x), np.inf)
    for _ in range(k):
        c = x[picks[-1]]
        d2 = np.minimum(d2, np.maximum(norms - 2.0 * x @ c + c @ c, 0.0))
        if len(picks) == k:
            break
        total = d2.sum()
        picks.append(
            int(rng.choice(len(x), p=d2 / total)) if total > 0 else int(rng.integers(len(x)))
        )
    return x[picks]


def _m_step(x, x_sq, resp, floor):
    nk = resp.sum(0) + 1e-10  # (K,)
    means = (resp.T @ x) / nk[:, None]
    variances = (resp.T @ x_sq) / nk[:, None] - means**2
    return nk / nk.sum(), means, np.maximum(variances, floor)


def fit_gmm(x, k: int, seed: int = 0, iters: int = 100, tol: float = 1e-6, var_floor: float = 1e-3):
    """Diagonal-covariance GMM by EM → ``(weights (K,), means (K, D), variances (K, D))``.

    Seeded by k-means++ with one hard assignment; variances never fall below
    ``var_floor`` × the data's variance per dimension (no component collapses on a point).
    Stops when the mean log-likelihood per dimension improves by less than ``tol``.
    """
    x = _as_features(x, "x").astype(np.float64)
    x_sq = x * x
    floor = var_floor * np.maximum(x.var(0), 1e-12)
    rng = np.random.default_rng([seed, k])
    centres = _kmeans_pp(x, x_sq, k, rng)
    d2 = x_sq.sum(1)[:, None] - 2.0 * x @ centres.T + np.sum(centres**2, 1)[None, :]
    resp = np.eye(k)[np.argmin(d2, axis=1)]
    weights, means, variances = _m_step(x, x_sq, resp, floor)
    prev = -np.inf
    for _ in range(iters):
        log_p = _log_gauss(x, x_sq, means, variances) + np.log(weights)  # (N, K)
        log_x = _logsumexp(log_p)
        ll = float(log_x.mean()) / x.shape[1]
        if ll - prev < tol:
            break
        prev = ll
        resp = np.exp(log_p - log_x[:, None])
        weights, means, variances = _m_step(x, x_sq, resp, floor)
    return weights, means, variances


def gmm_nll(
    train_x, heldout_x, components=(1, 2, 4, 8, 16, 32), seed: int = 0, iters: int = 100
) -> dict[int, float]:
    """Held-out NLL (nats per dimension) of a diagonal GMM fitted to ``train_x``, per K.

    Inputs are (N, ...) and flattened per sample; they are used as given, so normalise
    them first (e.g. per latent channel with training statistics).
    """
    train = _as_features(train_x, "train_x").astype(np.float64)
    held = _as_features(heldout_x, "heldout_x").astype(np.float64)
    if train.shape[1] != held.shape[1]:
        raise ValueError(f"feature sizes differ: {train.shape[1]} and {held.shape[1]}")
    out = {}
    for k in components:
        if not 1 <= k <= len(train):
            raise ValueError(f"cannot fit {k} components to {len(train)} samples")
        weights, means, variances = fit_gmm(train, k, seed, iters)
        log_p = _log_gauss(held, held * held, means, variances) + np.log(weights)
        out[int(k)] = float(-_logsumexp(log_p).mean() / held.shape[1])
    return out
