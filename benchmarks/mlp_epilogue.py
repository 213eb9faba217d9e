"""The MLP's first matmul with its bias and exact GELU fused into the matmul kernel, against
what XLA does today: cuBLAS's matmul, then a fusion that adds the bias and applies the GELU.

    python benchmarks/mlp_epilogue.py [--rows 98304] [--width 768] [--hidden 3072] [--runs 20]

Why: in the ``base`` step the pass after ``fc1`` (read the matmul's output, add the bias,
apply the erf GELU, write the result) takes 0.51 ms a block, 12 ms a step
(benchmarks/NOTES.md). cuBLASLt fuses bias + GELU only in the tanh form, a different model;
a matmul of our own can apply the erf form on its accumulator before writing it. This times
both ways on one shape (``base``'s: 256 images × 384 tokens, 768 → 3,072) and prints a row
per variant: ms, TFLOP/s of the matmul, and the largest difference from XLA's output.

- ``xla``: ``maetok_jax.layers`` as the model runs it, the matmul's raw output (what the
  backward pass reads) and the GELU's output both written;
- ``xla matmul only``: the matmul alone, the floor any fused kernel works against;
- ``pallas bm×bn×bk wW sS``: a Pallas (Triton) kernel writing the biased pre-activation and
  the GELU's output from one accumulator, for each block size, warp and stage count.

Off the GPU the Pallas kernel runs in Pallas' interpreter, on a small shape: a check of its
values, not of its speed.
"""

from __future__ import annotations

import argparse
import functools
import itertools
import math
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl

from maetok_jax.layers import dense, gelu

# (bm, bn, bk, warps, stages) tried on the GPU; the interpreter takes the first that fits
CONFIGS = tuple(itertools.product((128,), (128, 256), (64,), (4, 8), (3, 4)))


def xla_fc1_gelu(x, w, b):
    """The model's ``fc1`` and GELU: (raw matmul output, GELU of it plus the bias)."""
    raw = x @ w
    return raw, gelu(dense({"w": w, "b": b}, x), lowp=True)


def _erf_gelu(h):
    return h * (0.5 * (1.0 + jax.lax.erf(h * (1.0 / math.sqrt(2.0)))))


def _kernel(x_ref, w_ref, b_ref, h_ref, a_ref, *, bk: int):
    """One (bm, bn) tile: the float32 accumulator over K in steps of bk, then the bias (the
    pre-activation, rounded to bf16 as the model rounds it) and the GELU."""
    steps = x_ref.shape[1] // bk

    def body(i, acc):
        xs = x_ref[:, pl.ds(i * bk, bk)]
        ws = w_ref[pl.ds(i * bk, bk), :]
        return acc + jnp.dot(xs, ws, preferred_element_type=jnp.float32)

    acc = jax.lax.fori_loop(0, steps, body, jnp.zeros(h_ref.shape, jnp.float32))
    h = (acc + b_ref[...].astype(jnp.float32)[None, :]).astype(h_ref.dtype)
    h_ref[...] = h
    a_ref[...] = _erf_gelu(h.astype(jnp.float32)).astype(a_ref.dtype)


def pallas_fc1_gelu(x, w, b, *, bm: int, bn: int, bk: int, warps: int, stages: int):
    """(pre-activation ``x @ w + b``, its erf GELU), both bf16, from one kernel."""
    from jax.experimental.pallas import triton as plt

    m, k = x.shape
    n = w.shape[1]
    if m % bm or n % bn or k % bk:
        raise ValueError(f"blocks {bm}×{bn}×{bk} do not divide ({m}, {k}) @ ({k}, {n})")
    on_gpu = jax.default_backend() == "gpu"
    out = jax.ShapeDtypeStruct((m, n), x.dtype)
    return pl.pallas_call(
        functools.partial(_kernel, bk=bk),
        out_shape=(out, out),
        grid=(m // bm, n // bn),
        in_specs=[
            pl.BlockSpec((bm, k), lambda i, j: (i, 0)),
            pl.BlockSpec((k, bn), lambda i, j: (0, j)),
            pl.BlockSpec((bn,), lambda i, j: (j,)),
        ],
        out_specs=(
            pl.BlockSpec((bm, bn), lambda i, j: (i, j)),
            pl.BlockSpec((bm, bn), lambda i, j: (i, j)),
        ),
        compiler_params=plt.CompilerParams(num_warps=warps, num_stages=stages) if on_gpu else None,
        interpret=not on_gpu,
    )(x, w, b)


def timed(fn, *args, runs: int) -> float:
    """Median ms of ``fn(*args)`` after one compiling call."""
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1e3


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=98304, help="tokens: batch × sequence")
    p.add_argument("--width", type=int, default=768)
    p.add_argument("--hidden", type=int, default=3072)
    p.add_argument("--runs", type=int, default=20)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    rng = np.random.default_rng(args.seed)
    x = jnp.asarray(rng.standard_normal((args.rows, args.width)), jnp.bfloat16)
    w = jnp.asarray(rng.standard_normal((args.width, args.hidden)) / args.width**0.5, jnp.bfloat16)
    b = jnp.asarray(0.1 * rng.standard_normal(args.hidden), jnp.bfloat16)
    flop = 2 * args.rows * args.width * args.hidden
    device = jax.devices()[0].device_kind
    print(f"({args.rows}, {args.width}) @ ({args.width}, {args.hidden}), bf16, on {device}")
    print(f"{'variant':34s}{'ms':>9s}{'TFLOP/s':>9s}{'max |Δa|':>10s}")

    def row(name, ms, diff=""):
        print(f"{name:34s}{ms:9.3f}{flop / ms / 1e9:9.1f}{diff:>10s}", flush=True)

    xla = jax.jit(xla_fc1_gelu)
    _, want = xla(x, w, b)
    row("xla", timed(xla, x, w, b, runs=args.runs))
    row("xla matmul only", timed(jax.jit(lambda x, w: x @ w), x, w, runs=args.runs))
    for bm, bn, bk, warps, stages in CONFIGS:
        name = f"pallas {bm}×{bn}×{bk} w{warps} s{stages}"
        fn = jax.jit(
            functools.partial(pallas_fc1_gelu, bm=bm, bn=bn, bk=bk, warps=warps, stages=stages)
        )
        try:
            _, got = fn(x, w, b)
            ms = timed(fn, x, w, b, runs=args.runs)
        except Exception as e:  # noqa: BLE001 (a config the compiler or device cannot take)
            print(f"{name:34s} failed: {type(e).__name__}: {str(e).splitlines()[0][:80]}")
            continue
        diff = float(jnp.max(jnp.abs(got.astype(jnp.float32) - want.astype(jnp.float32))))
        row(name, ms, f"{diff:.3g}")
        if jax.default_backend() != "gpu":
            break  # the interpreter: one config checks the values
    return 0


if __name__ == "__main__":
    sys.exit(main())
