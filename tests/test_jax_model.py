"""Shapes and structural properties of the JAX tokenizer (docs/design.md §3)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from maetok.params import init_params
from maetok.rope import rope_tables, rotation_tables
from maetok.targets import target_dim
from maetok_jax import model
from maetok_jax.patches import patchify, unpatchify
from maetok_jax.rope import apply_rope
from tests.conftest import random_images


def _setup(cfg, rng, batch=2, ratio=0.5):
    params = jax.tree_util.tree_map(jnp.asarray, init_params(cfg, 0))
    images = jnp.asarray(random_images(rng, cfg, batch))
    mask = jnp.asarray((rng.random((batch, cfg.model.num_patches)) < ratio).astype(np.float32))
    return params, images, mask


def test_patchify_round_trip_and_layout(tiny, rng):
    m = tiny.model
    x = jnp.asarray(random_images(rng, tiny, 3))
    tokens = patchify(x, m.patch_size)
    assert tokens.shape == (3, m.num_patches, m.patch_dim)
    np.testing.assert_array_equal(unpatchify(tokens, m.patch_size, 32, 32, 3), x)
    # token 1 is the second patch of the first row: pixels [0:p, p:2p]
    p = m.patch_size
    np.testing.assert_array_equal(tokens[0, 1].reshape(p, p, 3), x[0, :p, p : 2 * p])


def test_every_unit_has_the_documented_shape(tiny, rng):
    m = tiny.model
    params, images, mask = _setup(tiny, rng)
    x = model.patch_embed(params["encoder"]["patch_embed"], images, m)
    assert x.shape == (2, m.num_patches, m.enc_width)
    h = model.encode(params["encoder"], images, mask, m)
    assert h.shape == (2, m.num_latent_tokens, m.latent_dim) and h.dtype == jnp.float32
    recon, feats = model.decode(params["decoder"], h, m)
    assert recon.shape == images.shape and feats.shape == (2, m.num_patches, m.dec_width)
    preds = model.aux_predict(params["aux"], h, feats, m)
    assert set(preds) == set(m.aux_targets)
    for name, pred in preds.items():
        assert pred.shape == (2, m.num_patches, target_dim(name, m))
    assert np.isfinite(np.asarray(recon)).all()


def test_mlp_aux_heads_have_target_shapes(tiny, rng):
    cfg = tiny.replace(model={"aux_kind": "mlp"})
    params, images, mask = _setup(cfg, rng)
    _recon, _h, preds = model.forward(params, images, mask, cfg.model)
    for name, pred in preds.items():
        assert pred.shape == (2, cfg.model.num_patches, target_dim(name, cfg.model))


def test_masked_positions_receive_the_mask_token(tiny, rng):
    m = tiny.model
    params, images, mask = _setup(tiny, rng)
    enc = params["encoder"]
    x = model.patch_embed(enc["patch_embed"], images, m)
    out = np.asarray(model.apply_mask(x, mask, enc["mask_token"]))
    masked = np.asarray(mask) > 0
    assert masked.any() and (~masked).any()
    np.testing.assert_array_equal(
        out[masked], np.broadcast_to(enc["mask_token"], out[masked].shape)
    )
    np.testing.assert_array_equal(out[~masked], np.asarray(x)[~masked])


def test_latents_ignore_pixels_under_the_mask(tiny, rng):
    """Changing only masked patches must not change h: the encoder never sees them."""
    m = tiny.model
    params, images, mask = _setup(tiny, rng)
    h1 = model.encode(params["encoder"], images, mask, m)
    noise = jnp.asarray(rng.normal(size=images.shape).astype(np.float32))
    pix_mask = unpatchify(jnp.repeat(mask[..., None], m.patch_dim, -1), m.patch_size, 32, 32, 3)
    h2 = model.encode(params["encoder"], images + noise * pix_mask, mask, m)
    np.testing.assert_allclose(h1, h2, rtol=0, atol=1e-6)
    h3 = model.encode(params["encoder"], images + noise * (1 - pix_mask), mask, m)
    assert np.abs(np.asarray(h3 - h1)).max() > 1e-4


def test_latent_tokens_never_receive_rope(tiny, rng):
    m = tiny.model
    k = m.enc_width // m.enc_heads
    cos, sin = rotation_tables(m.grid, m.num_latent_tokens, k, m.rope_theta)
    x = jnp.asarray(
        rng.normal(size=(2, m.num_patches + m.num_latent_tokens, m.enc_heads, k)), jnp.float32
    )
    y = np.asarray(apply_rope(x, jnp.asarray(cos), jnp.asarray(sin)))
    np.testing.assert_array_equal(y[:, m.num_patches :], np.asarray(x)[:, m.num_patches :])
    # image tokens (but the one at row 0, column 0) are rotated, norms preserved
    assert np.abs(y[:, 1 : m.num_patches] - np.asarray(x)[:, 1 : m.num_patches]).max() > 1e-3
    np.testing.assert_allclose(
        np.linalg.norm(y, axis=-1), np.linalg.norm(np.asarray(x), axis=-1), rtol=1e-5
    )


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_rope_as_a_swap_is_rotate_half_bit_for_bit(tiny, rng, dtype):
    """Both backends' ``x·cos + swap(x)·(signs·sin)`` is ``x·cos + rotate_half(x)·sin``,
    value and gradient, bit for bit (every sign change and product by ±1 is exact)."""
    import torch

    from maetok_torch.rope import apply_rope as torch_rope

    m = tiny.model
    k = m.enc_width // m.enc_heads
    cos, sin = rope_tables(m.grid, m.num_latent_tokens, k, m.rope_theta)
    signed_sin = rotation_tables(m.grid, m.num_latent_tokens, k, m.rope_theta)[1]
    x = rng.normal(size=(2, m.num_patches + m.num_latent_tokens, 2, m.enc_heads, k))
    g = rng.normal(size=x.shape)
    jdt = jnp.dtype(dtype)

    def rotate_half(a):  # the textbook form: [a, b] → [−b, a] within each half (either backend)
        q = k // 4
        a_r, b_r, a_c, b_c = a[..., :q], a[..., q : 2 * q], a[..., 2 * q : 3 * q], a[..., 3 * q :]
        cat = torch.cat if isinstance(a, torch.Tensor) else jnp.concatenate
        return cat([-b_r, a_r, -b_c, a_c], -1)

    def reference(a):
        shape = (1, cos.shape[0], 1, 1, k)
        c = jnp.asarray(cos).reshape(shape).astype(jdt)
        s = jnp.asarray(sin).reshape(shape).astype(jdt)
        return a * c + rotate_half(a) * s

    def ours(a):
        return apply_rope(a, jnp.asarray(cos), jnp.asarray(signed_sin))

    xj, gj = jnp.asarray(x, jdt), jnp.asarray(g, jdt)
    want, want_vjp = jax.vjp(reference, xj)
    got, got_vjp = jax.vjp(ours, xj)
    assert np.abs(np.asarray(want - xj, np.float32)).max() > 1e-2  # it rotates
    np.testing.assert_array_equal(np.asarray(got, np.float32), np.asarray(want, np.float32))
    np.testing.assert_array_equal(
        np.asarray(got_vjp(gj)[0], np.float32), np.asarray(want_vjp(gj)[0], np.float32)
    )
    # torch against the same textbook form in torch (each framework rounds bf16 its own way)
    tdt = getattr(torch, dtype)
    ct = torch.from_numpy(cos).reshape(1, -1, 1, 1, k).to(tdt)
    st = torch.from_numpy(sin).reshape(1, -1, 1, 1, k).to(tdt)
    results = []
    for fn in (
        lambda a: a * ct + rotate_half(a) * st,
        lambda a: torch_rope(a, torch.from_numpy(cos), torch.from_numpy(signed_sin)),
    ):
        xt = torch.tensor(x).to(tdt).requires_grad_(True)
        yt = fn(xt)
        (gt,) = torch.autograd.grad(yt, xt, torch.tensor(g).to(tdt))
        results.append((yt.detach().float().numpy(), gt.float().numpy()))
    np.testing.assert_array_equal(results[1][0], results[0][0])
    np.testing.assert_array_equal(results[1][1], results[0][1])


def test_rope_scores_depend_on_relative_position(tiny, rng):
    """q·k after RoPE is unchanged when both tokens shift by the same (row, column) offset."""
    m = tiny.model
    k = 16
    cos, sin = rotation_tables(m.grid, 0, k, m.rope_theta)
    q = rng.normal(size=k).astype(np.float32)
    kk = rng.normal(size=k).astype(np.float32)
    g = m.grid

    def score(i, j):
        qs = jnp.broadcast_to(jnp.asarray(q), (1, g * g, 1, k))
        ks = jnp.broadcast_to(jnp.asarray(kk), (1, g * g, 1, k))
        rq = apply_rope(qs, jnp.asarray(cos), jnp.asarray(sin))[0, i, 0]
        rk = apply_rope(ks, jnp.asarray(cos), jnp.asarray(sin))[0, j, 0]
        return float(rq @ rk)

    a = score(0 * g + 1, 2 * g + 3)  # (0,1) vs (2,3)
    b = score(3 * g + 2, 5 * g + 4)  # (3,2) vs (5,4): same offset (2,2)
    c = score(3 * g + 2, 5 * g + 5)  # different offset
    assert abs(a - b) < 1e-4 and abs(a - c) > 1e-3


def test_bfloat16_compute_keeps_float32_outputs(tiny, rng):
    cfg = tiny.replace(model={"compute_dtype": "bfloat16"})
    params, images, mask = _setup(cfg, rng)
    recon, h, _preds = model.forward(params, images, mask, cfg.model)
    ref, _, _ = model.forward(params, images, mask, tiny.model)
    assert recon.dtype == jnp.float32 and h.dtype == jnp.float32
    err = float(jnp.abs(recon - ref).max() / jnp.abs(ref).max())
    assert 0 < err < 0.1  # bf16 differs, but only by rounding


@pytest.mark.parametrize("kernel", ["fused", "flash"])
def test_attention_kernel_model_matches_plain(tiny, rng, kernel):
    cfg = tiny.replace(model={"attention": kernel})
    params, images, mask = _setup(cfg, rng)
    a = model.forward(params, images, mask, cfg.model)[0]
    b = model.forward(params, images, mask, tiny.model)[0]
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("tokens", [80, 20])  # tiny's 16 patches + 64 latents; one padded
def test_flash_attention_matches_plain_values_and_gradients(tokens):
    from maetok_jax import attention as ja

    keys = jax.random.split(jax.random.PRNGKey(tokens), 4)
    q, k, v, w = (jax.random.normal(key, (2, tokens, 2, 16), jnp.float32) for key in keys)

    def loss(kernel, q, k, v):
        return jnp.sum(kernel(q, k, v) * w)

    for kernel in (ja._flash, ja._plain):
        assert kernel(q, k, v).shape == q.shape
    np.testing.assert_allclose(ja._flash(q, k, v), ja._plain(q, k, v), rtol=1e-5, atol=1e-5)
    grads = [jax.grad(loss, argnums=(1, 2, 3))(f, q, k, v) for f in (ja._flash, ja._plain)]
    for a, b in zip(*grads):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def test_remat_and_unroll_change_memory_not_numbers(tiny, rng):
    """Rematerialised or unrolled block stacks give the same loss and gradients."""
    params, images, mask = _setup(tiny, rng)

    def loss(p, m):
        recon, h, preds = model.forward(p, images, mask, m)
        return jnp.mean(recon**2) + jnp.mean(h**2) + sum(jnp.mean(v**2) for v in preds.values())

    value_and_grad = jax.jit(jax.value_and_grad(loss), static_argnums=1)  # one program each
    ref_val, ref_grad = value_and_grad(params, tiny.model)
    for change in (
        {"remat": "full"},
        {"remat": "dots"},
        {"remat": "dots_attn"},
        {"remat": "dots_gelu"},
        {"unroll": 2},
    ):
        m = tiny.replace(model=change).model
        val, grad = value_and_grad(params, m)
        np.testing.assert_allclose(val, ref_val, rtol=1e-6)
        for a, b in zip(jax.tree_util.tree_leaves(grad), jax.tree_util.tree_leaves(ref_grad)):
            err = float(jnp.max(jnp.abs(a - b)) / jnp.max(jnp.abs(b)))
            assert err < 1e-5, (change, err)


def test_query_pos_is_an_additive_per_position_query(tiny, rng):
    """``model.query_pos`` adds one (N, D) leaf per latent decoder: zero, it is the plain model."""
    cfg = tiny.replace(model={"query_pos": True})
    params, images, _ = _setup(cfg, rng)
    plain = jax.tree_util.tree_map(jnp.asarray, init_params(tiny, 0))
    for dec in [params["decoder"]] + [params["aux"][k] for k in cfg.model.aux_targets]:
        assert dec["query_pos"].shape == (cfg.model.num_patches, dec["query"].shape[0])
    h = model.encode(params["encoder"], images, jnp.zeros((2, cfg.model.num_patches)), cfg.model)
    zeroed = dict(params["decoder"], query_pos=jnp.zeros_like(params["decoder"]["query_pos"]))
    out_zero, _ = model.decode(zeroed, h, cfg.model)
    out_plain, _ = model.decode(plain["decoder"], h, tiny.model)
    np.testing.assert_allclose(out_zero, out_plain, rtol=1e-6, atol=1e-6)
    out_pos, _ = model.decode(params["decoder"], h, cfg.model)
    assert float(jnp.abs(out_pos - out_plain).max()) > 1e-3


def test_erf_rational_is_lax_erf_to_float32_precision():
    """The kernels' erf (multiplies, adds, a division) against XLA's, tails included."""
    from maetok_jax.layers import erf_rational, gelu_derivative

    x = jnp.linspace(-7.0, 7.0, 100_001, dtype=jnp.float32)
    assert float(jnp.max(jnp.abs(erf_rational(x) - jax.lax.erf(x)))) < 1e-6
    got, want = gelu_derivative(x, erf_rational), gelu_derivative(x)
    assert float(jnp.max(jnp.abs(got - want))) < 2e-6
    assert float(erf_rational(jnp.float32(-9.0))) == -1.0  # saturates, no overflow


@pytest.mark.parametrize("stacked", [False, True])
def test_bf16_dense_sums_its_bias_gradient_in_float32(stacked, rng):
    """The bias gradient of a bf16 dense is the cotangent summed over every row: over 65,536
    rows (a quarter of a ``base`` batch's tokens) it must be that sum to bf16's rounding of
    the result, not the ~1 % that a sum in bf16 loses, in both backends. The forward value
    is the bf16 add's."""
    import torch

    from maetok_jax.layers import dense
    from maetok_torch.layers import dense as torch_dense

    s, n, d = (2, 32768, 64) if stacked else (1, 65536, 64)
    x = jnp.asarray(rng.standard_normal((s, n, 4)), jnp.bfloat16)
    w = jnp.asarray(rng.standard_normal((s, 4, d)), jnp.bfloat16)
    b = jnp.asarray(rng.standard_normal((s, d)), jnp.bfloat16)
    g = jnp.asarray(rng.standard_normal((s, n, d)) * 0.01 + 0.003, jnp.bfloat16)
    if not stacked:
        x, w, b, g = x[0], w[0], b[0], g[0]
    y, vjp = jax.vjp(lambda b_: dense({"w": w, "b": b_}, x), b)
    (db,) = jax.jit(vjp)(g)
    want = np.asarray(g, np.float64).sum(axis=-2)
    assert db.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(db, np.float64), want, rtol=2.0**-8)
    plain = jnp.matmul(x, w) + (b[:, None] if stacked else b)
    np.testing.assert_array_equal(np.asarray(y, np.float32), np.asarray(plain, np.float32))
    tx, tw, tg = (torch.from_numpy(np.asarray(a, np.float32)).bfloat16() for a in (x, w, g))
    tb = torch.from_numpy(np.asarray(b, np.float32)).bfloat16().requires_grad_(True)
    (tdb,) = torch.autograd.grad(torch_dense({"w": tw, "b": tb}, tx), tb, tg)
    np.testing.assert_allclose(tdb.double().numpy(), want, rtol=2.0**-8)


def test_widen_is_the_float32_value_of_every_bf16():
    """``layers._widen`` builds float32 from a bf16's bits: every one of the 65,536 patterns
    (signed zeros, subnormals, infinities) must be the float32 that a convert gives."""
    from maetok_jax.layers import _widen

    x = jax.lax.bitcast_convert_type(
        jnp.arange(2**16, dtype=jnp.uint32).astype(jnp.uint16), jnp.bfloat16
    )
    got, want = (np.asarray(v).view(np.uint32) for v in (jax.jit(_widen)(x), x.astype(jnp.float32)))
    nan = np.isnan(np.asarray(x, np.float32))
    assert nan.sum() == 2 * 127  # the NaN patterns, compared as NaN below
    np.testing.assert_array_equal(got[~nan], want[~nan])
    assert np.isnan(np.asarray(_widen(x))[nan]).all()


def test_bf16_token_parameters_sum_their_gradients_in_float32(rng):
    """Parameters broadcast over many tokens (the mask token, the decoders' query, the latent
    tokens) get the cotangent summed over those tokens, in float32: to bf16's rounding of
    the sum over 65,536 tokens. Their forward values are unchanged."""
    from maetok_jax.layers import broadcast

    n, d = 65536, 64
    a = jnp.asarray(rng.standard_normal(d), jnp.bfloat16)
    g = jnp.asarray(rng.standard_normal((n, d)) * 0.01 + 0.003, jnp.bfloat16)
    y, vjp = jax.vjp(lambda a_: broadcast(a_, (n, d)), a)
    (da,) = jax.jit(vjp)(g)
    want = np.asarray(g, np.float64).sum(axis=0)
    np.testing.assert_allclose(np.asarray(da, np.float64), want, rtol=2.0**-8)
    np.testing.assert_array_equal(np.asarray(y), np.asarray(jnp.broadcast_to(a, (n, d))))

    # new leading axes and grown size-1 axes at once, as the stacked decoders' query has them
    q = jnp.asarray(rng.standard_normal((2, 1, d)), jnp.bfloat16)
    gq = jnp.asarray(rng.standard_normal((4, 2, 8192, d)) * 0.01 + 0.003, jnp.bfloat16)
    (dq,) = jax.jit(jax.vjp(lambda q_: broadcast(q_, gq.shape), q)[1])(gq)
    assert dq.shape == q.shape
    want = np.asarray(gq, np.float64).sum(axis=(0, 2))[:, None]
    np.testing.assert_allclose(np.asarray(dq, np.float64), want, rtol=2.0**-8)

    tokens = jnp.asarray(rng.standard_normal((1, n, d)), jnp.bfloat16)
    mask = jnp.asarray(rng.random((1, n)) < 0.75, jnp.float32)
    x, vjp = jax.vjp(lambda t_: model.apply_mask(tokens, mask, t_), a)
    (da,) = jax.jit(vjp)(g[None])
    want = (np.asarray(g, np.float64) * np.asarray(mask)[0, :, None]).sum(axis=0)
    np.testing.assert_allclose(np.asarray(da, np.float64), want, rtol=2.0**-8)
    np.testing.assert_array_equal(
        np.asarray(x)[0], np.where(np.asarray(mask)[0, :, None], a, tokens[0])
    )
