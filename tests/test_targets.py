"""Auxiliary targets, perceptual pyramid and patch-GAN against plain loop-based numpy.

The references below are written with explicit loops (per pixel / per output location)
and float64 arithmetic, independently of the vectorised code; both backends are checked
against the same references, so they also agree with each other.
"""

from __future__ import annotations

import importlib
import math
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest

try:  # the repository root, when the package is not installed
    import maetok  # noqa: F401 - only whether it imports
except ImportError:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax
import jax.numpy as jnp
import torch

import maetok.targets as core
from maetok.config import preset
from maetok.errors import ConfigError
from maetok.filters import PERCEP_LEVELS, filter_banks, hog_window_cells
from maetok.params import init_disc
from maetok.tree import map_tree

BACKENDS = ("jax", "torch")
RTOL, ATOL = 1e-5, 1e-5  # float32 code vs float64 references


@pytest.fixture
def rng(request) -> np.random.Generator:
    return np.random.default_rng(zlib.crc32(request.node.nodeid.encode()))


def _cfg(size: int, p: int):
    return preset("tiny").replace(model={"image_size": size, "patch_size": p}).model


def _images(rng, m, b=2) -> np.ndarray:
    return rng.uniform(-1, 1, (b, m.image_size, m.image_size, m.channels)).astype(np.float32)


def _mod(backend: str, name: str):
    return importlib.import_module(f"maetok_{backend}.{name}")


def _arr(backend: str, x):
    return map_tree(jnp.asarray if backend == "jax" else lambda a: torch.as_tensor(np.array(a)), x)


def _run(backend: str, fn, *args):
    """Call ``fn(*args)``; under jax.jit for JAX (the config, last, static) — eager JAX
    compiles every small op separately and is many times slower here."""
    if backend == "jax":
        return jax.jit(fn, static_argnums=len(args) - 1)(*args)
    return fn(*args)


def _np(y) -> np.ndarray:
    return y.detach().numpy() if isinstance(y, torch.Tensor) else np.asarray(y)


# ------------------------------------------------------------------------ numpy references


def _reflect(i: int, n: int) -> int:
    """numpy 'reflect' index (edge not repeated), for one reflection."""
    return -i if i < 0 else (2 * (n - 1) - i if i >= n else i)


def ref_corr_reflect(img: np.ndarray, kernel: np.ndarray) -> np.ndarray:
    """(h, w) ⋆ (k, k, F) with reflect padding, looping over output pixels → (h, w, F)."""
    h, w = img.shape
    k = kernel.shape[0]
    r = k // 2
    out = np.zeros((h, w, kernel.shape[-1]))
    for y in range(h):
        for x in range(w):
            win = np.array(
                [
                    [img[_reflect(y + i - r, h), _reflect(x + j - r, w)] for j in range(k)]
                    for i in range(k)
                ]
            )
            out[y, x] = np.tensordot(win, kernel, axes=([0, 1], [0, 1]))
    return out


def ref_hog(images: np.ndarray, m) -> np.ndarray:
    b, h, w, c = images.shape
    p, cell, nb = m.patch_size, core.hog_cell(m.patch_size), core.HOG_BINS
    f = filter_banks(p)
    sx, sy = (f["sobel"][:, :, 0, i].astype(np.float64) for i in (0, 1))
    win = f["hog_window"].astype(np.float64)
    img = images.astype(np.float64)
    hist = np.zeros((b, h // cell, w // cell, c, nb))
    for bi in range(b):
        for ci in range(c):
            for y in range(h):
                for x in range(w):
                    gx = gy = 0.0
                    for i in range(3):
                        for j in range(3):
                            v = img[bi, _reflect(y + i - 1, h), _reflect(x + j - 1, w), ci]
                            gx += sx[i, j] * v
                            gy += sy[i, j] * v
                    theta = math.atan2(gx, gy) % math.pi  # unsigned, [0, π)
                    t = theta / (math.pi / nb) - 0.5  # bin k centred at t = k
                    lo = math.floor(t)
                    frac = t - lo
                    weight = math.hypot(gx, gy) * win[y % p, x % p]
                    hist[bi, y // cell, x // cell, ci, lo % nb] += (1 - frac) * weight
                    hist[bi, y // cell, x // cell, ci, (lo + 1) % nb] += frac * weight
    hist /= np.sqrt((hist**2).sum(-1, keepdims=True) + 1e-6)
    u, gh, gw = p // cell, h // p, w // p
    out = np.zeros((b, gh * gw, u * u * c * nb))
    for bi in range(b):
        for py in range(gh):
            for px in range(gw):
                for i in range(u):
                    for j in range(u):
                        for ci in range(c):
                            for k in range(nb):
                                out[bi, py * gw + px, ((i * u + j) * c + ci) * nb + k] = hist[
                                    bi, py * u + i, px * u + j, ci, k
                                ]
    return out


def ref_conv_features(images: np.ndarray, m) -> np.ndarray:
    b, h, w, c = images.shape
    p = m.patch_size
    bank = filter_banks(p)["gabor"][:, :, 0, :].astype(np.float64)  # (k, k, 2·S·O)
    so = bank.shape[-1] // 2
    gh, gw = h // p, w // p
    out = np.zeros((b, gh * gw, c * so))
    for bi in range(b):
        for ci in range(c):
            r = ref_corr_reflect(images[bi, :, :, ci].astype(np.float64), bank)
            e = np.sqrt(r[..., 0::2] ** 2 + r[..., 1::2] ** 2 + 1e-6)  # (h, w, S·O)
            for py in range(gh):
                for px in range(gw):
                    out[bi, py * gw + px, ci * so : (ci + 1) * so] = e[
                        py * p : (py + 1) * p, px * p : (px + 1) * p
                    ].mean((0, 1))
    return out


def ref_perceptual_features(images: np.ndarray, m) -> list[np.ndarray]:
    bank = filter_banks(m.patch_size)["percep"][:, :, 0, :].astype(np.float64)  # (5, 5, 5)
    nf = bank.shape[-1]
    x, feats = images.astype(np.float64), []
    for level in range(PERCEP_LEVELS):
        if level:
            b, h, w, c = x.shape
            x = x.reshape(b, h // 2, 2, w // 2, 2, c).mean((2, 4))
        b, h, w, c = x.shape
        f = np.zeros((b, h, w, c * nf))
        for bi in range(b):
            for ci in range(c):
                r = ref_corr_reflect(x[bi, :, :, ci], bank)
                f[bi, :, :, ci * nf : (ci + 1) * nf] = np.sqrt(r**2 + 1e-6)
        feats.append(f)
    return feats


def _ref_conv_zero(x, w, bias, stride, pad):
    """(h, w, in) ⋆ (k, k, in, out), zero padding (before, after) per axis, looped."""
    k = w.shape[0]
    xp = np.pad(x, (pad, pad, (0, 0)))
    ho = (xp.shape[0] - k) // stride + 1
    wo = (xp.shape[1] - k) // stride + 1
    out = np.zeros((ho, wo, w.shape[-1]))
    for y in range(ho):
        for xx in range(wo):
            patch = xp[y * stride : y * stride + k, xx * stride : xx * stride + k]
            out[y, xx] = np.tensordot(patch, w, axes=3) + bias
    return out


def ref_discriminator(params, images, m) -> np.ndarray:
    outs = []
    for img in images.astype(np.float64):
        x = img
        for i in range(m.disc_depth):
            p = params[f"conv{i}"]
            x = _ref_conv_zero(x, p["w"].astype(np.float64), p["b"], 2, (1, 1))
            x = np.where(x > 0, x, 0.2 * x)
        p = params["out"]
        outs.append(_ref_conv_zero(x, p["w"].astype(np.float64), p["b"], 1, (1, 2))[..., 0])
    return np.stack(outs)


# ------------------------------------------------------------------------------------ tests


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("size,p", [(16, 4), (16, 8), (32, 16)])
def test_hog_matches_loop_reference(backend, size, p, rng):
    m = _cfg(size, p)
    x = _images(rng, m)
    y = _np(_run(backend, _mod(backend, "targets").hog, _arr(backend, x), m))
    assert y.shape == (2, m.num_patches, core.target_dim("hog", m))
    np.testing.assert_allclose(y, ref_hog(x, m), rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("size,p", [(16, 4), (32, 8)])
def test_conv_features_match_loop_reference(backend, size, p, rng):
    m = _cfg(size, p)
    x = _images(rng, m)
    y = _np(_run(backend, _mod(backend, "targets").conv_features, _arr(backend, x), m))
    assert y.shape == (2, m.num_patches, core.target_dim("conv", m))
    np.testing.assert_allclose(y, ref_conv_features(x, m), rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("backend", BACKENDS)
def test_normalized_pixels_standardise_each_patch(backend, rng):
    m = _cfg(32, 4)
    x = _images(rng, m)
    y = _np(_run(backend, _mod(backend, "targets").normalized_pixels, _arr(backend, x), m))
    assert y.shape == (2, m.num_patches, m.patch_dim)
    np.testing.assert_allclose(y.mean(-1), 0.0, atol=1e-5)
    np.testing.assert_allclose(y.std(-1), 1.0, rtol=1e-4)
    patches = x.reshape(2, 8, 4, 8, 4, 3).transpose(0, 1, 3, 2, 4, 5).reshape(2, 64, 48)
    patches = patches.astype(np.float64)
    ref = (patches - patches.mean(-1, keepdims=True)) / np.sqrt(
        patches.var(-1, keepdims=True) + 1e-6
    )
    np.testing.assert_allclose(y, ref, rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("backend", BACKENDS)
def test_hog_edge_orientation(backend, rng):
    """A vertical edge (gx ≠ 0, gy = 0) votes into bin 4; a horizontal one splits 8 | 0."""
    m = _cfg(16, 8)
    lo, hi = rng.uniform(-0.9, -0.5), rng.uniform(0.5, 0.9)
    vertical = np.full((1, 16, 16, 3), lo, np.float32)
    vertical[:, :, 8:] = hi
    y = _np(_run(backend, _mod(backend, "targets").hog, _arr(backend, vertical), m)).reshape(
        4, 3, 9
    )
    np.testing.assert_allclose(y[..., 4], 1.0, atol=1e-4)  # every cell touches the edge
    assert np.abs(np.delete(y, 4, axis=-1)).max() < 1e-6
    horizontal = np.ascontiguousarray(vertical.transpose(0, 2, 1, 3))
    y = _np(_run(backend, _mod(backend, "targets").hog, _arr(backend, horizontal), m)).reshape(
        4, 3, 9
    )
    np.testing.assert_allclose(y[..., [0, 8]], 2**-0.5, atol=1e-4)
    assert np.abs(y[..., 1:8]).max() < 1e-6


@pytest.mark.parametrize("backend", BACKENDS)
def test_registry_custom_target(backend, rng):
    mod = _mod(backend, "targets")
    name = f"mean_colour_{backend}"

    def mean_colour(images, m):  # (B, H, W, C) → (B, N, C)
        b, h, w, c = images.shape
        p = m.patch_size
        return images.reshape(b, h // p, p, w // p, p, c).mean((2, 4)).reshape(b, -1, c)

    mod.register_target(name, mean_colour, lambda m: m.channels)
    try:
        m = preset("tiny").replace(model={"aux_targets": ("pixel", name, "hog")}).model
        x = _images(rng, m)
        xs = _arr(backend, x)
        if backend == "torch":
            xs.requires_grad_(True)
        out = _run(backend, mod.compute_targets, xs, m)
        assert set(out) == {"pixel", name, "hog"}
        assert out[name].shape == (2, m.num_patches, 3)
        np.testing.assert_allclose(_np(out[name]), mean_colour(x, m), rtol=1e-6, atol=1e-6)
        if backend == "torch":
            assert not any(v.requires_grad for v in out.values())
        else:  # no gradient flows back through compute_targets
            total = lambda im: sum(v.sum() for v in mod.compute_targets(im, m).values())
            g = jax.jit(jax.grad(total))(xs)
            assert not np.any(np.asarray(g))
    finally:
        mod.TARGETS.pop(name, None)
        core._DIMS.pop(name, None)
    with pytest.raises(ConfigError, match="unknown auxiliary target"):
        preset("tiny").replace(model={"aux_targets": ("pixel", "no_such_target")})


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bank,hw", [("sobel", (7, 9)), ("percep", (12, 40)), ("gabor", (14, 76))])
def test_fixed_conv_and_its_gradient_match_loop_reference(backend, bank, hw, rng):
    """The convolution on pixel blocks is a 'VALID' correlation, whether or not the output
    fills whole blocks (outputs 5×7, 8×36 and 2×64 against blocks of 4), and so is its
    gradient (a full convolution with the flipped kernel)."""
    kernel = filter_banks(16)[bank]  # (k, k, 1, F)
    k, nf = kernel.shape[0], kernel.shape[-1]
    x = rng.standard_normal((2, *hw)).astype(np.float32)
    h, w = hw[0] - k + 1, hw[1] - k + 1
    g = rng.standard_normal((2, h, w, nf)).astype(np.float32)
    ref = np.zeros((2, h, w, nf))
    dref = np.zeros(x.shape)
    for n in range(2):
        for i in range(h):
            for j in range(w):
                ref[n, i, j] = np.tensordot(x[n, i : i + k, j : j + k], kernel[:, :, 0], 2)
                dref[n, i : i + k, j : j + k] += kernel[:, :, 0] @ g[n, i, j]
    conv = _mod(backend, "targets").fixed_conv
    if backend == "jax":
        y, vjp = jax.vjp(lambda a: conv(a, kernel), jnp.asarray(x))
        (dx,) = vjp(jnp.asarray(g))
    else:
        xt = torch.as_tensor(x).requires_grad_(True)
        y = conv(xt, kernel)
        (dx,) = torch.autograd.grad(y, xt, torch.as_tensor(g))
    np.testing.assert_allclose(_np(y), ref, rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(_np(dx), dref, rtol=RTOL, atol=10 * ATOL)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("block,hw", [(2, (11, 12)), (8, (18, 27))])
def test_block_conv_lays_out_the_loop_reference_by_block(backend, block, hw, rng):
    """``block_conv`` on blocks of any side puts output pixel (i·block + u, j·block + v) at
    [i, j, u·block + v] (outputs 9×10 on blocks of 2, 16×25 on blocks of 8, the last block
    column part-filled); ``hog_window_cells`` uses the same layout for the HOG window."""
    kernel = filter_banks(16)["sobel"]  # (3, 3, 1, 2)
    x = rng.standard_normal((2, *hw)).astype(np.float32)
    h, w = hw[0] - 2, hw[1] - 2
    ref = np.zeros((2, h, w, 2))
    for n in range(2):
        for i in range(h):
            for j in range(w):
                ref[n, i, j] = np.tensordot(x[n, i : i + 3, j : j + 3], kernel[:, :, 0], 2)
    y = _np(_mod(backend, "targets").block_conv(_arr(backend, x), kernel, block=block))
    assert y.shape == (2, -(-h // block), -(-w // block), block * block, 2)
    for i in range(h):
        for j in range(w):
            got = y[:, i // block, j // block, (i % block) * block + j % block]
            np.testing.assert_allclose(got, ref[:, i, j], rtol=RTOL, atol=ATOL)
    win = np.tile(filter_banks(8)["hog_window"], (2, 3))  # a 16 × 24 image of 8-pixel patches
    cells = hog_window_cells(8, 4, 16, 24)
    assert cells.shape == (4, 6, 16)
    for i in range(16):
        for j in range(24):
            assert cells[i // 4, j // 4, (i % 4) * 4 + j % 4] == win[i, j]


@pytest.mark.parametrize("backend", BACKENDS)
def test_perceptual_features_match_loop_reference(backend, rng):
    m = _cfg(16, 4)
    x = _images(rng, m)
    feats = _run(backend, _mod(backend, "perceptual").perceptual_features, _arr(backend, x), m)
    ref = ref_perceptual_features(x, m)
    assert len(feats) == PERCEP_LEVELS
    for level, (f, r) in enumerate(zip(feats, ref)):
        assert f.shape == (2, 16 >> level, 16 >> level, 15)
        np.testing.assert_allclose(_np(f), r, rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("backend", BACKENDS)
def test_perceptual_loss_zero_positive_and_gradient(backend, rng):
    m = _cfg(32, 4)
    mod = _mod(backend, "perceptual")
    x = _images(rng, m)
    r = np.clip(x + 0.1 * rng.standard_normal(x.shape), -1, 1).astype(np.float32)
    if backend == "jax":  # one compile for both calls
        value_and_grad = jax.jit(
            jax.value_and_grad(lambda a, b: mod.perceptual_loss(a, b, m), argnums=1)
        )
        same, _ = value_and_grad(jnp.asarray(x), jnp.asarray(x.copy()))
        diff, g = value_and_grad(jnp.asarray(x), jnp.asarray(r))
        g = np.asarray(g)
    else:
        same = mod.perceptual_loss(torch.as_tensor(x), torch.as_tensor(x.copy()), m)
        rt = torch.as_tensor(r).requires_grad_(True)
        diff = mod.perceptual_loss(torch.as_tensor(x), rt, m)
        diff.backward()
        g = rt.grad.numpy()
    assert abs(float(_np(same))) < 1e-12
    assert float(_np(diff)) > 1e-4
    assert g.shape == x.shape and np.all(np.isfinite(g)) and np.abs(g).max() > 0


@pytest.mark.parametrize("backend", BACKENDS)
def test_discriminator_matches_loop_reference(backend, rng):
    m = _cfg(16, 4)  # tiny: disc_width 16, disc_depth 2
    params = init_disc(m, int(rng.integers(1 << 30)))
    params = {
        k: {"w": v["w"], "b": (0.1 * rng.standard_normal(v["b"].shape)).astype(np.float32)}
        for k, v in params.items()
    }  # non-zero biases so they are tested too
    x = _images(rng, m)
    disc = _mod(backend, "discriminator").discriminator
    y = _np(_run(backend, disc, _arr(backend, params), _arr(backend, x), m))
    assert y.shape == (2, 16 >> m.disc_depth, 16 >> m.disc_depth)
    np.testing.assert_allclose(y, ref_discriminator(params, x, m), rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("backend", BACKENDS)
def test_gan_losses_match_numpy(backend, rng):
    d = _mod(backend, "discriminator")
    real = rng.standard_normal((3, 4, 4)).astype(np.float32) * 2
    fake = rng.standard_normal((3, 4, 4)).astype(np.float32) * 2
    ema_r, ema_f = float(rng.uniform(0, 1)), float(rng.uniform(-1, 0))
    rd, fd = real.astype(np.float64), fake.astype(np.float64)
    rj, fj = _arr(backend, real), _arr(backend, fake)
    hinge = np.maximum(0, 1 - rd).mean() + np.maximum(0, 1 + fd).mean()
    lecam = (np.maximum(0, rd - ema_f) ** 2).mean() + (np.maximum(0, ema_r - fd) ** 2).mean()
    np.testing.assert_allclose(float(d.hinge_d_loss(rj, fj)), hinge, rtol=1e-6)
    np.testing.assert_allclose(float(d.generator_adv_loss(fj)), -fd.mean(), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(float(d.lecam_loss(rj, fj, ema_r, ema_f)), lecam, rtol=1e-6)
    new_r, new_f = d.update_lecam(ema_r, ema_f, rj, fj, 0.9)
    np.testing.assert_allclose(float(new_r), 0.9 * ema_r + 0.1 * rd.mean(), rtol=1e-6)
    np.testing.assert_allclose(float(new_f), 0.9 * ema_f + 0.1 * fd.mean(), rtol=1e-6)


def test_torch_constants_are_copied_to_their_device_once():
    """The block kernels, the HOG window and the RoPE tables: one tensor per key, device and
    dtype, built from the same numpy as JAX's."""
    from maetok.filters import block_kernel
    from maetok_jax.rope import rope_for as jax_rope
    from maetok_torch.constants import on_device
    from maetok_torch.rope import rope_for

    kernel = filter_banks(16)["gabor"]
    calls = []

    def build():
        calls.append(1)
        return block_kernel(kernel)

    key = ("test-block", kernel.tobytes(), kernel.shape)
    a = on_device(key, build, "cpu", torch.bfloat16)
    assert on_device(key, build, "cpu", torch.bfloat16) is a and len(calls) == 1
    b = on_device(key, build, "cpu", torch.float32)
    assert b is not a and b.dtype == torch.float32 and len(calls) == 2
    np.testing.assert_array_equal(b.numpy(), block_kernel(kernel))
    m = preset("tiny").model
    cos, sin = rope_for(m, m.enc_width, m.enc_heads, m.num_latent_tokens)
    assert rope_for(m, m.enc_width, m.enc_heads, m.num_latent_tokens)[0] is cos
    jcos, jsin = jax_rope(m, m.enc_width, m.enc_heads, m.num_latent_tokens)
    np.testing.assert_array_equal(cos.numpy(), np.asarray(jcos))
    np.testing.assert_array_equal(sin.numpy(), np.asarray(jsin))
