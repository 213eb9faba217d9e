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
  the GELU's output from one accumulator, for each block size, warp and stage count;
- ``bwd …``: the same for the backward pass, ``dy @ w2ᵀ`` times the GELU's derivative at the
  stored pre-activation, with ``fc1``'s bias gradient: XLA's matmul and fusion against one
  kernel that also writes each row block's bias sums.

- ``mosaic tm×tn×tk sS wgW``: the same two kernels in Pallas' Mosaic GPU backend: Hopper's
  asynchronous warpgroup matmul (wgmma) on tiles that TMA copies stage through shared memory,
  S of them in flight, and the epilogue on the float32 accumulator in registers (the backward
  kernel copies its pre-activation tile in while the matmul runs); W = 2 is warp-specialised,
  one warpgroup streaming the operands and two computing a half of the tile each.

Off the GPU the Pallas kernels run in Pallas' interpreters (Triton's, and Mosaic GPU's, which
simulates the warpgroups, shared memory and barriers), on a small shape: a check of their
values, not of their speed.
"""

from __future__ import annotations

import argparse
import functools
import itertools
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from benchmarks.breakdown import timed
from maetok_jax.layers import dense, erf_rational, gelu, gelu_derivative, normal_cdf

# (bm, bn, bk, warps, stages) tried on the GPU; the interpreter takes the first that fits
CONFIGS = tuple(itertools.product((64, 128), (128, 256), (64,), (4, 8), (3, 4)))
# (tm, tn, tk, steps in flight, compute warpgroups) of the Mosaic GPU kernels, tn each
# warpgroup's columns. Shared memory a block: 192 KB for the first, one block a
# multiprocessor; 80 and 104 KB for the next two, two blocks a multiprocessor, so that one's
# epilogue can run beside the other's matmul; 192 and 184 KB for the warp-specialised two
MOSAIC_CONFIGS = (
    (128, 128, 64, 4, 1),
    (64, 128, 64, 2, 1),
    (64, 128, 64, 3, 1),
    (128, 64, 64, 4, 2),
    (64, 128, 64, 3, 2),
)


def _on_gpu() -> bool:
    """Whether the kernels compile for the GPU (elsewhere they run in Pallas' interpreters)."""
    return jax.default_backend() == "gpu"


def xla_fc1_gelu(x, w, b):
    """The model's ``fc1`` and GELU: (raw matmul output, GELU of it plus the bias)."""
    raw = x @ w
    return raw, gelu(dense({"w": w, "b": b}, x), lowp=True)


def _accumulate(a_ref, b_ref, bk: int, shape) -> jnp.ndarray:
    """The float32 product of a (bm, K) row block and a (K, bn) column block, K in steps of bk."""

    def body(i, acc):
        a = a_ref[:, pl.ds(i * bk, bk)]
        b = b_ref[pl.ds(i * bk, bk), :]
        return acc + jnp.dot(a, b, preferred_element_type=jnp.float32)

    return jax.lax.fori_loop(0, a_ref.shape[1] // bk, body, jnp.zeros(shape, jnp.float32))


def _kernel(x_ref, w_ref, b_ref, h_ref, a_ref, *, bk: int):
    """One (bm, bn) tile: the float32 accumulator over K in steps of bk, then the bias (the
    pre-activation, rounded to bf16 as the model rounds it) and the GELU."""
    acc = _accumulate(x_ref, w_ref, bk, h_ref.shape)
    h = (acc + b_ref[...].astype(jnp.float32)[None, :]).astype(h_ref.dtype)
    h_ref[...] = h
    hf = h.astype(jnp.float32)
    a_ref[...] = (hf * normal_cdf(hf, erf_rational)).astype(a_ref.dtype)  # the erf form


def _launch(kernel, out_shape, operands, more_blocks, out_blocks, cfg: dict):
    """``kernel`` over the (m/bm, n/bn) grid of the product of ``operands``' first two, (m, k)
    and (k, n), each program reading its (bm, k) rows and (k, bn) columns and the
    ``more_blocks`` of the others: on the GPU with Triton's warps and stages, elsewhere in
    Pallas' interpreter. Blocks are (shape, index map) pairs."""
    from jax.experimental.pallas import triton as plt

    (m, k), n = operands[0].shape, operands[1].shape[1]
    bm, bn, bk = cfg["bm"], cfg["bn"], cfg["bk"]
    if m % bm or n % bn or k % bk:
        raise ValueError(f"blocks {bm}×{bn}×{bk} do not divide ({m}, {k}) @ ({k}, {n})")
    on_gpu = _on_gpu()
    params = plt.CompilerParams(num_warps=cfg["warps"], num_stages=cfg["stages"])
    return pl.pallas_call(
        functools.partial(kernel, bk=bk),
        out_shape=out_shape,
        grid=(m // bm, n // bn),
        in_specs=[
            pl.BlockSpec((bm, k), lambda i, j: (i, 0)),
            pl.BlockSpec((k, bn), lambda i, j: (0, j)),
            *(pl.BlockSpec(*b) for b in more_blocks),
        ],
        out_specs=tuple(pl.BlockSpec(*b) for b in out_blocks),
        compiler_params=params if on_gpu else None,
        interpret=not on_gpu,
    )(*operands)


def _tile(bm, bn):
    return (bm, bn), lambda i, j: (i, j)


def pallas_fc1_gelu(x, w, b, **cfg):
    """(pre-activation ``x @ w + b``, its erf GELU), both bf16, from one kernel; ``cfg``:
    bm, bn, bk, warps, stages."""
    bm, bn = cfg["bm"], cfg["bn"]
    out = jax.ShapeDtypeStruct((x.shape[0], w.shape[1]), x.dtype)
    bias = ((bn,), lambda i, j: (j,))
    return _launch(_kernel, (out, out), (x, w, b), [bias], [_tile(bm, bn)] * 2, cfg)


def xla_fc2_grad_gelu(dy, w2, raw, b1):
    """The model's backward from ``fc2``'s input gradient to the GELU's input: ``da = dy @
    w2ᵀ`` (a matmul), then the GELU's derivative at ``raw + b1`` and ``fc1``'s bias gradient
    (one fusion). → (dh, db1)."""
    da = dy @ w2.T
    h = raw + b1
    (dh,) = jax.vjp(lambda t: gelu(t, lowp=True), h)[1](da)
    return dh, jnp.sum(dh.astype(jnp.float32), axis=0)


def _bwd_kernel(dy_ref, w_ref, h_ref, dh_ref, db_ref, *, bk: int):
    """One (bm, bn) tile of ``dh = (dy @ w2ᵀ) · GELU'(h)``, and its column sums (this row
    block's share of ``fc1``'s bias gradient)."""
    acc = _accumulate(dy_ref, w_ref, bk, dh_ref.shape)
    h = h_ref[...].astype(jnp.float32)
    # da rounded to bf16 first, as the model's matmul writes it
    da = acc.astype(dh_ref.dtype).astype(jnp.float32)
    dh = (da * gelu_derivative(h, erf_rational)).astype(dh_ref.dtype)
    dh_ref[...] = dh
    db_ref[...] = jnp.sum(dh.astype(jnp.float32), axis=0)[None, :]


def pallas_fc2_grad_gelu(dy, w2, h, **cfg):
    """(dh, db1) from one kernel: ``dy @ w2ᵀ`` with the GELU's derivative at the stored
    pre-activation ``h`` applied to the accumulator, and per-row-block bias sums that XLA
    adds up (a (rows/bm, hidden) float32 array, 1/bm of dh's size)."""
    (m, n), bm, bn = h.shape, cfg["bm"], cfg["bn"]
    out = (jax.ShapeDtypeStruct((m, n), dy.dtype), jax.ShapeDtypeStruct((m // bm, n), jnp.float32))
    tiles = [_tile(bm, bn), _tile(1, bn)]
    dh, partial = _launch(_bwd_kernel, out, (dy, w2.T, h), [_tile(bm, bn)], tiles, cfg)
    return dh, jnp.sum(partial, axis=0)


# ------------------------------------------------------------------------ Mosaic GPU (Hopper)
# Two designs, ``wgs`` in a config. wgs=1: one warpgroup a block issues the TMA copies and the
# wgmmas of its (tm, tn) tile. wgs=2: warp-specialised, a memory warpgroup streams the
# operands of a (tm, 2·tn) tile and two compute warpgroups each multiply and finish one half.
# Both run the same epilogue on the float32 accumulator in registers.


def _mosaic_interpreter():
    """None on the GPU; elsewhere the parameters of Mosaic GPU's interpreter (a private module
    of jax: the interpreter has no public name yet)."""
    if _on_gpu():
        return None
    from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams

    return InterpretGPUParams()


def _load(ref, layout):
    """``ref``'s value in registers laid out as ``layout`` (the interpreter has no layouts)."""
    if _on_gpu():
        return plgpu.load(ref, (), layout=layout)
    return ref[...]


def _swizzled(dtype, minor: int) -> tuple:
    """The shared-memory tiling and swizzle wgmma and TMA want for rows of ``minor`` elements."""
    swizzle = plgpu.find_swizzle(minor * jnp.dtype(dtype).itemsize * 8)
    items = swizzle // jnp.dtype(dtype).itemsize
    return plgpu.TilingTransform((8, items)), plgpu.SwizzleTransform(swizzle)


def _operand_specs(a_gmem, b_gmem, i, j, tm: int, tn: int, tk: int) -> list:
    """The pipelined (tm, tk) row block of a and (tk, tn) column block of b at step k."""
    a_swz, b_swz = _swizzled(a_gmem.dtype, tk), _swizzled(b_gmem.dtype, tn)
    return [
        plgpu.BlockSpec((tm, tk), lambda k: (i, k), transforms=a_swz, delay_release=1),
        plgpu.BlockSpec((tk, tn), lambda k: (k, j), transforms=b_swz, delay_release=1),
    ]


def _mosaic_matmul(a_gmem, b_gmem, start, finish, cfg: dict, i, j):
    """The float32 tile (i, j) of ``a @ b``, K in steps of tk with ``steps`` TMA copies in
    flight and one wgmma left running while the next operands arrive. The warpgroup that
    computes a part calls ``start(part)`` before its matmul (to issue the copies its epilogue
    reads) and ``finish(acc, part)`` after: part 0 with wgs=1; with wgs=2 the tile is
    (tm, 2·tn) and part w is the w-th (tm, tn) half."""
    tm, tn, tk, steps, wgs = (cfg[k] for k in ("tm", "tn", "tk", "steps", "wgs"))
    grid = (a_gmem.shape[1] // tk,)
    if wgs == 1:

        def run(acc):
            start(0)

            def step(_, a_smem, b_smem):
                plgpu.wgmma(acc, a_smem, b_smem)
                plgpu.wgmma_wait(1)

            specs = _operand_specs(a_gmem, b_gmem, i, j, tm, tn, tk)
            plgpu.emit_pipeline(step, grid=grid, in_specs=specs, max_concurrent_steps=steps)(
                a_gmem, b_gmem
            )
            plgpu.wgmma_wait(0)
            finish(acc[...], 0)

        pl.run_scoped(run, plgpu.ACC((tm, tn), jnp.float32))
        return
    part = lax.axis_index("wg")

    def compute(pipeline):
        def run(acc):
            start(part)
            pipeline(acc)
            plgpu.wgmma_wait(0)
            finish(acc[...], part)

        pl.run_scoped(run, plgpu.ACC((tm, tn), jnp.float32))

    def step(_, a_smem, b_smem, acc):
        plgpu.wgmma(acc, a_smem, b_smem.at[:, pl.ds(part * tn, tn)])
        plgpu.wgmma_wait(1)
        return acc

    plgpu.emit_pipeline_warp_specialized(
        step,
        grid=grid,
        in_specs=_operand_specs(a_gmem, b_gmem, i, j, tm, 2 * tn, tk),
        max_concurrent_steps=steps,
        num_compute_wgs=2,
        memory_registers=40,
        wg_axis="wg",
        compute_context=compute,
    )(a_gmem, b_gmem)


def _slots(shape, dtype, cfg: dict, swizzled: bool = False):
    """A shared-memory buffer of ``shape`` for each compute warpgroup: (wgs, *shape)."""
    transforms = _swizzled(dtype, shape[-1]) if swizzled else ()
    return plgpu.SMEM((cfg["wgs"], *shape), dtype, transforms=transforms)


def _part_tile(i, j, part: int, cfg: dict):
    """The (rows, columns) of the output that compute warpgroup ``part`` of block (i, j) owns."""
    tm, tn = cfg["tm"], cfg["tn"]
    return pl.ds(i * tm, tm), pl.ds((j * cfg["wgs"] + part) * tn, tn)


def _mosaic_launch(kernel, out_type, operands, scratch: dict, cfg: dict):
    """``kernel(*operands, *outputs, **scratch, cfg=cfg)`` on the grid of (tm, wgs·tn) tiles
    of the first output."""
    (m, n), k = out_type[0].shape, operands[0].shape[1]
    tm, tn, tk, wgs = cfg["tm"], cfg["tn"], cfg["tk"], cfg["wgs"]
    if m % tm or n % (wgs * tn) or k % tk:
        raise ValueError(f"tiles {tm}×{wgs * tn}×{tk} do not divide ({m}, {k}) @ ({k}, {n})")
    threads = dict(num_threads=wgs + 1, thread_name="wg") if wgs > 1 else {}
    return plgpu.kernel(
        functools.partial(kernel, cfg=cfg),
        out_type=out_type,
        scratch_types=scratch,
        grid=(m // tm, n // (wgs * tn)),
        grid_names=("m", "n"),
        interpret=_mosaic_interpreter(),
        **threads,
    )(*operands)


def _mosaic_fwd_kernel(x, w, b, pre, h, b_smem, pre_smem, h_smem, bar, *, cfg):
    """One tile: the pre-activation rounded as the model rounds it (the matmul's bf16 output
    plus the bf16 bias) and its erf GELU, both written from the accumulator."""
    i, j, tm, tn = lax.axis_index("m"), lax.axis_index("n"), cfg["tm"], cfg["tn"]

    def start(part):
        _, cols = _part_tile(i, j, part, cfg)
        plgpu.copy_gmem_to_smem(b.at[cols], b_smem.at[part], bar.at[part])

    def finish(acc, part):
        plgpu.barrier_wait(bar.at[part])
        bias = _load(b_smem.at[part], plgpu.Layout.WGMMA.reduce(0))  # float32: the bf16 bias
        y = acc.astype(pre.dtype).astype(jnp.float32) + lax.broadcast_in_dim(bias, (tm, tn), [1])
        p = y.astype(pre.dtype)
        pf = p.astype(jnp.float32)
        pre_smem[part] = p
        h_smem[part] = (pf * normal_cdf(pf, erf_rational)).astype(h.dtype)
        plgpu.commit_smem()
        tile = _part_tile(i, j, part, cfg)
        plgpu.copy_smem_to_gmem(pre_smem.at[part], pre.at[tile])
        plgpu.copy_smem_to_gmem(h_smem.at[part], h.at[tile])
        plgpu.wait_smem_to_gmem(0)

    _mosaic_matmul(x, w, start, finish, cfg, i, j)


def mosaic_fc1_gelu(x, w, b, **cfg):
    """(pre-activation ``x @ w + b``, its erf GELU), both bf16, from one Mosaic GPU kernel;
    ``cfg``: tm, tn, tk, steps, wgs."""
    out = jax.ShapeDtypeStruct((x.shape[0], w.shape[1]), x.dtype)
    tile = _slots((cfg["tm"], cfg["tn"]), x.dtype, cfg, swizzled=True)
    bias = _slots((cfg["tn"],), jnp.float32, cfg)
    bar = plgpu.Barrier(num_barriers=cfg["wgs"])
    scratch = dict(b_smem=bias, pre_smem=tile, h_smem=tile, bar=bar)
    operands = (x, w, b.astype(jnp.float32))
    return _mosaic_launch(_mosaic_fwd_kernel, (out, out), operands, scratch, cfg)


def _mosaic_bwd_kernel(dy, w2t, pre, dh, db, pre_smem, dh_smem, db_smem, bar, *, cfg):
    """One tile of ``dh = (dy @ w2ᵀ) · GELU'(pre)`` and its column sums."""
    i, j = lax.axis_index("m"), lax.axis_index("n")

    def start(part):  # the pre-activation tile arrives while the matmul runs
        tile = _part_tile(i, j, part, cfg)
        plgpu.copy_gmem_to_smem(pre.at[tile], pre_smem.at[part], bar.at[part])

    def finish(acc, part):
        plgpu.barrier_wait(bar.at[part])
        pf = _load(pre_smem.at[part], plgpu.Layout.WGMMA).astype(jnp.float32)
        da = acc.astype(dh.dtype).astype(jnp.float32)  # rounded as the model's matmul writes it
        d = (da * gelu_derivative(pf, erf_rational)).astype(dh.dtype)
        dh_smem[part] = d
        db_smem[part] = jnp.sum(d.astype(jnp.float32), axis=0)
        plgpu.commit_smem()
        rows, cols = _part_tile(i, j, part, cfg)
        plgpu.copy_smem_to_gmem(dh_smem.at[part], dh.at[rows, cols])
        plgpu.copy_smem_to_gmem(db_smem.at[part], db.at[i, cols])
        plgpu.wait_smem_to_gmem(0)

    _mosaic_matmul(dy, w2t, start, finish, cfg, i, j)


def mosaic_fc2_grad_gelu(dy, w2, pre, **cfg):
    """(dh, db1) from one Mosaic GPU kernel, as :func:`pallas_fc2_grad_gelu` computes them
    (``pre`` the stored pre-activation)."""
    (m, n), tm, tn = pre.shape, cfg["tm"], cfg["tn"]
    out = (jax.ShapeDtypeStruct((m, n), dy.dtype), jax.ShapeDtypeStruct((m // tm, n), jnp.float32))
    tile = _slots((tm, tn), dy.dtype, cfg, swizzled=True)
    sums = _slots((tn,), jnp.float32, cfg)
    bar = plgpu.Barrier(num_barriers=cfg["wgs"])
    scratch = dict(pre_smem=tile, dh_smem=tile, db_smem=sums, bar=bar)
    d, partial = _mosaic_launch(_mosaic_bwd_kernel, out, (dy, w2.T, pre), scratch, cfg)
    return d, jnp.sum(partial, axis=0)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=98304, help="tokens: batch × sequence")
    p.add_argument("--width", type=int, default=768)
    p.add_argument("--hidden", type=int, default=3072)
    p.add_argument("--runs", type=int, default=20)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--kernels",
        nargs="+",
        choices=("pallas", "mosaic"),
        default=["pallas", "mosaic"],
        help="the fused kernels to time beside XLA's (pallas: Triton; mosaic: Mosaic GPU)",
    )
    args = p.parse_args(argv)
    rng = np.random.default_rng(args.seed)
    x = jnp.asarray(rng.standard_normal((args.rows, args.width)), jnp.bfloat16)
    w = jnp.asarray(rng.standard_normal((args.width, args.hidden)) / args.width**0.5, jnp.bfloat16)
    b = jnp.asarray(0.1 * rng.standard_normal(args.hidden), jnp.bfloat16)
    flop = 2 * args.rows * args.width * args.hidden
    device = jax.devices()[0].device_kind
    print(f"({args.rows}, {args.width}) @ ({args.width}, {args.hidden}), bf16, on {device}")
    print(f"{'variant':34s}{'ms':>9s}{'TFLOP/s':>9s}{'max |Δ|':>10s}")

    def row(name, ms, diff=""):
        print(f"{name:34s}{ms:9.3f}{flop / ms / 1e9:9.1f}{diff:>10s}", flush=True)

    # forward: x @ w1 + b1 and its GELU; backward: dy @ w2ᵀ times the GELU's derivative
    w2 = jnp.asarray(rng.standard_normal((args.hidden, args.width)) / args.hidden**0.5, x.dtype)
    dy = jnp.asarray(rng.standard_normal((args.rows, args.width)), x.dtype)
    raw, want = jax.jit(xla_fc1_gelu)(x, w, b)
    h = (raw + b).astype(x.dtype)
    want_dh, _ = jax.jit(xla_fc2_grad_gelu)(dy, w2, raw, b)
    pallas = [
        (
            f"pallas {c[0]}×{c[1]}×{c[2]} w{c[3]} s{c[4]}",
            dict(zip(("bm", "bn", "bk", "warps", "stages"), c)),
        )
        for c in CONFIGS
    ]
    mosaic = [
        (
            f"mosaic {c[0]}×{c[1] * c[4]}×{c[2]} s{c[3]} wg{c[4]}",
            dict(zip(("tm", "tn", "tk", "steps", "wgs"), c)),
        )
        for c in MOSAIC_CONFIGS
    ]
    passes = (  # (tag, XLA's way and its inputs, the matmul alone, the reference, and each
        # fused kernel with its inputs and which of its outputs the reference is)
        (
            "",
            xla_fc1_gelu,
            (x, w, b),
            (x, w),
            want,
            [("pallas", pallas_fc1_gelu, pallas, 1), ("mosaic", mosaic_fc1_gelu, mosaic, 1)],
            (x, w, b),
        ),
        (
            "bwd ",
            xla_fc2_grad_gelu,
            (dy, w2, raw, b),
            (dy, w2.T),
            want_dh,
            [
                ("pallas", pallas_fc2_grad_gelu, pallas, 0),
                ("mosaic", mosaic_fc2_grad_gelu, mosaic, 0),
            ],
            (dy, w2, h),
        ),
    )
    for tag, xla, xla_args, mm_args, ref, kernels, fused_args in passes:
        row(f"{tag}xla", 1e3 * timed(jax.jit(xla), *xla_args, runs=args.runs))
        row(f"{tag}xla matmul only", 1e3 * timed(jax.jit(jnp.matmul), *mm_args, runs=args.runs))
        for family, fused, configs, which in kernels:
            if family not in args.kernels:
                continue
            for label, cfg in configs:
                name = tag + label
                fn = jax.jit(functools.partial(fused, **cfg))
                try:
                    got = fn(*fused_args)[which]
                    ms = 1e3 * timed(fn, *fused_args, runs=args.runs)
                except Exception as e:  # noqa: BLE001 (a config the compiler or device cannot take)
                    why = (str(e).splitlines() or [""])[0][:300]  # enough to name the op
                    print(f"{name:34s} failed: {type(e).__name__}: {why}")
                    continue
                diff = jnp.max(jnp.abs(got.astype(jnp.float32) - ref.astype(jnp.float32)))
                row(name, ms, f"{float(diff):.3g}")
                if not _on_gpu():
                    break  # the interpreter: one config checks the values
    return 0


if __name__ == "__main__":
    sys.exit(main())
