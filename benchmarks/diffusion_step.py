"""Time the latent diffusion train step and the sampler; print one JSON line per setting.

    python benchmarks/diffusion_step.py --preset small --tokens 16,64 --token-dim 16 \
        --attention plain,fused --steps 200 [--sample 1000]

Data are random latents of the CIFAR-10 training-set size (50 000, L, h), resident on the
device as in ``maetok diffusion train``. A step is timed as the mean over ``--steps``
calls after two warm-up calls (compilation excluded), synchronised once at the end, as the
training loop runs. FLOP formula per sample (forward; training ×3): per block
``L·(24·D² + 4·L·D)`` for the token matmuls, scores and weighted sum, plus ``12·D²`` for
the adaLN modulation; ``4·L·h·D`` for the input and output projections.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax
import jax.numpy as jnp
import numpy as np

from maetok.diffusion_config import preset
from maetok.params import count, init_dit
from maetok_jax import diffusion_train as dtrain
from maetok_jax.backend import Backend
from maetok_jax.flow import sample

CIFAR_TRAIN = 50_000


def forward_flops(c) -> float:
    """Forward FLOPs of the DiT per sample."""
    d, n = c.width, c.num_tokens
    blocks = c.depth * (n * (24 * d * d + 4 * n * d) + 12 * d * d)
    return blocks + 4 * n * c.token_dim * d + 2 * c.time_freq_dim * d + 6 * d * d


def time_train(cfg, steps: int) -> dict:
    rng = np.random.default_rng(0)
    latents = jnp.asarray(
        rng.standard_normal((CIFAR_TRAIN, cfg.num_tokens, cfg.token_dim)), jnp.float32
    )
    labels = jnp.asarray(rng.integers(0, 10, CIFAR_TRAIN), jnp.int32)
    state, step = dtrain.init_state(cfg), dtrain.make_train_step(cfg)
    t0 = time.perf_counter()
    state, m = step(state, latents, labels, np.float32(1e-4))
    jax.block_until_ready(m)
    first = time.perf_counter() - t0
    state, m = step(state, latents, labels, np.float32(1e-4))
    jax.block_until_ready(m)
    t0 = time.perf_counter()
    for _ in range(steps):
        state, m = step(state, latents, labels, np.float32(1e-4))
    jax.block_until_ready(m)
    dt = (time.perf_counter() - t0) / steps
    flops = 3 * forward_flops(cfg) * cfg.batch_size
    return {
        "first_step_s": round(first, 2),
        "step_ms": round(1e3 * dt, 3),
        "samples_per_s": round(cfg.batch_size / dt),
        "train_tflop_per_step": flops / 1e12,
        "tflop_s": round(flops / dt / 1e12, 2),
        "min_for_20k_steps": round(20000 * dt / 60, 2),
        "loss": float(m["loss"]),
        "peak_memory_gib": (Backend.peak_memory_bytes() or 0) / 2**30,
    }, state


def time_sample(cfg, params, n: int) -> dict:
    labels = np.arange(n) % cfg.num_classes
    out = {}
    for guidance in (1.0, cfg.guidance):
        args = (params, jax.random.key(0), labels, cfg, cfg.sampler, cfg.sample_steps, guidance)
        jax.block_until_ready(sample(*args))
        t0 = time.perf_counter()
        jax.block_until_ready(sample(*args))
        out[f"sample_{n}_g{guidance}_s"] = round(time.perf_counter() - t0, 3)
    return out


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="small")
    p.add_argument("--tokens", default="64", help="L values, comma-separated")
    p.add_argument("--token-dim", type=int, default=16)
    p.add_argument("--attention", default="plain")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--batch", type=int)
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--sample", type=int, default=0, help="also time sampling this many latents")
    args = p.parse_args(argv)
    print(f"# jax {jax.__version__} on {jax.devices()[0].device_kind}", flush=True)
    for n in (int(v) for v in args.tokens.split(",")):
        for attention in args.attention.split(","):
            extra = {"batch_size": args.batch} if args.batch else {}
            cfg = preset(
                args.preset,
                num_tokens=n,
                token_dim=args.token_dim,
                attention=attention,
                compute_dtype=args.dtype,
                **extra,
            )
            row = {
                "preset": args.preset,
                "L": n,
                "h": args.token_dim,
                "attention": attention,
                "dtype": args.dtype,
                "batch": cfg.batch_size,
                "params_M": round(count(init_dit(cfg, 0)) / 1e6, 2),
            }
            result, state = time_train(cfg, args.steps)
            row.update(result)
            if args.sample:
                row.update(time_sample(cfg, state["ema"], args.sample))
            print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
