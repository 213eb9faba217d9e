#!/usr/bin/env bash
# The benchmark runs behind the README's performance table, in parts that each fit a
# 10-minute slot. Results are appended to $RESULTS (JSON lines) and the tables to stdout.
#
#   RESULTS=bench.jsonl bash benchmarks/h100.sh jax|torch|extra
set -uo pipefail
RESULTS=${RESULTS:-benchmarks/results.jsonl}
DATA=${DATA:-datasets/bsds500/train}
B="python benchmarks/train_step.py --dtype bfloat16 --attention fused --warmup 3 --steps 10 --json $RESULTS"
case "${1:-jax}" in
  jax)    # JAX Stage 1 batch sweep (B=64 plain; 128 and 256 with remat), Stage 2, real JPEGs
    $B --preset base --stage 1 --batch 64 --backends jax --ceiling --timeout 150
    $B --preset base --stage 1 --batch 128,256 --backends jax --remat --timeout 200
    $B --preset base --stage 2 --batch 128 --backends jax --remat --timeout 120
    $B --preset base --stage 1 --batch 128 --backends jax --remat --data "$DATA" --timeout 150 ;;
  torch)  # torch eager and compiled at the batch both fit without remat
    $B --preset base --stage 1 --batch 64 --backends torch --timeout 150
    $B --preset base --stage 1 --batch 64 --backends torch-compile --timeout 500 ;;
  extra)  # GAN on, the seed preset, levers
    $B --preset base --stage 1 --batch 128 --backends jax --remat --gan --timeout 150
    $B --preset seed --stage 1 --batch 64 --backends jax --data "$DATA" --timeout 120
    $B --preset base --stage 1 --batch 128 --backends jax --remat --unroll 12 --timeout 150
    python benchmarks/train_step.py --dtype bfloat16 --attention plain --warmup 3 --steps 10 \
        --json "$RESULTS" --preset base --stage 1 --batch 128 --backends jax --remat --timeout 150 ;;
  *) echo "parts: jax, torch, extra"; exit 2 ;;
esac
