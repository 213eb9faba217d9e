"""Where a JAX train step spends its time: each part compiled and timed on its own.

    python benchmarks/breakdown.py --preset base --batch 64 --dtype bfloat16 --attention fused

Parts: encoder forward and forward+backward, pixel decoder forward+backward, the auxiliary
decoders forward+backward, the targets (HOG, conv, pixels), the perceptual loss
forward+backward, the optimiser (clip + AdamW + EMA over every parameter), and the whole
Stage-1 and Stage-2 steps. Each row: median ms over the timed runs and, for the transformer
parts, TFLOP/s by the formula of ``train_step.py``. The rows of a step do not add up
exactly to the step (XLA fuses across them), but they show what dominates. Under each whole
step, XLA's cost model of it: the bytes its kernels read and write, and the time that takes
at the memory bandwidth (``--hbm``, TB/s), next to its model FLOPs at the matmul ceiling
(``--ceiling``), and on NVIDIA GPUs the SM clock and power ``nvidia-smi`` sampled over its
timed runs (``benchmarks/clocks.py``).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import jax
import jax.numpy as jnp

from benchmarks import trace_summary
from benchmarks.clocks import ClockMonitor
from benchmarks.train_step import add_remat_argument, transformer_flops
from maetok.config import preset
from maetok.data import BatchSource
from maetok.masks import mask_for_step
from maetok.synthetic import SyntheticImages
from maetok.train_state import trainable_keys
from maetok_jax import train
from maetok_jax.model import aux_predict, decode, encode
from maetok_jax.optim import clip_by_global_norm, ema_update, make_optimizer
from maetok_jax.perceptual import perceptual_loss
from maetok_jax.targets import compute_targets

TRACE_OPTIONS = {"xla_gpu_enable_command_buffer": ""}  # the traced step: no CUDA graphs


def timed(fn, *args, runs: int = 10) -> float:
    """Median seconds of ``fn(*args)`` after one compiling call."""
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def cost_model(compiled, model_flop: float, seconds: float, args) -> str:
    """The step's time by XLA's cost model, next to the measured time: the bytes its kernels
    read and write (summed over the compiled program's fusions) over the memory bandwidth,
    and its model FLOPs over the matmul ceiling. Kernels run one after another, each bound by
    one or the other; the model's byte count is its own (on the CPU, with smaller fusions,
    it counts far more than a GPU program moves)."""
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost  # (a list in older JAX)
    moved = float(cost.get("bytes accessed", 0.0))
    memory_ms = moved / (args.hbm * 1e12) * 1e3
    matmul_ms = model_flop / (args.ceiling * 1e12) * 1e3
    return (
        f"  cost model: {moved / 1e9:.4g} GB moved a step, {memory_ms:.1f} ms at "
        f"{args.hbm:g} TB/s; model FLOPs {matmul_ms:.1f} ms at {args.ceiling:g} TFLOP/s; "
        f"measured {seconds * 1e3:.1f} ms"
    )


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="tiny")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    p.add_argument("--attention", default="plain", choices=("plain", "fused", "flash"))
    p.add_argument("--unroll", type=int, default=1)
    add_remat_argument(p)
    p.add_argument("--runs", type=int, default=10)
    p.add_argument(
        "--ceiling", type=float, default=790.0, help="matmul TFLOP/s (the H200's, measured)"
    )
    p.add_argument("--hbm", type=float, default=4.8, help="memory TB/s (the H200's data sheet)")
    p.add_argument(
        "--trace",
        help="also write a profiler trace of 3 Stage-1 steps to this folder "
        "(with a Perfetto JSON, summarised by benchmarks/trace_summary.py)",
    )
    args = p.parse_args(argv)
    cfg = preset(
        args.preset,
        model={
            "compute_dtype": args.dtype,
            "attention": args.attention,
            "unroll": args.unroll,
            "remat": args.remat,
        },
        train={"batch_size": args.batch},
    )
    m, b = cfg.model, args.batch
    state = train.init_state(cfg, 0)
    params = state["params"]
    batch = BatchSource(SyntheticImages(m.image_size, count=b), cfg).batch(0)
    images = jnp.asarray(batch["images"])
    mask = jnp.asarray(mask_for_step(0, cfg.train, m.num_patches)[0])
    h = jax.jit(lambda p_, x, k: encode(p_, x, k, m))(params["encoder"], images, mask)
    recon, feats = jax.jit(lambda p_, z: decode(p_, z, m))(params["decoder"], h)
    flops = transformer_flops(m, 1)
    aux_fwd = flops["aux_fwd"]

    rows = []

    def row(name, seconds, gflop=None):
        tf = f"{b * gflop / seconds / 1e3:8.1f}" if gflop else "       -"
        rows.append((name, seconds))
        print(f"{name:42s}{seconds * 1e3:9.2f} ms {tf} TFLOP/s", flush=True)

    print(
        f"preset {args.preset}, batch {b}, {args.dtype}, attention {args.attention}, "
        f"unroll {args.unroll}, remat {args.remat}, device {jax.devices()[0].device_kind}"
    )
    enc_fwd = jax.jit(lambda p_, x, k: encode(p_, x, k, m))
    row(
        "encoder forward",
        timed(enc_fwd, params["encoder"], images, mask, runs=args.runs),
        flops["encoder_fwd"] / 1e9,
    )
    enc_grad = jax.jit(jax.grad(lambda p_, x, k: jnp.sum(encode(p_, x, k, m) ** 2)))
    row(
        "encoder forward+backward",
        timed(enc_grad, params["encoder"], images, mask, runs=args.runs),
        3 * flops["encoder_fwd"] / 1e9,
    )
    dec_grad = jax.jit(jax.grad(lambda p_, z: jnp.sum(decode(p_, z, m)[0] ** 2)))
    row(
        "pixel decoder forward+backward",
        timed(dec_grad, params["decoder"], h, runs=args.runs),
        3 * flops["decoder_fwd"] / 1e9,
    )
    if m.aux_targets:
        aux_grad = jax.jit(
            jax.grad(lambda p_, z, f: sum(jnp.sum(v**2) for v in aux_predict(p_, z, f, m).values()))
        )
        row(
            f"aux decoders ×{len(m.aux_targets)} forward+backward",
            timed(aux_grad, params["aux"], h, feats, runs=args.runs),
            3 * aux_fwd / 1e9,
        )
        row(
            "targets (" + ", ".join(m.aux_targets) + ")",
            timed(jax.jit(lambda x: compute_targets(x, m)), images, runs=args.runs),
        )
    row(
        "perceptual loss forward+backward",
        timed(
            jax.jit(jax.grad(lambda r, x: perceptual_loss(x, r, m))), recon, images, runs=args.runs
        ),
    )

    keys = trainable_keys(1)
    _, opt_update = make_optimizer(cfg.train)

    def optimise(state, grads):
        g, _ = clip_by_global_norm(grads, cfg.train.grad_clip)
        trainable = {k: state["params"][k] for k in keys}
        new, opt = opt_update(g, state["opt"], trainable, jnp.float32(1e-4))
        ema = ema_update(state["ema"], new, 0.999) if "ema" in state else None
        return new, opt, ema

    grads = jax.tree_util.tree_map(lambda a: a * 1e-3, {k: params[k] for k in keys})
    sub_state = {
        "params": params,
        "opt": state["opt"],
        **({"ema": state["ema"]} if "ema" in state else {}),
    }
    row(
        "optimiser: clip + AdamW + EMA (all params)",
        timed(jax.jit(optimise), sub_state, grads, runs=args.runs),
    )
    for stage in (1, 2):
        c = cfg.replace(train={"stage": stage})
        st = train.init_state(c, 0)
        step = jax.jit(train.make_train_step(c), donate_argnums=0)
        inputs = train.step_inputs(batch, c, 5)
        st, _ = step(st, *inputs)
        jax.block_until_ready(st)
        times = []
        with ClockMonitor() as clocks:
            for _ in range(args.runs):
                t = time.perf_counter()
                st, met = step(st, *inputs)
                jax.block_until_ready(met)
                times.append(time.perf_counter() - t)
        compiled = step.lower(st, *inputs).compile()
        temp = getattr(compiled.memory_analysis(), "temp_size_in_bytes", 0) / 2**30
        gflop = transformer_flops(m, stage)["train_step"] / 1e9
        row(f"whole Stage-{stage} step (temp {temp:.1f} GiB)", statistics.median(times), gflop)
        print(cost_model(compiled, b * gflop * 1e9, statistics.median(times), args), flush=True)
        if clock := clocks.summary():  # short runs, each synchronised: a higher clock than
            # train_step.py's back-to-back steps hold at the power limit
            print(f"  SM clock {clock['sm_clock_mhz']:.0f} MHz, {clock['power_w']:.0f} W (median)")
        if args.trace and stage == 1:
            # A kernel replayed from a CUDA graph names the graph, not its HLO instruction:
            # the traced step is compiled without them, so that every kernel maps to a part.
            traced = step.lower(st, *inputs).compile(compiler_options=TRACE_OPTIONS)
            st, met = traced(st, *inputs)
            jax.block_until_ready(met)
            with jax.profiler.trace(args.trace, create_perfetto_trace=True):
                for _ in range(3):
                    st, met = traced(st, *inputs)
                jax.block_until_ready(met)
            # the traced program's HLO: trace_summary.py maps its kernels to named scopes
            (Path(args.trace) / trace_summary.HLO_NAME).write_text(traced.as_text())
        del st
    return 0


if __name__ == "__main__":
    sys.exit(main())
