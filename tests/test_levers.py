"""The compute-only speed switches of ``ModelConfig``: each computes the same function as the
reference path it replaces (float32: to rounding; bf16: to bf16 tolerance), in both backends,
and none changes the parameter tree."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import maetok_jax.attention as ja
import maetok_jax.layers as jl
import maetok_jax.model as jm
import maetok_jax.targets as jtg
import maetok_torch.attention as ta
import maetok_torch.layers as tl
import maetok_torch.model as tm
import maetok_torch.targets as ttg
import maetok_torch.train as tt
from maetok.config import Config, ModelConfig, compute_only, preset
from maetok.params import init_params, spec_params
from maetok.parity import TOL, rel_err
from maetok.tree import flatten, leaves, map_tree

TINY = preset("tiny")


def _to_torch(tree):
    return map_tree(lambda a: torch.tensor(np.asarray(a)), tree)


def test_switches_are_compute_only_and_keep_the_parameter_tree():
    switches = {"remat", "lowp_norm", "split_qkv", "fast_filters", "stack_aux", "compile_scope"}
    assert switches <= compute_only(ModelConfig)
    flipped = {
        "remat": "dots",
        "lowp_norm": False,
        "split_qkv": False,
        "fast_filters": False,
        "stack_aux": False,
        "compile_scope": "step",
    }
    assert spec_params(TINY.replace(model=flipped).model) == spec_params(TINY.model)
    defaults = {f.name: f.default for f in dataclasses.fields(ModelConfig)}
    assert defaults["remat"] == "none" and defaults["stack_aux"] is True


@pytest.mark.parametrize("old, new", [(True, "full"), (False, "none")])
def test_old_boolean_remat_reads_as_a_mode(old, new):
    d = TINY.to_dict()
    d["model"]["remat"] = old
    cfg = Config.from_dict(d)
    assert cfg.model.remat == new
    assert Config.from_json(cfg.to_json()) == cfg


def test_stacked_aux_decoders_equal_the_separate_ones():
    cfg = TINY.replace(model={"query_pos": True})  # every leaf of a latent decoder
    m, off = cfg.model, cfg.replace(model={"stack_aux": False}).model
    assert jm.stackable_aux(m) and not jm.stackable_aux(off)
    rng = np.random.default_rng(3)
    aux = init_params(cfg, 5)["aux"]
    h = rng.standard_normal((2, m.num_latent_tokens, m.latent_dim)).astype(np.float32)
    feats = np.zeros((2, m.num_patches, m.dec_width), np.float32)  # unused by ViT aux heads

    def loss_j(p, mm):
        return sum(jnp.sum(v**2) for v in jm.aux_predict(p, jnp.asarray(h), feats, mm).values())

    pj = jax.tree_util.tree_map(jnp.asarray, aux)
    out = jm.aux_predict(pj, jnp.asarray(h), feats, m)
    ref = jm.aux_predict(pj, jnp.asarray(h), feats, off)
    for k in m.aux_targets:
        assert rel_err(out[k], ref[k]) < TOL["forward_fp32"], k
    grad = jax.jit(jax.grad(loss_j), static_argnums=1)  # one program per config
    g, g_ref = grad(pj, m), grad(pj, off)
    for (path, a), b in zip(flatten(g).items(), flatten(g_ref).values()):
        assert rel_err(a, b) < TOL["grad_fp32"], path

    pt = map_tree(lambda a: a.requires_grad_(True), _to_torch(aux))
    out_t = tm.aux_predict(pt, torch.tensor(h), torch.tensor(feats), m)
    ref_t = tm.aux_predict(pt, torch.tensor(h), torch.tensor(feats), off)
    for k in m.aux_targets:
        assert rel_err(out_t[k].detach(), ref_t[k].detach()) < TOL["forward_fp32"], k
        assert rel_err(out_t[k].detach(), ref[k]) < TOL["forward_fp32"], k  # and JAX's
    leaves = list(flatten(pt).values())
    ga = torch.autograd.grad(sum(torch.sum(v**2) for v in out_t.values()), leaves)
    gb = torch.autograd.grad(sum(torch.sum(v**2) for v in ref_t.values()), leaves)
    for a, b in zip(ga, gb):
        assert rel_err(a, b) < TOL["grad_fp32"]


def test_split_qkv_attention_equals_the_one_matmul_path():
    m = TINY.model
    rng = np.random.default_rng(4)
    blk = jax.tree_util.tree_map(lambda a: a[0], init_params(TINY, 1)["encoder"]["blocks"])
    params = {"qkv": blk["qkv"], "proj": blk["proj"]}
    x = rng.standard_normal((2, m.num_patches + m.num_latent_tokens, m.enc_width))
    x = x.astype(np.float32)
    cos, sin = jm.rope_for(m, m.enc_width, m.enc_heads, m.num_latent_tokens)
    for impl in ("plain", "fused"):
        a = ja.attention(params, x, cos, sin, m.enc_heads, impl, True)
        b = ja.attention(params, x, cos, sin, m.enc_heads, impl, False)
        assert rel_err(a, b) < TOL["forward_fp32"]
        pt, ct, st = _to_torch(params), torch.tensor(np.asarray(cos)), torch.tensor(np.asarray(sin))
        c = ta.attention(pt, torch.tensor(x), ct, st, m.enc_heads, impl, True)
        d = ta.attention(pt, torch.tensor(x), ct, st, m.enc_heads, impl, False)
        assert rel_err(c, d) < TOL["forward_fp32"] and rel_err(c, b) < TOL["forward_fp32"]


def test_lowp_layer_norm_and_gelu_match_float32_within_bf16_tolerance():
    rng = np.random.default_rng(6)
    x = (3 * rng.standard_normal((3, 2, 7, 32)) + 1).astype(np.float32)
    x = np.asarray(jnp.asarray(x, jnp.bfloat16).astype(jnp.float32))  # representable in bf16
    dy = rng.standard_normal(x.shape).astype(np.float32)
    for shape in ((32,), (3, 32)):  # one LayerNorm, and a stack of three
        p = {"scale": rng.standard_normal(shape), "bias": rng.standard_normal(shape)}
        p = {k: v.astype(np.float32) for k, v in p.items()}

        def f(x, p, lowp, dtype):
            cast = {k: jnp.asarray(v, dtype) for k, v in p.items()}
            y = jl.layer_norm(cast, jnp.asarray(x, dtype), 1e-6, lowp)
            return jnp.sum(jl.gelu(y, lowp).astype(jnp.float32) * dy)

        ref, g_ref = jax.value_and_grad(f, argnums=(0, 1))(x, p, False, jnp.float32)
        val, g = jax.value_and_grad(f, argnums=(0, 1))(x, p, True, jnp.bfloat16)
        assert g[0].dtype == jnp.float32  # the gradient reaches the float32 input
        assert rel_err(val, ref) < TOL["loss_bf16"]
        for a, b in zip(jax.tree_util.tree_leaves(g), jax.tree_util.tree_leaves(g_ref)):
            assert rel_err(a, b) < TOL["grad_bf16"]

        xt = torch.tensor(x, requires_grad=True)
        pt = map_tree(lambda a: torch.tensor(a, requires_grad=True), p)
        bf = map_tree(lambda a: a.to(torch.bfloat16), pt)
        y = tl.gelu(tl.layer_norm(bf, xt.to(torch.bfloat16), 1e-6, True), True)
        out = torch.sum(y.float() * torch.tensor(dy))
        assert rel_err(out.detach(), ref) < TOL["loss_bf16"]
        grads = torch.autograd.grad(out, [xt, *flatten(pt).values()])
        for a, b in zip(grads, [g_ref[0], *flatten(g_ref[1]).values()]):
            assert rel_err(a, b) < TOL["grad_bf16"]


def test_lowp_layer_norm_runs_on_rows():
    """The bf16 LayerNorm flattens (B, T, D) to rows (B·T, D), stacked (S, B·T, D), before its
    custom backward: the input it saves then has one layout on the GPU, not XLA's batch-minor
    choice for the weight gradients, whose backward built float32 (T, D, B) arrays
    (benchmarks/NOTES.md)."""
    x = jnp.ones((2, 3, 5, 8), jnp.bfloat16)
    for shape, rows in (((8,), "bf16[30,8]"), ((2, 8), "bf16[2,15,8]")):
        p = {"scale": jnp.ones(shape, jnp.bfloat16), "bias": jnp.zeros(shape, jnp.bfloat16)}
        jaxpr = str(jax.make_jaxpr(lambda v, p=p: jl.layer_norm(p, v, 1e-6, True))(x))
        call = next(line for line in jaxpr.splitlines() if "custom_vjp_call" in line)
        assert rows in call, (shape, call)
        assert jl.layer_norm(p, x, 1e-6, True).shape == x.shape


def test_jax_block_adds_its_residuals_on_rows():
    """Everything of a JAX block but attention runs on (B·T, D) rows: the residual adds, the
    LayerNorm affines and the MLP's bias add produce rows; the only (B, T, D) add left is the
    attention projection's bias (the layout lever of benchmarks/NOTES.md). The output is the
    3-D formula's."""
    import maetok_jax.transformer as jt

    m = TINY.model
    p = jax.tree_util.tree_map(
        lambda a: jnp.asarray(a[0]), init_params(TINY, 0)["encoder"]["blocks"]
    )
    x = jnp.asarray(np.random.default_rng(9).standard_normal((2, 5, m.enc_width)), jnp.float32)
    jaxpr = str(jax.make_jaxpr(lambda v: jt.block(p, v, None, None, m.enc_heads, 1e-6))(x))
    adds = [line for line in jaxpr.splitlines() if "= add " in line]
    assert sum(f"f32[10,{m.enc_width}] = add" in line for line in adds) >= 5, adds
    assert sum(f"f32[2,5,{m.enc_width}] = add" in line for line in adds) == 1, adds
    h = x + ja.attention(
        {"qkv": p["qkv"], "proj": p["proj"]},
        jl.layer_norm(p["ln1"], x, 1e-6),
        None,
        None,
        m.enc_heads,
    )
    ref = h + jl.mlp({"fc1": p["fc1"], "fc2": p["fc2"]}, jl.layer_norm(p["ln2"], h, 1e-6))
    np.testing.assert_allclose(
        jt.block(p, x, None, None, m.enc_heads, 1e-6), ref, rtol=1e-6, atol=1e-6
    )


@pytest.mark.parametrize("mode", ["dots", "dots_attn", "dots_gelu"])
def test_jax_dots_remat_keeps_the_layer_norm_statistics(mode):
    """Every "dots" policy keeps the bf16 LayerNorms' float32 mean and 1/σ (two (B·T, 1) arrays
    each), so their backward does not recompute a row reduction (benchmarks/NOTES.md); "full"
    keeps nothing. The gradients are those of the block without remat."""
    import contextlib
    import io

    from jax.ad_checkpoint import print_saved_residuals

    import maetok_jax.transformer as jt

    m = TINY.model
    p = jax.tree_util.tree_map(
        lambda a: jnp.asarray(a[0], jnp.bfloat16), init_params(TINY, 0)["encoder"]["blocks"]
    )
    x = jnp.asarray(np.random.default_rng(3).standard_normal((2, 5, m.enc_width)), jnp.bfloat16)

    def loss(mode):  # None: no remat
        block = lambda v, q: jt.block(q, v, None, None, m.enc_heads, 1e-6, lowp=True)
        f = jax.checkpoint(block, policy=jt.remat_policy(mode)) if mode else block
        return lambda v, q: jnp.sum(f(v, q).astype(jnp.float32) ** 2)

    def kept(mode):
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            print_saved_residuals(loss(mode), x, p)
        return [line for line in out.getvalue().splitlines() if "'norm_stats'" in line]

    assert len(kept(mode)) == 4 and all("f32[10,1]" in line for line in kept(mode)), kept(mode)
    assert kept("full") == []
    got = jax.grad(loss(mode), argnums=(0, 1))(x, p)
    ref = jax.grad(loss(None), argnums=(0, 1))(x, p)
    for a, b in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(ref)):
        np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32))


def test_gelu_is_torchs_erf_formula_and_has_no_erfc():
    """JAX's exact GELU is torch's ½x(1 + erf(x/√2)): float32 values and gradients agree to
    rounding, tails included, and no path traces ``erfc``, whose piecewise expansion made the
    GELU fusions the costliest non-matmul kernels of the GPU step (benchmarks/NOTES.md)."""
    x = np.linspace(-12, 12, 4001, dtype=np.float32)
    xt = torch.tensor(x, requires_grad=True)
    yt = tl.gelu(xt)
    yt.sum().backward()
    np.testing.assert_allclose(jl.gelu(jnp.asarray(x)), yt.detach(), rtol=0, atol=3e-6)
    grad = jax.grad(lambda v: jnp.sum(jl.gelu(v)))(jnp.asarray(x))
    np.testing.assert_allclose(grad, xt.grad, rtol=0, atol=1e-6)
    for lowp, dtype in ((False, jnp.float32), (False, jnp.bfloat16), (True, jnp.bfloat16)):
        step = jax.grad(lambda v, lowp=lowp: jnp.sum(jl.gelu(v, lowp).astype(jnp.float32)))
        jaxpr = str(jax.make_jaxpr(step)(jnp.asarray(x, dtype)))
        assert " erf " in jaxpr and "erfc" not in jaxpr, (lowp, dtype)


def test_fast_filters_are_bf16_only_and_close():
    rng = np.random.default_rng(7)
    m = TINY.model
    images = rng.uniform(-1, 1, (2, m.image_size, m.image_size, m.channels)).astype(np.float32)
    ref = jtg.compute_targets(jnp.asarray(images), m)
    # float32 compute: the switch changes nothing, bit for bit
    off = TINY.replace(model={"fast_filters": False}).model
    same = jtg.compute_targets(jnp.asarray(images), off)
    for k in ref:
        np.testing.assert_array_equal(np.asarray(same[k]), np.asarray(ref[k]))
    bf = TINY.replace(model={"compute_dtype": "bfloat16"}).model
    assert jtg.filter_dtype(bf) == jnp.bfloat16 and ttg.filter_dtype(bf) == torch.bfloat16
    fast_j = jtg.compute_targets(jnp.asarray(images), bf)
    fast_t = ttg.compute_targets(torch.tensor(images), bf)
    for k in ref:  # the pixel target has no convolution: unchanged
        # HOG votes on bf16 gradient orientations: a few per cent at most, in both backends
        low, high = (0, 0) if k == "pixel" else (1e-6, 0.1)
        assert low <= rel_err(fast_j[k], ref[k]) <= high, k
        assert rel_err(fast_t[k], fast_j[k]) <= max(high, TOL["forward_fp32"]), k


@pytest.mark.parametrize("mode", ["dots", "dots_attn", "dots_gelu"])
def test_torch_remat_modes_give_the_same_gradients(mode):
    cfg = TINY.replace(model={"attention": "fused"})
    m = cfg.model
    rng = np.random.default_rng(8)
    params = _to_torch(init_params(cfg, 2))
    images = torch.tensor(
        rng.uniform(-1, 1, (2, m.image_size, m.image_size, 3)), dtype=torch.float32
    )
    mask = torch.tensor(rng.random((2, m.num_patches)) < 0.5, dtype=torch.float32)

    def loss(p, mm):
        recon, h, preds = tm.forward(p, images, mask, mm)
        return (
            torch.mean(recon**2) + torch.mean(h**2) + sum(torch.mean(v**2) for v in preds.values())
        )

    leaves = [a.requires_grad_(True) for a in flatten(params).values()]
    ref = torch.autograd.grad(loss(params, m), leaves)
    got = torch.autograd.grad(loss(params, cfg.replace(model={"remat": mode}).model), leaves)
    for a, b in zip(got, ref):
        assert rel_err(a, b) < 1e-5


def _batch(cfg, seed: int) -> dict:
    """A batch of ``cfg.train.batch_size`` random images and masks at ratio 0.5."""
    m, b = cfg.model, cfg.train.batch_size
    rng = np.random.default_rng(seed)
    images = rng.uniform(-1, 1, (b, m.image_size, m.image_size, 3)).astype(np.float32)
    return {"images": images, "mask": (rng.random((b, m.num_patches)) < 0.5).astype(np.float32)}


@pytest.mark.parametrize("scope", ["block", "parts"])
def test_torch_compile_scopes_run_the_same_steps(scope, fresh_dynamo, monkeypatch):
    """``compile_scope`` block / parts: the blocks (and the optimiser's per-leaf update, and
    from the second step on the targets and the two losses) go through torch.compile (the
    ``eager`` compiler here, to keep CPU tests fast), and two steps compute what the eager
    steps do, new parameters and EMA included. The compiled run starts with no cached
    constants, as a fresh process does: a constant cached in the first step must not make
    a compiled block's guards fail in the second."""
    from maetok_torch import constants

    cfg = TINY.replace(train={"batch_size": 2}, model={"compile_scope": scope})
    batch = _batch(cfg, 9)
    runs = {}
    for name, step in (("eager", tt.make_train_step(cfg)), ("compiled", None)):
        if step is None:
            monkeypatch.setattr(constants, "_ON_DEVICE", {})
        step = step or tt.compile_train_step(cfg, backend="eager")
        state, graphs = tt.init_state(cfg, 0, device="cpu"), []
        for i in range(2):
            state, metrics = step(state, *tt.step_inputs(batch, cfg, i, "cpu"))
            graphs.append(getattr(step, "graphs", 0))
        runs[name] = (state, metrics, graphs)
    (ref_state, ref, _), (state, got, graphs) = runs["eager"], runs["compiled"]
    # the parts (targets, two losses) compile on the second step, three more graphs; the
    # optimiser's one dynamic-shape graph for every leaf is built in the first
    assert graphs[1] - graphs[0] == (3 if scope == "parts" else 0) and graphs[0] >= 1, graphs
    for k in ref:
        assert abs(float(got[k]) - float(ref[k])) <= 1e-5 * max(abs(float(ref[k])), 1e-3), k
    for key in ("params", "ema"):
        for a, b in zip(leaves(state[key]), leaves(ref_state[key])):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("scope", ["block", "parts"])
def test_torch_compile_builds_its_graphs_once_whatever_the_depth(scope, fresh_dynamo):
    """The compiled block is reused across depth and stacks, and each part is compiled
    once (on its second call): three times deeper stacks build no more graphs, and the
    steps after the first compiled part build none."""
    graphs = {}
    warm = 2 if scope == "parts" else 1  # steps until everything is compiled
    for depth in (1, 3):
        cfg = TINY.replace(
            train={"batch_size": 2},
            model={"enc_depth": depth, "dec_depth": depth, "aux_depth": depth},
        ).replace(model={"compile_scope": scope})
        batch = _batch(cfg, depth)
        step = tt.compile_train_step(cfg, backend="eager")
        state = tt.init_state(cfg, 0, device="cpu")
        for i in range(warm):
            state, _ = step(state, *tt.step_inputs(batch, cfg, i, "cpu"))
        graphs[depth] = step.graphs
        step(state, *tt.step_inputs(batch, cfg, warm, "cpu"))
        assert step.graphs == graphs[depth], "a later step built another graph"
    assert graphs[1] == graphs[3] >= 1, graphs


def test_torch_step_inputs_copy_the_batch_as_float32():
    """``step_inputs`` hands the step float32 copies: a batch changed after the call does not
    reach the step, and the scalars are ``step_scalars``' values."""
    from maetok.schedules import step_scalars

    cfg = TINY
    batch = _batch(cfg, 4)
    batch["images"] = batch["images"].astype(np.float64)
    images, mask, *scalars = tt.step_inputs(batch, cfg, 7, "cpu")
    assert images.dtype == mask.dtype == torch.float32
    np.testing.assert_array_equal(images.numpy(), batch["images"].astype(np.float32))
    before = images.clone()
    batch["images"][...] = 0.0
    assert torch.equal(images, before)
    expected = np.asarray(step_scalars(7, cfg), np.float32)
    assert [float(s) for s in scalars] == expected.tolist()


@pytest.mark.parametrize("stage", [1, 2])
def test_torch_step_reads_nothing_from_the_host(stage):
    """After its first call (which builds the cached constants), the torch step neither makes a
    tensor from host data nor reads a value back: on a GPU either would wait for every kernel
    queued before it, so the host could not queue the next step while the device runs this
    one (the EMA warm-up's decay was such a tensor)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Ops(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.seen = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.seen.append(str(func))
            return func(*args, **(kwargs or {}))

    cfg = TINY.replace(train={"batch_size": 2, "stage": stage})
    assert cfg.train.ema_decay > 0 and cfg.train.ema_warmup
    state = tt.init_state(cfg, 0, device="cpu")
    step = tt.make_train_step(cfg)
    state, _ = step(state, *tt.step_inputs(_batch(cfg, 0), cfg, 0, "cpu"))
    inputs = tt.step_inputs(_batch(cfg, 1), cfg, 1, "cpu")
    with Ops() as ops:
        step(state, *inputs)
    assert len(ops.seen) > 100  # the mode saw the step
    host = [op for op in ops.seen if "lift_fresh" in op or "_local_scalar_dense" in op]
    assert host == [], host
