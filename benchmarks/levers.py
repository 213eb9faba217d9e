"""Each speed lever of ``ModelConfig`` on and off, in one run, as one Markdown table.

    python benchmarks/levers.py --out levers.md [--rows all|main|jax|torch|flags] [--steps 5]
    python benchmarks/levers.py --out some.md --match "flash|parts"  # rows whose label matches
    python benchmarks/levers.py --out t.md --json rows.jsonl --part 2/3  # rows 2, 5, 8, …
    python benchmarks/levers.py --out t.md --from-json rows.jsonl   # one table of rows run before

Every row is one ``train_step.py`` subprocess (its own peak memory), preset ``base``, bf16
compute, fused attention, in-memory synthetic batches:

- JAX Stage 1 with every lever at its default (batch 128, and 256 with ``remat=dots``), and
  unrolled at batch 256 with ``remat`` none and dots;
- the same at batch 256 with one lever off at a time (``--set model.X=...``);
- the unrolled step with each of XLA's fusion switches in ``XLA_FLAG_ROWS`` (``--xla-flags``;
  ``--rows flags`` runs only these);
- JAX Stage 2 and the ``seed`` preset; torch eager and torch.compile (the block compiled
  once, ``model.compile_scope=block``, with its compile time) at both stages, and with
  ``compile_scope=parts`` (the targets and losses compiled once each, the optimiser leaf by
  leaf through one compiled kernel) at batch 256, and torch eager on the ``seed`` preset;
- the latent diffusion model's train step (``benchmarks/diffusion_step.py``, DiT ``small``
  on latents of 64 tokens × 16, batch 256, JAX only) with each attention kernel.

``--rows main`` runs the README's table (``MAIN``). Columns: images/s (the timed steps run
back to back, as in training), model TFLOP/s (``train_step.transformer_flops``), the share
of the matmul ceiling (``--ceiling``, 790 TFLOP/s: a bf16 matmul on the H200), the speed
against the official MAETok step (``--reference``, 270 img/s), peak memory and compile time.
A row that fails (out of memory, a timeout) says so in the table instead of stopping the run.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.train_step import _run_backend

BASE = ["--preset", "base", "--dtype", "bfloat16", "--attention", "fused"]
BIG = ["--remat", "dots"]  # batch 256 needs the dense outputs-only residuals to fit
# XLA's own switches for fusing the memory-bound work around the matmuls, one row each (``base``
# unrolled, batch 256): Triton's matmul emitter for every matmul it supports (LayerNorm, GELU
# and casts may fuse into it), cuDNN's LayerNorm, cuBLASLt (bias epilogues), cuDNN matmul fusions
XLA_FLAG_ROWS = {
    "triton_gemm_any": "--xla_gpu_triton_gemm_any=true",
    "cudnn_layer_norm": "--xla_gpu_enable_cudnn_layer_norm=true",
    "cublaslt": "--xla_gpu_enable_cublaslt=true",
    "cudnn_gemm_fusion_level 2": "--xla_gpu_cudnn_gemm_fusion_level=2",
}
DIT = ["--preset", "small", "--tokens", "64", "--token-dim", "16", "--steps", "50"]

# (label, backend, batch, extra train_step.py arguments); "lever off" rows name the switch.
ROWS = [
    ("JAX S1, all levers", "jax", 128, []),
    ("JAX S1, all levers", "jax", 256, BIG),
    ("JAX S1, lowp_norm off", "jax", 256, [*BIG, "--set", "model.lowp_norm=false"]),
    ("JAX S1, split_qkv off", "jax", 256, [*BIG, "--set", "model.split_qkv=false"]),
    ("JAX S1, fast_filters off", "jax", 256, [*BIG, "--set", "model.fast_filters=false"]),
    ("JAX S1, stack_aux off", "jax", 256, [*BIG, "--set", "model.stack_aux=false"]),
    ("JAX S1, remat full (not dots)", "jax", 256, ["--remat", "full"]),
    # full remat holds batch 256 in 11 GiB: does a larger batch then run faster?
    ("JAX S1, remat full", "jax", 512, ["--remat", "full"]),
    ("JAX S1, remat dots_attn", "jax", 256, ["--remat", "dots_attn"]),
    # the GELU output kept too: the backward no longer recomputes it for fc2's weight gradient
    ("JAX S1, unroll 12, remat dots_gelu", "jax", 256, ["--remat", "dots_gelu", "--unroll", "12"]),
    ("JAX S1, unroll 12", "jax", 256, [*BIG, "--unroll", "12"]),
    # nothing recomputed: batch 256 holds every activation in about 66 GiB on the H200
    ("JAX S1, unroll 12, remat none", "jax", 256, ["--unroll", "12"]),
    ("JAX S2, all levers", "jax", 256, [*BIG, "--stage", "2"]),
    ("JAX S2, unroll 12, remat none", "jax", 256, ["--stage", "2", "--unroll", "12"]),
    ("JAX S1 seed preset", "jax", 128, ["--preset", "seed"]),
    # the block scans unrolled: each block's parameters as static slices, not dynamic ones
    ("JAX S1 seed preset, unroll 12", "jax", 128, ["--preset", "seed", "--unroll", "12"]),
    # the Pallas flash kernel (no atomics in its backward), not cuDNN's: the later --attention wins
    (
        "JAX S1, unroll 12, flash attention",
        "jax",
        256,
        [*BIG, "--unroll", "12", "--attention", "flash"],
    ),
    (
        "JAX S1 seed preset, unroll 12, flash attention",
        "jax",
        128,
        ["--preset", "seed", "--unroll", "12", "--attention", "flash"],
    ),
    *(
        (f"JAX S1, unroll 12, {name}", "jax", 256, [*BIG, "--unroll", "12", f"--xla-flags={flag}"])
        for name, flag in XLA_FLAG_ROWS.items()
    ),
    ("torch eager S1", "torch", 128, []),
    # JAX's batch: about 125 GiB on the H200 (no remat in eager torch's fastest step)
    ("torch eager S1, batch 256", "torch", 256, []),
    ("torch.compile S1 (block)", "torch-compile", 128, ["--set", "model.compile_scope=block"]),
    # the block, the targets and losses compiled once each, the optimiser per leaf
    ("torch.compile S1 (parts)", "torch-compile", 256, ["--set", "model.compile_scope=parts"]),
    ("torch eager S2", "torch", 128, ["--stage", "2"]),
    ("torch.compile S2 (block)", "torch-compile", 128, ["--stage", "2"]),
    (
        "torch.compile S2 (parts)",
        "torch-compile",
        256,
        ["--stage", "2", "--set", "model.compile_scope=parts"],
    ),
    ("torch eager S1 seed preset", "torch", 128, ["--preset", "seed"]),
    # the latent diffusion step (JAX only): DiT ``small`` on latents of 64 tokens × 16
    *(
        (
            f"DiT small (latent diffusion), {kind} attention",
            "jax-diffusion",
            256,
            [*DIT, "--attention", kind],
        )
        for kind in ("plain", "fused")
    ),
]


# the README's Performance table: each backend's fastest step per stage and preset, the
# memory-saving JAX row beside it, and the latent diffusion step (``--rows main``; the table
# keeps ROWS' order)
MAIN = (
    "JAX S1, unroll 12, remat none",
    "JAX S1, unroll 12",
    "JAX S2, unroll 12, remat none",
    "JAX S1 seed preset, unroll 12",
    "torch.compile S1 (parts)",
    "torch.compile S2 (parts)",
    "torch eager S1",
    "torch eager S1, batch 256",
    "torch eager S2",
    "torch eager S1 seed preset",
    "DiT small (latent diffusion), plain attention",
    "DiT small (latent diffusion), fused attention",
)


def row_group(backend: str, extra: list[str]) -> str:
    """``flags`` for a row with XLA flags, else its backend's family (``jax``, ``torch``)."""
    if any(a.startswith("--xla-flags") for a in extra):
        return "flags"
    return "torch" if backend.startswith("torch") else "jax"


def selected(rows: list, group: str = "all", match: str | None = None) -> list:
    """The rows of ``group`` (``all``, ``main``, or a ``row_group``) whose label ``match``
    searches."""
    return [
        row
        for row in rows
        if (
            group == "all"
            or (group == "main" and row[0] in MAIN)
            or row_group(row[1], row[3]) == group
        )
        and (match is None or re.search(match, row[0]))
    ]


def part(rows: list, spec: str) -> list:
    """Part ``K/N`` of ``rows``: every N-th row from the K-th (1-based), so that N runs, one
    per part, share the slow rows (torch.compile, the unrolled steps) between them."""
    m = re.fullmatch(r"(\d+)/(\d+)", spec)
    if not m or not 1 <= int(m.group(1)) <= int(m.group(2)):
        raise ValueError(f"{spec!r} is not K/N with 1 ≤ K ≤ N")
    k, n = int(m.group(1)), int(m.group(2))
    return rows[k - 1 :: n]


def from_json(paths: list[str]) -> list[tuple[str, dict]]:
    """The (label, result) rows that ``--json`` appended to ``paths``, in the order of
    ``ROWS`` (labels it does not have last, as read); a label run twice keeps its last row."""
    found = {}
    for path in paths:
        for line in Path(path).read_text().splitlines():
            if line.strip():
                row = json.loads(line)
                found.pop(row["label"], None)
                found[row["label"]] = row
    order = {label: i for i, (label, *_) in enumerate(ROWS)}
    labels = sorted(found, key=lambda label: order.get(label, len(order)))
    return [(label, found[label]) for label in labels]


def run_diffusion(argv: list[str], timeout: float) -> dict:
    """One ``diffusion_step.py`` setting in a fresh subprocess (its own peak memory), as a row
    of the table: samples/s as img/s, no ratio to the official tokenizer step."""
    cmd = [sys.executable, str(ROOT / "benchmarks" / "diffusion_step.py"), *argv]
    try:
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    rows = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode or not rows:
        return {"error": f"exit status {proc.returncode} (see the log above)"}
    r = rows[-1]
    return {
        "batch": r["batch"],
        "images_per_s": r["samples_per_s"],
        "model_tflops": r["train_tflop_per_step"] / (r["step_ms"] / 1e3),  # (unrounded)
        "peak_memory_gib": r["peak_memory_gib"],
        "compile_s": r["first_step_s"] - r["step_ms"] / 1e3,
        "reference": False,  # not a tokenizer step: no "× official"
        "diffusion": r,
    }


def table(results: list[tuple[str, dict]], ceiling: float, reference: float) -> str:
    """The Markdown table of (label, train_step result row or error) pairs."""
    head = (
        "| run | batch | img/s | model TFLOP/s | % of matmul ceiling | × official | "
        "peak GiB | compile s | SM MHz |\n|---|---|---|---|---|---|---|---|---|\n"
    )
    lines = []
    for label, r in results:
        if "error" in r:
            lines.append(f"| {label} | {r.get('batch')} | {r['error']} | | | | | | |")
            continue
        official = f"{r['images_per_s'] / reference:.2f}" if r.get("reference", True) else "–"
        clock = f"{r['sm_clock_mhz']:.0f}" if r.get("sm_clock_mhz") else "–"
        lines.append(
            f"| {label} | {r['batch']} | {r['images_per_s']:.1f} | {r['model_tflops']:.1f} | "
            f"{100 * r['model_tflops'] / ceiling:.1f} % | {official} | "
            f"{r['peak_memory_gib']:.1f} | {r['compile_s']:.1f} | {clock} |"
        )
    note = (
        f"\nMatmul ceiling {ceiling:.0f} TFLOP/s; × official: images/s over {reference:.0f} "
        "(the official MAETok step; the DiT rows count latent samples). Compile s: first "
        "step less a timed one. SM MHz: the median SM clock over the timed steps "
        "(`benchmarks/clocks.py`).\n"
    )
    return head + "\n".join(lines) + "\n" + note


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="the Markdown file to write")
    p.add_argument(
        "--rows",
        default="all",
        choices=("all", "main", "jax", "torch", "flags"),
        help="main: the README's table; jax, torch: that backend's rows without XLA flags; "
        "flags: the XLA-flag rows",
    )
    p.add_argument("--match", help="only the rows whose label this regular expression matches")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--ceiling", type=float, default=790.0)
    p.add_argument("--reference", type=float, default=270.0)
    p.add_argument("--json", help="also append every row to this JSON-lines file")
    p.add_argument("--timeout", type=float, default=240, help="seconds per row")
    p.add_argument("--part", help="K/N: only every N-th selected row, from the K-th")
    p.add_argument(
        "--from-json",
        nargs="+",
        metavar="FILE",
        help="run nothing: the table of the rows --json appended to these files",
    )
    args = p.parse_args(argv)
    if args.from_json:
        try:
            results = from_json(args.from_json)
        except (OSError, ValueError, KeyError) as e:
            p.error(f"--from-json: {e}")
        Path(args.out).write_text(table(results, args.ceiling, args.reference))
        print(Path(args.out).read_text())
        return 0
    try:
        rows = selected(ROWS, args.rows, args.match)
    except re.error as e:
        p.error(f"--match: {e}")
    if args.part:
        try:
            rows = part(rows, args.part)
        except ValueError as e:
            p.error(f"--part: {e}")
    if not rows:
        p.error(f"no row matches --rows {args.rows} --match {args.match!r} --part {args.part}")
    common = ["--warmup", str(args.warmup), "--steps", str(args.steps)]

    def measure(label: str, backend: str, batch: int, extra: list[str]) -> dict:
        if backend == "jax-diffusion":
            return {"batch": batch, **run_diffusion([*extra, "--batch", str(batch)], args.timeout)}
        argv_row = [*BASE, *common, *extra, "--label", label]
        return _run_backend(backend, batch, argv_row, args.timeout)

    results = []
    for label, backend, batch, extra in rows:
        result = measure(label, backend, batch, extra)
        results.append((label, result))
        if args.json:
            with open(args.json, "a") as f:
                f.write(json.dumps({"label": label, **result}) + "\n")
        Path(args.out).write_text(table(results, args.ceiling, args.reference))  # as it goes
    print(Path(args.out).read_text())
    return 0 if all("error" not in r for _, r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
