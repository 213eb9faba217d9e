#!/usr/bin/env bash
# The GPU runs behind the README's performance table, in parts that each fit a 10-minute
# slot. Benchmark rows are appended to $RESULTS (JSON lines), tables go to stdout.
#
#   RESULTS=bench.jsonl DATA=path/to/bsds500/train bash benchmarks/gpu.sh train|jax|torch|extra
#   N=2 DATA=path/to/photos bash benchmarks/gpu.sh scaling|scaling_run    (a machine of N GPUs)
#   OUT=dir bash benchmarks/gpu.sh levers    each speed lever on and off: $OUT/levers.md
#                                            (ROWS=main: the README's table; ROWS=jax|torch|flags,
#                                            MATCH=regex: some rows;
#                                            PART=K/N: every N-th row from the K-th, one call each,
#                                            then levers.py --from-json $RESULTS: the whole table)
#   bash benchmarks/gpu.sh determinism       the recipe's step with and without deterministic kernels
#   bash benchmarks/gpu.sh mlp               fc1 + bias + erf GELU: XLA's two kernels against one
#                                            fused Pallas kernel (benchmarks/mlp_epilogue.py)
#   OUT=dir bash benchmarks/gpu.sh trace     where the step's time goes (PRESET=base, BATCH=256): breakdown.txt,
#                                            trace_summary.txt, the profile and its HLO (xz);
#                                            trace.tgz holds all but the profile
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
    $B --preset base --stage 1 --batch 256 --backends jax --remat dots --timeout 150
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
  determinism)  # what run-to-run identical kernels cost: the recipe's step (`seed`, B=64, the
    # block stacks unrolled as the recipe has them; torch ignores --unroll), both stages
    for stage in 1 2; do
      $B --preset seed --stage $stage --batch 64 --backends jax,torch --unroll 12 --timeout 150 \
          --label fastest
      python benchmarks/train_step.py --dtype bfloat16 --attention plain --warmup 3 --steps 10 \
          --json "$RESULTS" --preset seed --stage $stage --batch 64 --backends jax,torch \
          --unroll 12 --timeout 150 --label plain
      python benchmarks/train_step.py --dtype bfloat16 --attention plain --warmup 3 --steps 10 \
          --json "$RESULTS" --preset seed --stage $stage --batch 64 --backends jax,torch \
          --unroll 12 --timeout 150 --deterministic --label deterministic
      # JAX's Pallas flash kernel (no atomics in its backward): with and without the flag
      for det in "" --deterministic; do
        python benchmarks/train_step.py --dtype bfloat16 --attention flash --warmup 3 --steps 10 \
            --json "$RESULTS" --preset seed --stage $stage --batch 64 --backends jax \
            --unroll 12 --timeout 150 $det --label "flash${det:+ deterministic}"
      done
    done ;;
  mlp)  # the MLP's fc1 with its bias + GELU epilogue fused, at `base`'s shape (B=256);
        # KERNELS="mosaic" times only the Mosaic GPU kernels beside XLA's
    python benchmarks/mlp_epilogue.py --rows 98304 --width 768 --hidden 3072 --runs 20 \
        --kernels ${KERNELS:-pallas mosaic} ;;
  trace)  # the README's "where the time goes": each part timed, then the Stage-1 step traced
    T=${OUT:-runs/trace}
    mkdir -p "$T"
    python benchmarks/breakdown.py --preset "${PRESET:-base}" --batch "${BATCH:-256}" --dtype bfloat16 --attention fused \
        --remat none --unroll 12 --runs 3 --trace "$T/profile" | tee "$T/breakdown.txt"
    python benchmarks/trace_summary.py "$T/profile" --top 60 | tee "$T/trace_summary.txt"
    xz -f "$T/profile/step.hlo.txt"  # the kernels' instructions, small enough to copy off
    # the summaries and the HLO as one file to copy off the machine (the profile stays)
    tar czf "$T/trace.tgz" -C "$T" breakdown.txt trace_summary.txt profile/step.hlo.txt.xz ;;
  levers)  # every ModelConfig speed switch on and off, one Markdown table (ROWS, MATCH: a part)
    mkdir -p "${OUT:-.}"
    python benchmarks/levers.py --out "${OUT:-.}/levers${ROWS:+_$ROWS}${PART:+_${PART/\//of}}.md" \
        --rows "${ROWS:-all}" --json "$RESULTS" ${MATCH:+--match "$MATCH"} ${PART:+--part "$PART"} ;;
  scaling)  # data parallelism: per-GPU and total img/s, scaling efficiency against one GPU
    N=${N:-$(nvidia-smi -L | wc -l)}
    $B --preset base --stage 1 --batch "${PER_GPU_BATCH:-128}" --backends jax --devices "plain,1,$N" --timeout 300
    $B --preset base --stage 1 --batch "${PER_GPU_BATCH:-128}" --backends torch --devices "1,$N" --timeout 300 ;;
  scaling_run)  # a real run on N GPUs that checkpoints, then resumes on one GPU
    N=${N:-$(nvidia-smi -L | wc -l)}
    maetok train --preset seed --data "$DATA" --steps 200 --batch-size $((32 * N)) --dtype bfloat16 \
        --no-progress --set model.attention=fused --set train.ckpt_every=100 --devices "$N" \
        --overwrite --out "$RUNS/scaling_run"
    maetok train --resume --steps 300 --devices 1 --no-progress --out "$RUNS/scaling_run"
    python - "$RUNS/scaling_run/metrics.jsonl" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
for r in rows:
    if r["step"] in (0, 99, 199, 200, 201, 299):
        print(f"step {r['step']:4d}  loss {r['loss']:.4f}  {r['images_per_s']:.1f} img/s")
PY
    ;;
  *) echo "parts: train, jax, torch, extra, determinism, levers, scaling, scaling_run"; exit 2 ;;
esac
