"""``maetok parity``: how far apart the JAX and torch backends are, check by check.

The checks themselves live in ``maetok_parity.checks`` (the one package that imports both
backends; the test suite ``parity_tests/`` runs the same functions). This module is the
numpy side the core may import: the tolerance table, the relative errors every check
reports, the parity config, and the command (which imports the checks when it runs).

``maetok parity --preset P`` gives one set of parameters (``maetok.params.init_params``,
numpy) to both backends and prints a row ``(name, error, tolerance)`` per comparison:
every unit of the tokenizer, every loss term, the gradients of the Stage-1, Stage-2 and
discriminator losses (the worst leaf of each parameter group), the optimisers, and a 3-step
training trajectory (losses at every step; parameters by the L2 disagreement of their
updates, see ``TOL["trajectory_early_fp32"]``).

``TOL`` below is THE tolerance table of the project: the checks read it when they run, so
the report a user runs and the test suite hold both backends to the same numbers.

The report runs with the adversarial loss and its adaptive weight switched on (whatever the
preset says), so the discriminator and every loss term are exercised, and with batch 2 so
``seed``/``base`` fit on a laptop. On a GPU, TF32 is switched off in torch and JAX matmuls
run at "highest" precision for the duration of the run: fp32 means fp32 on both sides.
"""

from __future__ import annotations

import time

import numpy as np

from maetok.tree import flatten

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


def tree_err(a, b) -> float:
    """The worst ``rel_err`` of ``a`` against the reference ``b`` over matching leaves: dicts
    by key, lists and tuples item by item (0 for an empty tree)."""
    if isinstance(b, dict):
        assert set(a) == set(b), f"keys differ: {sorted(set(a) ^ set(b))[:5]}"
        return max((tree_err(a[k], b[k]) for k in b), default=0.0)
    if isinstance(b, (list, tuple)):
        assert len(a) == len(b), f"length {len(a)} vs {len(b)}"
        return max((tree_err(x, y) for x, y in zip(a, b)), default=0.0)
    return rel_err(a, b)


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


def print_table(rows) -> None:
    """The rows ``(name, error, tolerance)`` as an aligned text table, failures marked."""
    width = max((len(r[0]) for r in rows), default=10)
    print(f"{'component':<{width}}  {'rel. error':>10}  {'tolerance':>9}  result")
    for name, err, tol in rows:
        print(f"{name:<{width}}  {err:>10.2e}  {tol:>9.1e}  {'ok' if err <= tol else 'FAIL'}")
    bad = sum(not err <= tol for _, err, tol in rows)
    print(f"{len(rows) - bad}/{len(rows)} within tolerance")


def main(args) -> int:
    """``maetok parity``: print the table; exit status 0 if every row passes, 1 otherwise."""
    from maetok_parity.checks import run  # imports both backends

    t0 = time.perf_counter()
    rows = run(args.preset, args.device, args.dtype)
    print(
        f"maetok parity: preset {args.preset}, {args.dtype}, {args.device} "
        f"({time.perf_counter() - t0:.1f} s)"
    )
    print_table(rows)
    return 0 if all(err <= tol for _, err, tol in rows) else 1


def add_parser(subparsers) -> None:
    """Add ``maetok parity [--preset P] [--device cpu|cuda] [--dtype float32|bfloat16]``."""
    from maetok.config import PRESETS

    p = subparsers.add_parser("parity", help="compare the JAX and torch backends, check by check")
    p.add_argument("--preset", choices=sorted(PRESETS), default="tiny")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    p.set_defaults(fn=main)
