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
  jax)    # JAX Stage 1 batch sweep (largest that fits), Stage 2, real JPEGs, seed preset
    $B --preset base --stage 1 --batch 128,256 --backends jax --ceiling --timeout 200
    $B --preset base --stage 2 --batch 128 --backends jax --timeout 120
    $B --preset base --stage 1 --batch 128 --backends jax --data "$DATA" --timeout 120
    $B --preset seed --stage 1 --batch 64 --backends jax --data "$DATA" --timeout 120 ;;
  torch)  # torch eager and compiled, Stage 1 and 2
    $B --preset base --stage 1 --batch 128 --backends torch,torch-compile --ceiling --timeout 300
    $B --preset base --stage 2 --batch 128 --backends torch --timeout 120 ;;
  extra)  # GAN on, the seed preset, levers
    $B --preset base --stage 1 --batch 128 --backends jax --gan --timeout 150
    $B --preset seed --stage 1 --batch 128 --backends jax,torch --timeout 150
    $B --preset base --stage 1 --batch 128 --backends jax --unroll 12 --timeout 150
    python benchmarks/train_step.py --dtype bfloat16 --attention plain --warmup 3 --steps 10 \
        --json "$RESULTS" --preset base --stage 1 --batch 128 --backends jax --timeout 150 ;;
  *) echo "parts: jax, torch, extra"; exit 2 ;;
esac
