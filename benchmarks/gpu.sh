#!/usr/bin/env bash
# The GPU runs behind the README's performance table, in parts that each fit a 10-minute
# slot. Benchmark rows are appended to $RESULTS (JSON lines), tables go to stdout.
#
#   RESULTS=bench.jsonl DATA=path/to/bsds500/train bash benchmarks/gpu.sh train|jax|torch|extra
set -uo pipefail
RESULTS=${RESULTS:-benchmarks/results.jsonl}
DATA=${DATA:-datasets/bsds500/train}
RUNS=${RUNS:-runs}
B="python benchmarks/train_step.py --dtype bfloat16 --attention fused --warmup 3 --steps 10 --json $RESULTS"
case "${1:-jax}" in
  train)  # `maetok train --preset base`, Stage 1, batch 64, on the built-in synthetic images
    maetok train --preset base --steps 60 --batch-size 64 --dtype bfloat16 --no-progress \
        --set model.attention=fused --set train.log_every=10 --overwrite --out "$RUNS/base_s1"
    python - "$RUNS/base_s1/metrics.jsonl" <<'PY'
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
rates = [r["images_per_s"] for r in rows if r["step"] >= 19]  # after the first 20 steps
print(f"maetok train --preset base: {statistics.median(rates):.1f} img/s after warm-up "
      f"(median of {len(rates)} logged intervals), final loss {rows[-1]['loss']:.4f}")
PY
    ;;
  jax)    # JAX Stage 1 batch sweep, Stage 2, real JPEGs through the data pipeline
    $B --preset base --stage 1 --batch 64,128 --backends jax --ceiling --timeout 150
    $B --preset base --stage 1 --batch 256 --backends jax --remat --timeout 150
    $B --preset base --stage 2 --batch 128 --backends jax --timeout 120
    $B --preset base --stage 1 --batch 128 --backends jax --data "$DATA" --timeout 150 ;;
  torch)  # torch eager and compiled
    $B --preset base --stage 1 --batch 128 --backends torch --timeout 150
    $B --preset base --stage 2 --batch 128 --backends torch --timeout 120
    $B --preset base --stage 1 --batch 128 --backends torch-compile --timeout 540 ;;
  extra)  # GAN on, the seed preset, levers
    $B --preset base --stage 1 --batch 128 --backends jax --gan --timeout 150
    $B --preset seed --stage 1 --batch 128 --backends jax,torch --timeout 150
    $B --preset base --stage 1 --batch 128 --backends jax --unroll 12 --timeout 150
    python benchmarks/train_step.py --dtype bfloat16 --attention plain --warmup 3 --steps 10 \
        --json "$RESULTS" --preset base --stage 1 --batch 128 --backends jax --timeout 150 ;;
  *) echo "parts: train, jax, torch, extra"; exit 2 ;;
esac
