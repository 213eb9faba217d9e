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

- ``mosaic tm×tn×tk sS split eE [approx]``: the same two kernels in Pallas' Mosaic GPU
  backend, persistent (a block a multiprocessor walking its tiles) and warp-specialised (a
  memory warpgroup streams the operands by TMA through S shared-memory slots, two compute
  warpgroups run Hopper's wgmma): each compute warpgroup finishes a (tm, tn) part on its
  float32 accumulator in E-column chunks, while its stores and the next tile's operands are
  in flight. ``split``: the parts stacked (m) or side by side (n) in one tile, or whole tiles
  taken in turn (pp, ping-pong); ``approx``: the compiler's approximate math. Each forward
  row is followed by ``… matmul only``, the same kernel storing the bare product: the floor
  the epilogue adds to.

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
# (tm, tn, tk, steps in flight, split, epilogue chunk columns, approximate math) of the
# Mosaic GPU kernels: each compute warpgroup's (tm, tn) part of a tile, the two parts stacked
# ("m"), side by side ("n"), or whole tiles taken in turn ("pp", ping-pong). Shared memory
# a block: the operand slots (48 KB a step for a 128 × 256 tile; 32 KB a step and warpgroup
# for ping-pong) and the epilogue's chunks (64 KB). tk = 32 (a 64-byte swizzle) does not
# lower: Mosaic GPU finds no layouts for it
MOSAIC_CONFIGS = (
    (128, 128, 64, 3, "n", 64, False),
    (128, 128, 64, 3, "m", 64, False),
    (128, 64, 64, 4, "n", 64, False),
    (128, 128, 64, 2, "pp", 64, False),
    (128, 128, 64, 3, "n", 64, True),
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
# Persistent and warp-specialised: a block a multiprocessor, each walking its share of the
# output's tiles. In a block, one memory warpgroup streams the operands through ``steps``
# shared-memory slots (TMA) and two compute warpgroups multiply (wgmma) and finish them: a
# (tm, tn) half each of a (2·tm, tn) or (tm, 2·tn) tile (:func:`_mosaic_persistent`), or
# whole (tm, tn) tiles in turn (ping-pong, :func:`_mosaic_pingpong`). A part's epilogue
# inputs are copied in before its matmul starts, and its outputs leave by TMA stores that are
# only waited for when the buffers are next needed, so they overlap the next matmul.


def _mosaic_interpreter():
    """None on the GPU; elsewhere the parameters of Mosaic GPU's interpreter (a private module
    of jax: the interpreter has no public name yet)."""
    if _on_gpu():
        return None
    from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams

    return InterpretGPUParams()


def _multiprocessors() -> int:
    """The blocks of a persistent kernel: the GPU's multiprocessors (two in the interpreter, so
    that each walks several tiles)."""
    return jax.devices()[0].core_count if _on_gpu() else 2


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


def _block(cfg: dict) -> tuple:
    """A block tile's (rows, columns): the two compute warpgroups' halves stacked ("m") or
    side by side ("n"), or with "pp" (ping-pong) each warpgroup's own whole tile."""
    tm, tn, split = cfg["tm"], cfg["tn"], cfg["split"]
    return {"m": (2 * tm, tn), "n": (tm, 2 * tn), "pp": (tm, tn)}[split]


def _slots(shape, dtype):
    """A shared-memory buffer of ``shape`` for each compute warpgroup: (2, *shape)."""
    return plgpu.SMEM((2, *shape), dtype)


def _mosaic_persistent(a_gmem, b_gmem, shape, scratch: dict, start, finish, cfg: dict):
    """The body of a persistent kernel over the (M, N) = ``shape`` product ``a @ b``. For each
    (tm, tn) half a compute warpgroup owns, ``start(part, rows, cols, **buffers)`` issues the
    copies its epilogue reads (``part``: the warpgroup; ``rows``, ``cols``: the half's slices
    of the output), the float32 accumulator is computed, and ``finish(acc, part, rows, cols,
    **buffers)`` writes it out; ``buffers``: the shared-memory ``scratch``."""
    tm, tn, tk = cfg["tm"], cfg["tn"], cfg["tk"]
    (bm, bn), (m, n), k = _block(cfg), shape, a_gmem.shape[1]
    along_m = cfg["split"] == "m"

    def pipeline(step, context):
        return plgpu.emit_pipeline_warp_specialized(
            step,
            grid=(k // tk,),
            in_specs=[
                plgpu.BlockSpec((bm, tk), lambda s: (0, s), transforms=_swizzled(a_gmem.dtype, tk)),
                plgpu.BlockSpec((tk, bn), lambda s: (s, 0), transforms=_swizzled(b_gmem.dtype, bn)),
            ],
            max_concurrent_steps=cfg["steps"],
            num_compute_wgs=2,
            memory_registers=40,
            wg_axis="wg",
            compute_context=context,
        )

    def scope(allocations, **buffers):
        part = lax.axis_index("wg")
        rows_of, cols_of = pl.ds(part * tm, tm), pl.ds(part * tn, tn)
        half = (rows_of, slice(None)) if along_m else (slice(None), cols_of)

        @plgpu.nd_loop(((m // bm) * (n // bn),), collective_axes="sm")
        def _tile(info):
            (t,) = info.index
            i, j = t // (n // bn), t % (n // bn)  # along N first: neighbours share A's rows
            rows = pl.ds(i * bm + (part * tm if along_m else 0), tm)
            cols = pl.ds(j * bn + (0 if along_m else part * tn), tn)

            def context(run):
                def with_acc(acc):
                    start(part, rows, cols, **buffers)
                    run(acc)
                    finish(acc[...], part, rows, cols, **buffers)

                pl.run_scoped(with_acc, plgpu.ACC((tm, tn), jnp.float32))

            def step(_, a_smem, b_smem, acc):
                plgpu.wgmma(acc, a_smem.at[half[0]], b_smem.at[:, half[1]])
                plgpu.wgmma_wait(0)
                return acc

            a_rows, b_cols = a_gmem.at[pl.ds(i * bm, bm), :], b_gmem.at[:, pl.ds(j * bn, bn)]
            pipeline(step, context)(a_rows, b_cols, allocations=allocations)

        plgpu.wait_smem_to_gmem(0, wait_read_only=True)  # the last stores, before the block ends

    def ignore(*_, **__):
        return None

    allocations = pipeline(ignore, ignore).get_allocations(a_gmem, b_gmem)
    pl.run_scoped(scope, allocations=allocations, **scratch, collective_axes="wg")


def _mosaic_pingpong(a_gmem, b_gmem, shape, scratch: dict, start, finish, cfg: dict):
    """:func:`_mosaic_persistent`'s contract, scheduled ping-pong: the two compute warpgroups
    take a block's tiles in turn, each a whole (tm, tn) tile with its own ``steps`` operand
    slots, so that one's epilogue runs while the other's matmul has the tensor cores. The
    memory warpgroup streams the tiles' operands in order, each into its warpgroup's slots."""
    tm, tn, tk, slots = cfg["tm"], cfg["tn"], cfg["tk"], cfg["steps"]
    (m, n), k = shape, a_gmem.shape[1]
    ks, across = k // tk, n // tn
    a_swz, b_swz = _swizzled(a_gmem.dtype, tk), _swizzled(b_gmem.dtype, tn)
    operands = dict(
        a_slots=plgpu.SMEM((2, slots, tm, tk), a_gmem.dtype, transforms=a_swz),
        b_slots=plgpu.SMEM((2, slots, tk, tn), b_gmem.dtype, transforms=b_swz),
        ready=plgpu.Barrier(num_arrivals=2, num_barriers=2 * slots),  # a's and b's copies
        consumed=plgpu.Barrier(num_arrivals=1, num_barriers=2 * slots),
    )

    def scope(a_slots, b_slots, ready, consumed, **buffers):
        block, blocks = lax.axis_index("sm"), lax.axis_size("sm")
        mine = ((m // tm) * across - block + blocks - 1) // blocks  # tiles block, block + blocks, …
        wg = lax.axis_index("wg")

        def barrier(ring, use):  # the barrier of a ring's use-th operand slot
            return ring * slots + use % slots

        def where(q):  # the q-th tile of this block: its (rows, cols) in the output
            t = block + q * blocks
            return pl.ds((t // across) * tm, tm), pl.ds((t % across) * tn, tn)

        def memory():
            plgpu.set_max_registers(40, action="decrease")

            @pl.loop(0, mine)
            def _tile(q):
                rows, cols = where(q)
                ring = q % 2

                @pl.loop(0, ks)
                def _step(s):
                    use = (q // 2) * ks + s  # this ring's steps so far
                    arrived = ready.at[barrier(ring, use)]

                    @pl.when(use >= slots)
                    def _():
                        plgpu.barrier_wait(consumed.at[barrier(ring, use)])

                    at = (ring, use % slots)
                    k_range = pl.ds(s * tk, tk)
                    plgpu.copy_gmem_to_smem(a_gmem.at[rows, k_range], a_slots.at[at], arrived)
                    plgpu.copy_gmem_to_smem(b_gmem.at[k_range, cols], b_slots.at[at], arrived)

            for ring in (0, 1):  # the last uses' releases, so that no barrier is left mid-phase
                uses = (mine - ring + 1) // 2 * ks

                @pl.loop(lax.max(uses - slots, 0), uses)
                def _drain(use, ring=ring):
                    plgpu.barrier_wait(consumed.at[barrier(ring, use)])

        def compute():
            plgpu.set_max_registers(232, action="increase")

            @pl.loop(0, (mine - wg + 1) // 2)
            def _tile(turn):
                rows, cols = where(2 * turn + wg)

                def with_acc(acc):
                    start(wg, rows, cols, **buffers)

                    @pl.loop(0, ks)
                    def _step(s):
                        use = turn * ks + s
                        plgpu.barrier_wait(ready.at[barrier(wg, use)])
                        plgpu.wgmma(acc, a_slots.at[wg, use % slots], b_slots.at[wg, use % slots])
                        plgpu.wgmma_wait(1)  # the step before has finished with its slot

                        @pl.when(s > 0)
                        def _():
                            plgpu.barrier_arrive(consumed.at[barrier(wg, use - 1)])

                    plgpu.wgmma_wait(0)
                    plgpu.barrier_arrive(consumed.at[barrier(wg, turn * ks + ks - 1)])
                    finish(acc[...], wg, rows, cols, **buffers)

                pl.run_scoped(with_acc, plgpu.ACC((tm, tn), jnp.float32))

            plgpu.wait_smem_to_gmem(0, wait_read_only=True)  # the last stores, before the end

        lax.cond(wg == 2, memory, compute)

    pl.run_scoped(scope, **operands, **scratch, collective_axes="wg")


def _schedule(cfg: dict):
    """The kernel body that runs ``cfg``'s schedule: ping-pong, or the two halves together."""
    return _mosaic_pingpong if cfg["split"] == "pp" else _mosaic_persistent


def _mosaic_launch(body, out_type, operands, cfg: dict):
    """``body(*operands, *outputs)`` as a persistent kernel, a block a multiprocessor, each
    of two compute warpgroups and a memory one."""
    (m, n), k = out_type[0].shape, operands[0].shape[1]
    bm, bn = _block(cfg)
    if m % bm or n % bn or k % cfg["tk"]:
        raise ValueError(f"tiles {bm}×{bn}×{cfg['tk']} do not divide ({m}, {k}) @ ({k}, {n})")
    return plgpu.kernel(
        body,
        out_type=out_type,
        grid=(_multiprocessors(),),
        grid_names=("sm",),
        num_threads=3,
        thread_name="wg",
        compiler_params=plgpu.CompilerParams(approx_math=cfg["approx"]) if _on_gpu() else None,
        interpret=_mosaic_interpreter(),
    )(*operands)


def _chunks(cols, cfg: dict):
    """The epilogue's column chunks of a (tm, tn) half whose output columns are ``cols``:
    (index, the chunk's columns in the half, its columns in the output), ``cfg["ep"]`` wide."""
    ep = cfg["ep"]
    return [
        (c, slice(c * ep, (c + 1) * ep), pl.ds(cols.start + c * ep, ep))
        for c in range(cfg["tn"] // ep)
    ]


def _chunk_slots(cfg: dict, dtype, per_half: int = 1):
    """Shared memory for ``per_half`` (tm, ep) chunks of each compute warpgroup's half."""
    shape = (cfg["tm"], cfg["ep"])
    return plgpu.SMEM((2, per_half, *shape), dtype, transforms=_swizzled(dtype, cfg["ep"]))


def mosaic_matmul(a, b, **cfg):
    """``a @ b`` in bf16 from the Mosaic GPU kernels' schedule with no epilogue but the store:
    the floor their fused epilogues work against."""
    out = jax.ShapeDtypeStruct((a.shape[0], b.shape[1]), a.dtype)
    scratch = dict(c_smem=_chunk_slots(cfg, a.dtype))

    def body(a, b, c):
        def start(*_, **__):
            return None

        def finish(acc, part, rows, cols, c_smem):
            for _, half_cols, out_cols in _chunks(cols, cfg):
                plgpu.wait_smem_to_gmem(0, wait_read_only=True)  # the last chunk's store has read
                c_smem[part, 0] = acc[:, half_cols].astype(c.dtype)
                plgpu.commit_smem()
                plgpu.copy_smem_to_gmem(c_smem.at[part, 0], c.at[rows, out_cols])

        _schedule(cfg)(a, b, c.shape, scratch, start, finish, cfg)

    return _mosaic_launch(body, (out,), (a, b), cfg)[0]


def mosaic_fc1_gelu(x, w, b, **cfg):
    """(pre-activation ``x @ w + b``, its erf GELU), both bf16, from one Mosaic GPU kernel;
    ``cfg``: tm, tn, tk, steps, split, ep. Each half's bias arrives while its matmul runs; the
    pre-activation is rounded as the model rounds it (the matmul's bf16 output plus the bf16
    bias), the GELU applied to that; both leave a chunk at a time."""
    tm, ep = cfg["tm"], cfg["ep"]
    out = jax.ShapeDtypeStruct((x.shape[0], w.shape[1]), x.dtype)
    chunk = _chunk_slots(cfg, x.dtype)
    bias = _slots((cfg["tn"],), jnp.float32)
    scratch = dict(b_smem=bias, pre_smem=chunk, h_smem=chunk, bar=plgpu.Barrier(num_barriers=2))

    def body(x, w, b, pre, h):
        def start(part, rows, cols, b_smem, bar, **_):
            plgpu.copy_gmem_to_smem(b.at[cols], b_smem.at[part], bar.at[part])

        def finish(acc, part, rows, cols, b_smem, pre_smem, h_smem, bar):
            plgpu.barrier_wait(bar.at[part])
            for _, half_cols, out_cols in _chunks(cols, cfg):
                # float32: the bf16 bias
                bias = _load(b_smem.at[part, half_cols], plgpu.Layout.WGMMA.reduce(0))
                y = acc[:, half_cols].astype(pre.dtype).astype(jnp.float32)
                p = (y + lax.broadcast_in_dim(bias, (tm, ep), [1])).astype(pre.dtype)
                pf = p.astype(jnp.float32)
                act = (pf * normal_cdf(pf, erf_rational)).astype(h.dtype)
                plgpu.wait_smem_to_gmem(0, wait_read_only=True)  # the last chunk's stores have read
                pre_smem[part, 0] = p
                h_smem[part, 0] = act
                plgpu.commit_smem()
                plgpu.copy_smem_to_gmem(pre_smem.at[part, 0], pre.at[rows, out_cols])
                plgpu.copy_smem_to_gmem(h_smem.at[part, 0], h.at[rows, out_cols])

        _schedule(cfg)(x, w, pre.shape, scratch, start, finish, cfg)

    return _mosaic_launch(body, (out, out), (x, w, b.astype(jnp.float32)), cfg)


def mosaic_fc2_grad_gelu(dy, w2, pre, **cfg):
    """(dh, db1) from one Mosaic GPU kernel, as :func:`pallas_fc2_grad_gelu` computes them
    (``pre`` the stored pre-activation): each half's pre-activation arrives, a chunk a copy,
    while its matmul runs, and dh overwrites it chunk by chunk before leaving; the column sums
    are per (tm, ·) row block, added up by XLA."""
    (m, n), tm, tn = pre.shape, cfg["tm"], cfg["tn"]
    out = (jax.ShapeDtypeStruct((m, n), dy.dtype), jax.ShapeDtypeStruct((m // tm, n), jnp.float32))
    chunks = tn // cfg["ep"]
    scratch = dict(
        pre_smem=_chunk_slots(cfg, dy.dtype, chunks),
        db_smem=_slots((tn,), jnp.float32),
        bar=plgpu.Barrier(num_arrivals=chunks, num_barriers=2),
    )

    def body(dy, w2t, pre, dh, db):
        def start(part, rows, cols, pre_smem, bar, **_):
            plgpu.wait_smem_to_gmem(0, wait_read_only=True)  # the last tile's stores have read
            for c, _, out_cols in _chunks(cols, cfg):
                plgpu.copy_gmem_to_smem(pre.at[rows, out_cols], pre_smem.at[part, c], bar.at[part])

        def finish(acc, part, rows, cols, pre_smem, db_smem, bar):
            plgpu.barrier_wait(bar.at[part])
            for c, half_cols, _ in _chunks(cols, cfg):
                pf = _load(pre_smem.at[part, c], plgpu.Layout.WGMMA).astype(jnp.float32)
                # rounded as the model's matmul writes it
                da = acc[:, half_cols].astype(dh.dtype).astype(jnp.float32)
                d = (da * gelu_derivative(pf, erf_rational)).astype(dh.dtype)
                pre_smem[part, c] = d
                db_smem[part, half_cols] = jnp.sum(d.astype(jnp.float32), axis=0)
            plgpu.commit_smem()
            for c, _, out_cols in _chunks(cols, cfg):
                plgpu.copy_smem_to_gmem(pre_smem.at[part, c], dh.at[rows, out_cols])
            plgpu.copy_smem_to_gmem(db_smem.at[part], db.at[rows.start // tm, cols])

        _schedule(cfg)(dy, w2t, pre.shape, scratch, start, finish, cfg)

    d, partial = _mosaic_launch(body, out, (dy, w2.T, pre), cfg)
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
    print(f"{'variant':48s}{'ms':>9s}{'TFLOP/s':>9s}{'max |Δ|':>10s}")

    def row(name, ms, diff=""):
        print(f"{name:48s}{ms:9.3f}{flop / ms / 1e9:9.1f}{diff:>10s}", flush=True)

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
            f"mosaic {c[0]}×{c[1]}×{c[2]} s{c[3]} {c[4]} e{c[5]}{' approx' * c[6]}",
            dict(zip(("tm", "tn", "tk", "steps", "split", "ep", "approx"), c)),
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
                    print(f"{name:48s} failed: {type(e).__name__}: {why}")
                    continue
                diff = jnp.max(jnp.abs(got.astype(jnp.float32) - ref.astype(jnp.float32)))
                row(name, ms, f"{float(diff):.3g}")
                if family == "mosaic" and not tag:  # the same schedule, the matmul alone
                    floor = jax.jit(functools.partial(mosaic_matmul, **cfg))
                    got = floor(*mm_args).astype(jnp.float32)
                    diff = jnp.max(jnp.abs(got - jax.jit(jnp.matmul)(*mm_args).astype(jnp.float32)))
                    ms = 1e3 * timed(floor, *mm_args, runs=args.runs)
                    row(f"{name} matmul only", ms, f"{float(diff):.3g}")
                if not _on_gpu():
                    break  # the interpreter: one config checks the values
    return 0


if __name__ == "__main__":
    sys.exit(main())
