"""``maetok parity``: how far apart the JAX and torch backends are, component by component.

``run_parity(preset, device, dtype)`` builds one set of parameters with
``maetok.params.init_params`` (numpy), gives them to both backends, and reports the
relative error ``max|torch − jax| / max|jax|`` (JAX is the reference) of every unit of
the tokenizer, every loss term, the gradients of the Stage-1, Stage-2 and discriminator
losses (the worst leaf of each parameter group), and a 3-step training trajectory (losses
at every step; parameters by the L2 disagreement of their updates, see
``TOL["trajectory_early_fp32"]``). Each row is ``(name, error, tolerance, passed)``.

``TOL`` below is THE tolerance table of the project: ``parity_tests/conftest.py`` imports
it, so the report a user runs and the test suite hold both backends to the same numbers.

The check runs with the adversarial loss and its adaptive weight switched on (whatever the
preset says), so the discriminator and every loss term are exercised, and with batch 2 so
``seed``/``base`` fit on a laptop. On a GPU, TF32 is switched off in torch and JAX matmuls
run at "highest" precision for the duration of the run: fp32 means fp32 on both sides.
"""

from __future__ import annotations

import contextlib
import os
import time

import numpy as np

from maetok.tree import flatten, map_tree

# Relative errors, max|a − b| / max|b| per array (per parameter leaf for gradients and
# trajectories; the worst leaf of a group is reported).
TOL = {
    "forward_fp32": 1e-5,  # one forward pass, float32
    "grad_fp32": 1e-4,  # gradients through one forward/backward, float32
    "trajectory_fp32": 1e-4,  # losses at every step, and parameters after 10+ steps, float32
    # Parameters after the first few (≤ 3) steps, per leaf as ‖Δp_torch − Δp_jax‖₂ / ‖Δp_jax‖₂
    # (Δp: the change since the start; see ``update_rel_l2``), not max-abs. An element's
    # first Adam updates are lr·g/(|g| + eps): where |g| is near eps — gradients that
    # vanish analytically (the key bias under softmax shift invariance) and the many small
    # ones of wide stacks — fp32 rounding of g, as small relative to the leaf's gradient as
    # anywhere else, moves that element's update by up to ~10%. Both backends round
    # correctly, in different orders; the gradients (grad_fp32) and the optimiser from
    # identical gradients (forward_fp32) are held tightly in their own rows. Measured after
    # 3 steps: tiny 5e-5, seed 1.5e-4, base 2e-3 (parameters) and 4.8e-3 (discriminator);
    # max-abs per leaf on base reaches 1.7e-2.
    "trajectory_early_fp32": 1e-2,
    "loss_bf16": 2e-2,  # losses and model outputs with compute_dtype = bfloat16
    "grad_bf16": 5e-2,  # gradients with compute_dtype = bfloat16 (worst leaf of a group)
}

PARITY_BATCH = 2
TRAJECTORY_STEPS = 3


def rel_err(a, b) -> float:
    """max|a − b| / max(max|b|, tiny) for one array (``b`` is the reference)."""
    a, b = _np(a).astype(np.float64), _np(b).astype(np.float64)
    assert a.shape == b.shape, f"shape mismatch {a.shape} vs {b.shape}"
    if not (np.all(np.isfinite(a)) and np.all(np.isfinite(b))):
        return float("inf")
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), np.finfo(np.float64).tiny))


def _np(x) -> np.ndarray:
    if hasattr(x, "detach"):  # a torch tensor (bf16 has no numpy dtype: go through fp32)
        return x.detach().float().cpu().numpy()
    return np.asarray(x)


def worst_leaf(torch_tree, jax_tree) -> tuple[float, str]:
    """The largest per-leaf rel_err over matching leaves, and that leaf's path."""
    a, b = flatten(torch_tree), flatten(jax_tree)
    assert set(a) == set(b), f"trees differ: {sorted(set(a) ^ set(b))[:5]}"
    return max((rel_err(a[k], b[k]), k) for k in b) if b else (0.0, "")


def update_rel_l2(a, b, start) -> float:
    """‖a − b‖₂ / ‖b − start‖₂: how far two parameter updates (from ``start``) disagree."""
    a, b, start = (_np(x).astype(np.float64) for x in (a, b, start))
    if not (np.all(np.isfinite(a)) and np.all(np.isfinite(b))):
        return float("inf")
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b - start), np.finfo(np.float64).tiny))


def worst_update(torch_tree, jax_tree, start_tree) -> tuple[float, str]:
    """The largest per-leaf ``update_rel_l2`` over matching leaves, and that leaf's path."""
    a, b, s = flatten(torch_tree), flatten(jax_tree), flatten(start_tree)
    assert set(a) == set(b) == set(s), "trees differ"
    return max((update_rel_l2(a[k], b[k], s[k]), k) for k in b) if b else (0.0, "")


def parity_config(preset_name: str = "tiny", dtype: str = "float32"):
    """The preset with adversarial terms on (from step 0) and batch 2."""
    from maetok.config import preset

    return preset(preset_name).replace(
        model={"compute_dtype": dtype},
        loss={"use_adv": True, "adaptive_weight": True, "disc_start": 0},
        train={"batch_size": PARITY_BATCH},
    )


def disc_off_margin(disc: dict, images: np.ndarray, m) -> dict:
    """The discriminator with its output bias shifted so half the real logits lie past the
    hinge margin (``1 − median``).

    At initialisation every logit sits inside (−1, 1), so the hinge gradient of the output
    bias is exactly −1 + 1 and what is left is the LeCAM term, itself a difference of two
    near-equal means: a cancellation whose relative error says nothing about the
    implementation. Off the margin the bias gradient is about 1/2, well conditioned.
    """
    import jax.numpy as jnp

    from maetok_jax.discriminator import discriminator

    logits = np.asarray(
        discriminator(
            {k: {n: jnp.asarray(v) for n, v in p.items()} for k, p in disc.items()},
            jnp.asarray(images),
            m,
        )
    )
    out = {k: dict(v) for k, v in disc.items()}
    out["out"]["b"] = (disc["out"]["b"] + np.float32(1.0 - np.median(logits))).astype(np.float32)
    return out


@contextlib.contextmanager
def _pinned_precision(device: str):
    """fp32 means fp32: JAX matmuls at "highest", torch TF32 off (restored afterwards)."""
    import jax
    import torch

    flags = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    try:
        with jax.default_matmul_precision("highest"):
            yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = flags


def run_parity(
    preset_name: str = "tiny", device: str = "cpu", dtype: str = "float32"
) -> tuple[list[tuple[str, float, float, bool]], bool]:
    """Compare the backends on ``preset_name`` → (rows, every row passed)."""
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # torch shares the GPU
    with _pinned_precision(device):
        rows = _run(preset_name, device, dtype)
    return rows, all(r[3] for r in rows)


def _run(preset_name: str, device: str, dtype: str):
    import jax
    import jax.numpy as jnp
    import torch

    import maetok_jax.attention as ja
    import maetok_jax.discriminator as jd
    import maetok_jax.model as jm
    import maetok_jax.perceptual as jp
    import maetok_jax.rope as jr
    import maetok_jax.targets as jtg
    import maetok_jax.train as jt
    import maetok_torch.attention as ta
    import maetok_torch.discriminator as td
    import maetok_torch.model as tm
    import maetok_torch.perceptual as tp
    import maetok_torch.rope as tr
    import maetok_torch.targets as ttg
    import maetok_torch.train as tt
    from maetok.params import init_disc, init_params

    cfg = parity_config(preset_name, dtype)
    m, lo = cfg.model, cfg.loss
    bf16 = dtype == "bfloat16"
    f_tol = TOL["loss_bf16"] if bf16 else TOL["forward_fp32"]
    g_tol = TOL["grad_bf16"] if bf16 else TOL["grad_fp32"]
    t_tol = TOL["loss_bf16"] if bf16 else TOL["trajectory_fp32"]
    jdev = jax.devices("gpu")[0] if device == "cuda" else jax.devices("cpu")[0]
    tdev = torch.device(device)
    jdt, tdt = (jnp.bfloat16, torch.bfloat16) if bf16 else (jnp.float32, torch.float32)

    def J(tree):
        return jax.tree_util.tree_map(lambda a: jax.device_put(np.asarray(a), jdev), tree)

    def T(tree):
        return map_tree(lambda a: torch.tensor(np.asarray(a), device=tdev), tree)

    rows = []

    def row(name, err, tol):
        rows.append((name, float(err), float(tol), bool(err <= tol)))

    rng = np.random.default_rng(0)
    b = PARITY_BATCH
    images = rng.uniform(-1, 1, (b, m.image_size, m.image_size, m.channels)).astype(np.float32)
    mask = (rng.random((b, m.num_patches)) < 0.5).astype(np.float32)
    params = init_params(cfg, 0)
    disc = disc_off_margin(init_disc(cfg, 0), images, m)
    pj, pt, dj, dt_ = J(params), T(params), J(disc), T(disc)
    xj, xt, kj, kt = J(images), T(images), J(mask), T(mask)
    enc_j, enc_t = pj["encoder"], pt["encoder"]

    # ------------------------------------------------------------------ units
    pe = params["encoder"]["patch_embed"]
    row(
        "forward/patch_embed",
        rel_err(
            tm.patch_embed(map_tree(lambda a: a.to(tdt), T(pe)), xt.to(tdt), m),
            jax.jit(jm.patch_embed, static_argnums=2)(
                jax.tree_util.tree_map(lambda a: a.astype(jdt), J(pe)), xj.astype(jdt), m
            ),
        ),
        f_tol,
    )
    k_dim = m.enc_width // m.enc_heads
    t_len = m.num_patches + m.num_latent_tokens
    q = rng.standard_normal((b, t_len, m.enc_heads, k_dim)).astype(np.float32)
    cj, sj = jr.rope_for(m, m.enc_width, m.enc_heads, m.num_latent_tokens)
    ct, st = tr.rope_for(m, m.enc_width, m.enc_heads, m.num_latent_tokens, tdev)
    cj, sj = jax.device_put(cj, jdev), jax.device_put(sj, jdev)
    row(
        "forward/rope",
        rel_err(
            tr.apply_rope(T(q).to(tdt), ct, st), jax.jit(jr.apply_rope)(J(q).astype(jdt), cj, sj)
        ),
        f_tol,
    )
    blk = jax.tree_util.tree_map(lambda a: a[0], params["encoder"]["blocks"])
    attn = {"qkv": blk["qkv"], "proj": blk["proj"]}
    xa = rng.standard_normal((b, t_len, m.enc_width)).astype(np.float32)
    ya_t = ta.attention(
        map_tree(lambda a: a.to(tdt), T(attn)), T(xa).to(tdt), ct, st, m.enc_heads, m.attention
    )
    ya_j = jax.jit(ja.attention, static_argnums=(4, 5))(
        jax.tree_util.tree_map(lambda a: a.astype(jdt), J(attn)),
        J(xa).astype(jdt),
        cj,
        sj,
        m.enc_heads,
        m.attention,
    )
    row(f"forward/attention ({m.attention})", rel_err(ya_t, ya_j), f_tol)

    h_j = jax.jit(jm.encode, static_argnums=3)(enc_j, xj, kj, m)
    h_t = tm.encode(enc_t, xt, kt, m)
    row("forward/encoder", rel_err(h_t, h_j), f_tol)
    h_np = np.asarray(h_j, np.float32)  # the decoders read the same latents
    recon_j, feats_j = jax.jit(jm.decode, static_argnums=2)(pj["decoder"], J(h_np), m)
    recon_t, _feats_t = tm.decode(pt["decoder"], T(h_np), m)
    row("forward/decoder", rel_err(recon_t, recon_j), f_tol)
    feats_np = np.asarray(feats_j.astype(jnp.float32))
    preds_j = jax.jit(jm.aux_predict, static_argnums=3)(
        pj["aux"], J(h_np), J(feats_np).astype(jdt), m
    )
    preds_t = tm.aux_predict(pt["aux"], T(h_np), T(feats_np).to(tdt), m)
    for name in m.aux_targets:
        row(f"forward/aux/{name}", rel_err(preds_t[name], preds_j[name]), f_tol)

    # ------------------------------------------------------------------ fixed networks (fp32)
    fp = TOL["forward_fp32"]
    tg_j = jax.jit(jtg.compute_targets, static_argnums=1)(xj, m)
    tg_t = ttg.compute_targets(xt, m)
    for name in m.aux_targets:
        row(f"target/{name}", rel_err(tg_t[name], tg_j[name]), fp)
    r_np = np.asarray(recon_j, np.float32)
    row(
        "perceptual",
        rel_err(
            tp.perceptual_loss(xt, T(r_np), m),
            jax.jit(jp.perceptual_loss, static_argnums=2)(xj, J(r_np), m),
        ),
        fp,
    )
    row(
        "discriminator",
        rel_err(
            td.discriminator(dt_, xt, m), jax.jit(jd.discriminator, static_argnums=2)(dj, xj, m)
        ),
        fp,
    )

    # ------------------------------------------------------------------ losses and gradients
    lecam = {"real": np.float32(0.3), "fake": np.float32(-0.2)}
    groups = {1: ("encoder", "decoder", "aux"), 2: ("decoder",)}
    for stage in (1, 2):
        c = cfg.replace(train={"stage": stage})
        keys = groups[stage]
        tgt_j = tg_j if stage == 1 else {}
        tgt_t = tg_t if stage == 1 else {}

        def jax_loss(tr_, fr, d, x, k, tg, c=c):
            return jt.generator_loss(tr_, fr, d, x, k, tg, jnp.float32(1.0), c)

        (_, (met_j, _)), g_j = jax.jit(jax.value_and_grad(jax_loss, has_aux=True))(
            {k: pj[k] for k in keys}, {k: pj[k] for k in pj if k not in keys}, dj, xj, kj, tgt_j
        )
        (_, (met_t, _)), g_t = tt.value_and_grad(
            tt.generator_loss,
            {k: pt[k] for k in keys},
            {k: pt[k] for k in pt if k not in keys},
            dt_,
            xt,
            kt,
            tgt_t,
            torch.ones((), device=tdev),
            c,
        )
        if stage == 1:
            for name in met_j:
                row(f"loss/{name}", rel_err(met_t[name], met_j[name]), f_tol)
        for k in keys:
            if k == "aux":  # one row per auxiliary decoder
                for name in g_j["aux"]:
                    err, _ = worst_leaf(g_t["aux"][name], g_j["aux"][name])
                    row(f"grad/stage{stage}/aux/{name}", err, g_tol)
            else:
                row(f"grad/stage{stage}/{k}", worst_leaf(g_t[k], g_j[k])[0], g_tol)

    (_, aux_j), gd_j = jax.jit(
        jax.value_and_grad(jt.disc_loss, has_aux=True), static_argnums=(4, 5)
    )(dj, xj, J(r_np), J(lecam), lo, m)
    (_, aux_t), gd_t = tt.value_and_grad(tt.disc_loss, dt_, xt, T(r_np), T(lecam), lo, m)
    for name, a_t, a_j in zip(("disc_hinge", "lecam"), aux_t[:2], aux_j[:2]):
        row(f"loss/{name}", rel_err(a_t, a_j), fp)  # the same fp32 inputs on both sides
    row("grad/disc", worst_leaf(gd_t, gd_j)[0], TOL["grad_fp32"])

    # ------------------------------------------------------------------ optimisers
    import maetok_jax.optim as jo
    import maetok_torch.optim as to

    for name in ("adamw", "adam", "sgd"):
        t_cfg = cfg.replace(train={"optimizer": name}).train
        p0 = {
            "w": rng.standard_normal((64, 48)).astype(np.float32),
            "b": rng.standard_normal((48,)).astype(np.float32),
        }
        pj_, pt_ = J(p0), T(p0)
        init_j, opt_update_j = jo.make_optimizer(t_cfg)
        init_t, opt_update_t = to.make_optimizer(t_cfg)
        oj, ot = init_j(pj_), init_t(pt_)
        update_j = jax.jit(
            lambda g, o, p, lr, t_cfg=t_cfg, opt_update_j=opt_update_j: opt_update_j(
                jo.clip_by_global_norm(g, t_cfg.grad_clip)[0], o, p, lr
            )
        )
        for _ in range(3):
            g = {k: (3 * rng.standard_normal(v.shape)).astype(np.float32) for k, v in p0.items()}
            lr = np.float32(1e-2)
            pj_, oj = update_j(J(g), oj, pj_, lr)
            with torch.no_grad():
                pt_, ot = opt_update_t(
                    to.clip_by_global_norm(T(g), t_cfg.grad_clip)[0],
                    ot,
                    pt_,
                    torch.tensor(lr, device=tdev),
                )
        err = max(worst_leaf(pt_, pj_)[0], worst_leaf(ot.mu, oj.mu)[0], worst_leaf(ot.nu, oj.nu)[0])
        row(f"optim/{name} (3 steps, same gradients)", err, fp)

    # ------------------------------------------------------------------ trajectory
    from maetok.masks import mask_for_step

    step_j, step_t = jt.jit_train_step(cfg), tt.make_train_step(cfg)
    sj_ = jt.state_from_numpy({**jt.state_to_numpy(jt.init_state(cfg, 0, params)), "disc": disc})
    sj_ = jax.device_put(sj_, jdev)
    st_ = tt.init_state(cfg, 0, params, tdev)
    st_["disc"] = T(disc)
    loss_err = 0.0
    for s in range(TRAJECTORY_STEPS):
        x = rng.uniform(-1, 1, images.shape).astype(np.float32)
        k, _ = mask_for_step(s, cfg.train, m.num_patches)
        batch = {"images": x, "mask": k}
        a = jt.step_inputs(batch, cfg, s)
        sj_, mj = step_j(sj_, *(jax.device_put(v, jdev) for v in a))
        st_, mt = step_t(st_, *tt.step_inputs(batch, cfg, s, tdev))
        loss_err = max(loss_err, max(rel_err(mt[n], mj[n]) for n in mj))
    row(f"trajectory/{TRAJECTORY_STEPS} steps: losses", loss_err, t_tol)
    if not bf16:  # bf16 gradients differ by ~1e-2, which Adam turns into sign flips: losses only
        end_j, end_t = jt.state_to_numpy(sj_), tt.state_to_numpy(st_)
        for group, start in (("params", params), ("disc", disc)):
            row(
                f"trajectory/{TRAJECTORY_STEPS} steps: {group} (L2 of update)",
                worst_update(end_t[group], end_j[group], start)[0],
                TOL["trajectory_early_fp32"],
            )
    return rows


def print_table(rows) -> None:
    """The rows as an aligned text table, failures marked."""
    width = max((len(r[0]) for r in rows), default=10)
    print(f"{'component':<{width}}  {'rel. error':>10}  {'tolerance':>9}  result")
    for name, err, tol, ok in rows:
        print(f"{name:<{width}}  {err:>10.2e}  {tol:>9.1e}  {'ok' if ok else 'FAIL'}")
    bad = sum(not r[3] for r in rows)
    print(f"{len(rows) - bad}/{len(rows)} within tolerance")


def main(args) -> int:
    """``maetok parity``: print the table; exit status 0 if every row passes, 1 otherwise."""
    from maetok_torch.train import select_device

    device = args.device
    select_device(device)  # one line, exit status 2, when torch cannot use it
    t0 = time.perf_counter()
    rows, ok = run_parity(args.preset, device, args.dtype)
    print(
        f"maetok parity: preset {args.preset}, {args.dtype}, {device} "
        f"({time.perf_counter() - t0:.1f} s)"
    )
    print_table(rows)
    return 0 if ok else 1


def add_parser(subparsers) -> None:
    """Add ``maetok parity [--preset P] [--device cpu|cuda] [--dtype float32|bfloat16]``."""
    from maetok.config import PRESETS

    p = subparsers.add_parser("parity", help="compare the JAX and torch backends, unit by unit")
    p.add_argument("--preset", choices=sorted(PRESETS), default="tiny")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    p.set_defaults(fn=main)
