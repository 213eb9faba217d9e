"""Time the MAETok train step per backend and print a table (and write JSON).

    python benchmarks/train_step.py --preset base --stage 1 --dtype bfloat16 --batch 128 \
        --backends jax,torch,torch-compile [--data ../shared/data/bsds500/train] [--gan]

Each backend runs in its own subprocess, so peak memory is its own. Per backend it
reports images/s over the timed steps run back to back as ``maetok train`` runs them (one
device sync at the end, so the next batch's transfer and dispatch overlap the device's work;
the median of the same steps each synchronised is kept as ``step_ms_median``),
model TFLOP/s from the formula below, utilisation against the H100 SXM bf16 dense peak
(989 TFLOP/s) and against a measured 8192³ bf16 matmul on the same device, peak device
memory, the SM clock and power draw over the back-to-back steps (``benchmarks/clocks.py``;
an H200 runs this step at its power limit, below its maximum clock), the time of the first
step and the compile time (what the warm-up steps took
beyond timed ones; for ``torch-compile``, ``model.compile_scope`` says what is compiled:
"block", the default, "parts" (the block and the step's other parts, once each) or
"step"). Kernels are the frameworks' fastest unless ``--deterministic`` asks for the
run-to-run identical ones ``maetok train`` uses by default (``train.deterministic``).

The images come from the host each step, as in training; ``--resident`` keeps the
in-memory batches on the device instead, which shows what that copy costs.

``--set SECTION.FIELD=VALUE`` overrides any config field, e.g. the compute-only switches of
``ModelConfig`` (``--set model.stack_aux=false``); ``benchmarks/levers.py`` times each of
them off in turn.

Data parallelism: ``--devices 1,2,4,8`` times each backend on that many devices (JAX: a
mesh in one process; torch: that many processes under ``torchrun``), ``--batch`` images per
device, so the global batch is N × ``--batch``. It reports total and per-device images/s
and the scaling efficiency, per-device images/s against the smallest count in the list.
``plain`` in the list is today's one-device path without a mesh, so

    python benchmarks/train_step.py --preset base --dtype bfloat16 --batch 128 \
        --backends jax --devices plain,1

shows what the mesh costs on one device: the same step, batch and data, side by side.

FLOP formula (per image): a transformer block over n tokens of width D costs
``n·(24·D² + 4·n·D)`` forward (QKV, projection and MLP matmuls, plus scores and weighted
sum), training costs 3× forward. Stage 1 trains encoder, pixel decoder and the ViT aux
decoders (3×); Stage 2 runs the encoder forward (1×) and trains the decoder (3×). Dense
layers outside blocks (patch embed, bottleneck, latent projections, heads) count
``2·n·in·out``. Convolutional parts (HOG/Gabor targets, perceptual pyramid,
discriminator) are counted separately and reported, not included in model TFLOP/s.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.clocks import ClockMonitor
from maetok import reproducible
from maetok.cli import _overrides
from maetok.config import REMAT_MODES, preset
from maetok.filters import PERCEP_LEVELS, filter_banks
from maetok.params import disc_widths
from maetok.targets import target_dim

H100_BF16_DENSE = 989.0  # TFLOP/s, H100 SXM spec sheet


def add_remat_argument(p) -> None:
    """``--remat [MODE]``: ``model.remat``, what the backward pass recomputes (alone: dots)."""
    p.add_argument(
        "--remat",
        nargs="?",
        const="dots",
        default="none",
        choices=REMAT_MODES,
        help="model.remat: what the backward pass recomputes (alone: dots)",
    )


def _blocks(depth, n, d):
    return depth * n * (24 * d * d + 4 * n * d)


def transformer_flops(m, stage: int) -> dict:
    """Forward FLOPs per image of each part, and the training total for ``stage``."""
    n = m.num_patches + m.num_latent_tokens
    enc = (
        _blocks(m.enc_depth, n, m.enc_width)
        + 2 * m.num_patches * m.patch_dim * m.enc_width
        + 2 * m.num_latent_tokens * m.enc_width * m.latent_dim
    )
    dec = (
        _blocks(m.dec_depth, n, m.dec_width)
        + 2 * m.num_patches * m.dec_width * m.patch_dim
        + 2 * m.num_latent_tokens * m.latent_dim * m.dec_width
    )
    aux = 0
    for name in m.aux_targets:
        if m.aux_kind == "vit":
            aux += _blocks(
                m.aux_depth, n, m.aux_width
            ) + 2 * m.num_patches * m.aux_width * target_dim(name, m)
    train = 3 * (enc + dec + aux) if stage == 1 else enc + 3 * dec
    return {"encoder_fwd": enc, "decoder_fwd": dec, "aux_fwd": aux, "train_step": train}


def conv_flops(cfg, stage: int) -> float:
    """Approximate FLOPs per image of the convolutional parts (not in model TFLOP/s)."""
    m, hw = cfg.model, cfg.model.image_size**2
    banks = filter_banks(m.patch_size)
    total = 0.0
    if stage == 1:
        k = banks["gabor"].shape[0]
        total += 2 * hw * m.channels * (k * k * banks["gabor"].shape[-1] + 2 * 9)  # gabor + sobel
    per = 2 * sum(hw / 4**l for l in range(PERCEP_LEVELS)) * m.channels * 25 * 5
    total += per * 2 * 3  # images and recon, forward + backward through recon
    if cfg.loss.use_adv:
        w = disc_widths(m)
        size, d = m.image_size, 0.0
        for i in range(m.disc_depth):
            size //= 2
            d += 2 * size * size * 16 * w[i] * w[i + 1]
        d += 2 * size * size * 16 * w[-1]
        total += d * 3 * 3  # real + fake for D, fake for G, each forward + backward
    return total


def measure_matmul_ceiling(backend: str, seconds: float = 3.0) -> dict:
    """TFLOP/s of an 8192³ bf16 matmul on this device: the median of 10 synchronised ones
    (short enough to run at the full clock), and ``seconds`` of them back to back on random
    operands, the SM clock and power sampled meanwhile (``clocks.ClockMonitor``): the
    ceiling at the clock a sustained load holds."""

    n = 8192
    if backend == "jax":
        import jax
        import jax.numpy as jnp

        a = jnp.ones((n, n), jnp.bfloat16) * 0.01
        f = jax.jit(lambda x, y: x @ y)
        f(a, a).block_until_ready()
        times = []
        for _ in range(10):
            t = time.perf_counter()
            f(a, a).block_until_ready()
            times.append(time.perf_counter() - t)
        a = jax.random.normal(jax.random.key(0), (n, n), jnp.bfloat16)
        f(a, a).block_until_ready()
        sync = jax.block_until_ready
    else:
        import torch

        a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
        f = torch.matmul
        f(a, a)
        torch.cuda.synchronize()
        times = []
        for _ in range(10):
            t = time.perf_counter()
            f(a, a)
            torch.cuda.synchronize()
            times.append(time.perf_counter() - t)

        def sync(x):
            torch.cuda.synchronize()

    count = max(1, int(seconds / statistics.median(times)))
    with ClockMonitor() as clocks:
        t = time.perf_counter()
        for _ in range(count):
            y = f(a, a)
        sync(y)
        sustained = (time.perf_counter() - t) / count
    flop = 2 * n**3
    return {
        "matmul_ceiling_tflops": flop / statistics.median(times) / 1e12,
        "matmul_sustained_tflops": flop / sustained / 1e12,
        **{f"matmul_{k}": v for k, v in clocks.summary().items()},
    }


def run_single(args) -> dict:
    """Time one backend in this process."""
    import numpy as np

    from maetok.data import BatchSource, ImageFolder, Prefetcher
    from maetok.masks import mask_for_step
    from maetok.synthetic import SyntheticImages

    name = args.single
    devices = None if args.devices in (None, "plain") else int(args.devices)
    overrides = {
        "model": {
            "compute_dtype": args.dtype,
            "attention": args.attention,
            "unroll": args.unroll,
            "remat": args.remat,
        },
        "train": {
            "batch_size": args.batch * (devices or 1),
            "stage": args.stage,
            "steps": args.warmup + args.steps,
            "anneal_steps": 1000,
            "deterministic": args.deterministic,
        },
        "loss": {"use_adv": args.gan},
    }
    for section, fields in _overrides(args.set or []).items():  # --set wins
        overrides.setdefault(section, {}).update(fields)
    cfg = preset(args.preset, **overrides)
    # before the framework starts, as `maetok train` does (off: the frameworks' defaults)
    reproducible.request("jax" if name == "jax" else "torch", cfg.train.deterministic)
    if args.xla_flags:  # read once, when JAX starts: this row's subprocess only
        os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {args.xla_flags}".strip()
    if name == "jax":
        from maetok_jax.backend import Backend

        backend = Backend(cfg, devices=devices)

        def sync(x):
            import jax

            jax.block_until_ready(x)
    else:
        import torch

        from maetok_torch.backend import Backend

        torch.backends.cuda.matmul.allow_tf32 = True
        backend = Backend(cfg, compile=name == "torch-compile", devices=devices)

        def sync(x):
            if torch.cuda.is_available():
                torch.cuda.synchronize()

    total = args.warmup + args.steps  # then args.steps more, pipelined
    if args.data:
        source = BatchSource(ImageFolder(args.data, cfg.model.image_size), cfg, rows=backend.rows)
        batches = Prefetcher(
            source, 0, total + args.steps, depth=8, workers=min(8, os.cpu_count() or 2)
        )
    else:  # a few distinct in-memory batches, cycled
        b = cfg.train.batch_size
        source = BatchSource(
            SyntheticImages(cfg.model.image_size, count=4 * b), cfg, rows=backend.rows
        )
        pool = [source.batch(s) for s in range(4)]
        if args.resident:  # the images on the device once: what their copy each step costs
            pool = [{**b, **backend.to_device_tree({"images": b["images"]})} for b in pool]
        n = cfg.model.num_patches  # a fresh mask and ratio every step, as in training
        batches = (
            {**pool[s % 4], "mask": mask_for_step(s, cfg.train, n)[0][backend.rows]}
            for s in range(total + args.steps)
        )
    state = backend.init_state(0)
    times, warm, first = [], [], None
    for step, batch in zip(range(total), batches):
        t = time.perf_counter()
        state, metrics = backend.train_step(state, batch, step)
        sync(metrics)
        dt = time.perf_counter() - t
        if step == 0:
            first = dt
            print(f"   {name}: first step (compile) {dt:.1f} s", file=sys.stderr, flush=True)
        (times if step >= args.warmup else warm).append(dt)
    # the same number of steps again, back to back with one sync at the end, as in training
    with ClockMonitor() as clocks:
        t = time.perf_counter()
        for step, batch in zip(range(total, total + args.steps), batches):
            state, metrics = backend.train_step(state, batch, step)
        sync(metrics)
        pipelined = (time.perf_counter() - t) / args.steps
    loss = float(backend.metrics_to_host(metrics)["loss"])
    if not backend.is_writer:  # torchrun: rank 0 reports
        return None
    med = statistics.median(times)
    flops = transformer_flops(cfg.model, args.stage)
    ips = cfg.train.batch_size / pipelined
    result = {
        "devices": devices,
        "images_per_s_per_device": ips / (devices or 1),
        "backend": name,
        "preset": args.preset,
        "stage": args.stage,
        "dtype": args.dtype,
        "batch": args.batch,
        "global_batch": cfg.train.batch_size,
        "gan": args.gan,
        "attention": args.attention,
        "unroll": args.unroll,
        "remat": cfg.model.remat,
        "deterministic": cfg.train.deterministic,
        "xla_flags": args.xla_flags,
        "set": list(args.set or []),
        "label": args.label,
        "data": args.data or "in-memory synthetic",
        "resident": args.resident,
        "images_per_s": ips,
        "step_ms": pipelined * 1e3,
        "images_per_s_synced": cfg.train.batch_size / med,
        "step_ms_median": med * 1e3,
        "step_ms_p10": float(np.percentile(times, 10)) * 1e3,
        "step_ms_p90": float(np.percentile(times, 90)) * 1e3,
        "model_tflops": ips * flops["train_step"] / 1e12,
        "model_gflop_per_image": flops["train_step"] / 1e9,
        "conv_gflop_per_image": conv_flops(cfg, args.stage) / 1e9,
        "first_step_s": first,
        # compilation (XLA, or torch.compile's graphs) ≈ what the warm-up steps took beyond
        # timed ones (compile_scope "parts" compiles its parts in the second step)
        "compile_s": sum(max(w - med, 0.0) for w in warm),
        "final_loss": loss,
        "peak_memory_gib": (backend.peak_memory_bytes() or 0) / 2**30,
        **clocks.summary(),  # the SM clock and power over the back-to-back steps (NVIDIA)
        "device": backend.describe(),
    }
    if args.ceiling:
        result.update(measure_matmul_ceiling("jax" if name == "jax" else "torch"))
    return result


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="tiny")
    p.add_argument("--stage", type=int, default=1, choices=(1, 2))
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    p.add_argument("--batch", default="8", help="batch size, or a comma list to sweep")
    p.add_argument("--backends", default="jax,torch")
    p.add_argument("--attention", default="plain", choices=("plain", "fused", "flash"))
    p.add_argument("--gan", action="store_true", help="discriminator and L_adv on")
    p.add_argument("--data", help="time real images through the data pipeline (a folder)")
    p.add_argument(
        "--resident",
        action="store_true",
        help="the in-memory images placed on the device once, not copied there each step "
        "(the masks still are): what the host-to-device copy costs",
    )
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--ceiling", action="store_true", help="also time an 8192³ bf16 matmul")
    p.add_argument("--json", help="append results to this JSON-lines file")
    p.add_argument("--timeout", type=float, default=900, help="seconds per backend and batch")
    p.add_argument("--unroll", type=int, default=1, help="JAX: lax.scan unroll of the block stacks")
    add_remat_argument(p)
    p.add_argument(
        "--set",
        action="append",
        metavar="SECTION.FIELD=VALUE",
        help="override a config field, e.g. --set model.stack_aux=false (repeatable)",
    )
    p.add_argument("--label", default="", help="a name for this run in the JSON rows")
    p.add_argument(
        "--xla-flags",
        default="",
        help="JAX: XLA flags added to $XLA_FLAGS in the timed subprocess, e.g. "
        "--xla-flags=--xla_gpu_triton_gemm_any=true",
    )
    p.add_argument(
        "--deterministic",
        action="store_true",
        help="train.deterministic: run-to-run identical GPU kernels, as `maetok train` uses by "
        "default (off here: the frameworks' fastest kernels)",
    )
    p.add_argument(
        "--devices",
        help="data parallelism: device counts to time, e.g. 1,2,4,8 "
        "(--batch per device); 'plain' is the one-device path without a mesh",
    )
    p.add_argument("--single", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.resident and args.data:
        p.error("--resident keeps in-memory images on the device; it does not apply to --data")

    if args.single:
        args.batch = _ints(args.batch)[-1]
        try:
            result = run_single(args)
        except Exception as e:  # out-of-memory among others: report, not crash
            text = " ".join(str(e).split())
            oom = "RESOURCE_EXHAUSTED" in text or "out of memory" in text.lower()
            print(
                "ERROR " + ("out of memory" if oom else f"{type(e).__name__}: {text[:300]}"),
                flush=True,
            )
            raise
        if result is not None:
            print("RESULT " + json.dumps(result), flush=True)
        return 0
    results = []
    base = [a for a in (argv if argv is not None else sys.argv[1:])]
    counts = args.devices.split(",") if args.devices else [None]
    for batch in _ints(args.batch):
        for name in args.backends.split(","):
            runs = [_run_backend(name, batch, base, args.timeout, n) for n in counts]
            results += scaling(runs)
        print_table([r for r in results if r.get("batch") == batch])
    if args.json:
        with open(args.json, "a") as f:
            for r in results:
                f.write(json.dumps(r) + "\n")
    return 0 if all("error" not in r for r in results) else 1


def _ints(text) -> list[int]:
    return [int(x) for x in str(text).split(",") if x]


def scaling(runs: list[dict]) -> list[dict]:
    """Add each run's per-device images/s over that of the fewest devices (``plain``: 1)."""
    ok = [r for r in runs if "error" not in r]
    if len(ok) > 1:
        base = min(ok, key=lambda r: r["devices"] or 1)
        for r in ok:
            r["scaling_efficiency"] = r["images_per_s_per_device"] / base["images_per_s_per_device"]
    return runs


def _run_backend(
    name: str, batch: int, argv: list[str], timeout: float, devices: str | None = None
) -> dict:
    """One backend at one batch size in a fresh subprocess; its stderr streams through.

    ``devices``: a count or ``plain``; torch with N > 1 runs N processes under torchrun.
    """
    cmd = [sys.executable, __file__, *argv, "--single", name, "--batch", str(batch)]
    if devices is not None:
        cmd += ["--devices", devices]
        if name != "jax" and devices != "plain" and int(devices) > 1:
            cmd[1:1] = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", devices]
    # JAX may use 95% of the device (its default cap is 75% even without preallocation)
    env = {
        "XLA_PYTHON_CLIENT_MEM_FRACTION": "0.95",
        **os.environ,
        "XLA_PYTHON_CLIENT_PREALLOCATE": "false",
    }
    where = f", devices {devices}" if devices is not None else ""
    print(f"-- {name}, batch {batch}{where}", file=sys.stderr, flush=True)
    try:
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, env=env, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"backend": name, "batch": batch, "error": f"timed out after {timeout:.0f} s"}
    lines = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
    if proc.returncode or not lines:
        err = next(
            (l[6:] for l in proc.stdout.splitlines() if l.startswith("ERROR ")),
            f"exit status {proc.returncode} (see the log above)",
        )
        return {"backend": name, "batch": batch, "error": err}
    return json.loads(lines[-1][7:])


def print_table(results) -> None:
    ok = [r for r in results if "error" not in r]
    for r in results:
        if "error" in r:
            print(f"{r['backend']}, batch {r.get('batch')}: {r['error']}")
    if not ok:
        return
    r0 = ok[0]
    per = " per device" if any(r.get("devices") for r in ok) else ""
    print(
        f"\npreset {r0['preset']}, stage {r0['stage']}, {r0['dtype']}, batch {r0['batch']}{per}, "
        f"gan {'on' if r0['gan'] else 'off'}, attention {r0['attention']}, data: {r0['data']}"
        + (", deterministic kernels" if r0.get("deterministic") else "")
    )
    print(
        f"model {r0['model_gflop_per_image']:.1f} GFLOP/image per train step "
        f"(+ {r0['conv_gflop_per_image']:.2f} GFLOP convolutional, not counted)"
    )
    head = (
        f"{'backend':15s}{'dev':>6s}{'img/s':>9s}{'img/s/dev':>10s}{'eff':>6s}"
        f"{'step ms':>9s}{'TFLOP/s':>9s}{'% 989':>7s}"
        f"{'% mm':>7s}{'peak GiB':>10s}{'1st step s':>11s}{'compile s':>10s}{'loss':>9s}"
        f"{'SM MHz':>8s}{'W':>6s}"
    )
    print(head + "\n" + "-" * len(head))
    ceiling = max((r.get("matmul_ceiling_tflops", 0) for r in ok), default=0)
    for r in ok:
        n = r.get("devices") or 1  # utilisation per device
        mm = f"{100 * r['model_tflops'] / n / ceiling:6.1f}%" if ceiling else "     -"
        eff = f"{100 * r['scaling_efficiency']:5.0f}%" if "scaling_efficiency" in r else "     -"
        dev = "plain" if r.get("devices") is None else str(r["devices"])
        print(
            f"{r['backend']:15s}{dev:>6s}{r['images_per_s']:9.1f}"
            f"{r.get('images_per_s_per_device', r['images_per_s']):10.1f}{eff}"
            f"{r['step_ms']:9.1f}"
            f"{r['model_tflops']:9.1f}{100 * r['model_tflops'] / n / H100_BF16_DENSE:6.1f}%"
            f"{mm}{r['peak_memory_gib']:10.2f}{r['first_step_s']:11.1f}"
            f"{r['compile_s']:10.1f}{r['final_loss']:9.4f}"
            + (
                f"{r['sm_clock_mhz']:8.0f}{r['power_w']:6.0f}"
                if "sm_clock_mhz" in r
                else "       -     -"
            )
        )
    for r in ok:
        if "matmul_ceiling_tflops" in r:
            line = f"measured 8192³ bf16 matmul ({r['backend']}): "
            line += f"{r['matmul_ceiling_tflops']:.0f} TFLOP/s"
            if "matmul_sustained_tflops" in r:
                line += f", {r['matmul_sustained_tflops']:.0f} for 3 s back to back"
            if "matmul_sm_clock_mhz" in r:
                line += f" at {r['matmul_sm_clock_mhz']:.0f} MHz, {r['matmul_power_w']:.0f} W"
            print(line)
    if any(r.get("sm_clock_mhz") for r in ok):
        r = next(r for r in ok if r.get("sm_clock_mhz"))
        print(
            f"SM MHz, W: medians over the back-to-back steps (maximum clock "
            f"{r['sm_clock_max_mhz']:.0f} MHz, power limit {r['power_limit_w']:.0f} W)"
        )


if __name__ == "__main__":
    sys.exit(main())
