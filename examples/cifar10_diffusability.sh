#!/usr/bin/env bash
# The diffusability study on CIFAR-10: does mask modelling give latents that a diffusion
# model learns more easily than a plain autoencoder's?
#
#   CIFAR=../shared/data/cifar10 OUT=runs/c10 bash examples/cifar10_diffusability.sh [phase]
#
# phase: all (default) or one of prepare, classifier, tokenizers, tokmetrics, diffusion, sample, eval,
# table. Every phase skips work whose output exists and resumes interrupted training
# (`--resume`), so the study can be run in pieces (for example across 10-minute calls).
#
# Rows, all at an equal tokenizer budget of S1+S2 steps:
#   plain_ae   mask ratio 0, no auxiliary decoders, S1+S2 steps of Stage 1
#   maetok_s1  Stage 1 (r ~ U[MASK_MIN, MASK_MAX], HOG + Gabor + pixel targets weighted
#              GAMMA each), S1+S2 steps
#   maetok_s2  Stage 1 for S1 steps, then Stage 2 (encoder frozen, r annealed to 0) for S2
# Each tokenizer gets the same latent diffusion model (preset DIT), trained DIT_STEPS steps
# for each seed in SEEDS, sampled with the same sampler at guidance 1 and GUIDANCE.
set -euo pipefail
CIFAR=${CIFAR:-../shared/data/cifar10}
OUT=${OUT:-runs/c10}
CACHE=${CACHE:-${MAETOK_CACHE:-$HOME/.cache/maetok}/cifar10}
S1=${S1_STEPS:-3000}
S2=${S2_STEPS:-2000}
MASK_MIN=${MASK_MIN:-0.4}
MASK_MAX=${MASK_MAX:-0.6}
GAMMA=${GAMMA:-}   # each auxiliary target's weight γ (default: the preset's, 1); the recipe's 0.1
TOK_PRESET=${TOK_PRESET:-cifar}
TOK_BATCH=${TOK_BATCH:-256}
CLASSIFIER_ARGS=${CLASSIFIER_ARGS:-}   # e.g. "--epochs 2 --widths 8,8,8,8" for a smoke run
DIT=${DIT:-small}
DIT_STEPS=${DIT_STEPS:-12000}
SEEDS=${SEEDS:-"0 1"}
NUM=${NUM_SAMPLES:-10000}
SAMPLER=${SAMPLER:-heun}
NFE_STEPS=${SAMPLE_STEPS:-25}
GUIDANCE=${GUIDANCE:-1.5}
PHASE=${1:-all}
MAETOK=${MAETOK:-python -m maetok.cli}
TOKENIZERS="plain_ae maetok_s1 maetok_s2"
mkdir -p "$OUT"
# Several JAX processes share the GPU: each takes what it needs instead of 75 % up front.
export XLA_PYTHON_CLIENT_PREALLOCATE=${XLA_PYTHON_CLIENT_PREALLOCATE:-false}

# Train into $out (or resume it when a checkpoint is there); skip when it finished.
train_tok() {  # out steps args...
  local out=$1 steps=$2; shift 2
  [ -f "$out/done" ] && return 0
  if [ -f "$out/checkpoint.safetensors" ]; then
    $MAETOK train --resume --steps "$steps" --out "$out" --data "$CACHE/train" --no-progress
  else
    $MAETOK train --preset "$TOK_PRESET" --data "$CACHE/train" --steps "$steps" \
      --batch-size "$TOK_BATCH" --dtype bfloat16 \
      --no-progress --set model.attention=fused "$@" --out "$out"
  fi
  touch "$out/done"
}

tok_ckpt() { echo "$OUT/tokenizers/$1/checkpoint.safetensors"; }

phase_prepare() {
  $MAETOK diffusion prepare --cifar "$CIFAR" --cache "$CACHE"
}

phase_classifier() {
  $MAETOK diffusion classifier --cifar "$CIFAR" --cache "$CACHE" --no-progress $CLASSIFIER_ARGS
}

phase_tokenizers() {
  local masked=(--set train.mask_min="$MASK_MIN" --set train.mask_max="$MASK_MAX")
  [ -n "$GAMMA" ] && masked+=(--set "loss.gamma={\"hog\": $GAMMA, \"conv\": $GAMMA, \"pixel\": $GAMMA}")
  train_tok "$OUT/tokenizers/plain_ae" $((S1 + S2)) \
      --set train.mask_min=0 --set train.mask_max=0 --set 'model.aux_targets=[]' \
      > "$OUT/plain_ae.log" 2>&1 &
  train_tok "$OUT/tokenizers/maetok_s1" $((S1 + S2)) "${masked[@]}" > "$OUT/maetok_s1.log" 2>&1 &
  ( train_tok "$OUT/tokenizers/maetok_s1_short" "$S1" "${masked[@]}"
    train_tok "$OUT/tokenizers/maetok_s2" "$S2" --stage 2 --set train.warmup_steps=100 \
        --set train.anneal_steps=$((S2 * 3 / 4)) \
        --init-from "$(tok_ckpt maetok_s1_short)" ) > "$OUT/maetok_s2.log" 2>&1 &
  local status=0
  for job in $(jobs -p); do wait "$job" || status=1; done
  return $status
}

phase_tokmetrics() {
  for t in $TOKENIZERS; do
    [ -f "$OUT/tokenizers/$t/metrics.json" ] && continue
    $MAETOK diffusion eval --tokenizer "$(tok_ckpt "$t")" --cifar "$CIFAR" --cache "$CACHE" \
        --out "$OUT/tokenizers/$t/metrics.json" > "$OUT/tokmetrics_$t.log" 2>&1 &
  done
  local status=0
  for job in $(jobs -p); do wait "$job" || status=1; done
  return $status
}

phase_diffusion() {
  local status=0
  for t in $TOKENIZERS; do for s in $SEEDS; do
    local run="$OUT/diffusion/${t}_seed$s" resume=()
    [ -f "$run/done" ] && continue
    [ -f "$run/diffusion.safetensors" ] && resume=(--resume)
    ( $MAETOK diffusion train --tokenizer "$(tok_ckpt "$t")" --cifar "$CIFAR" --cache "$CACHE" \
        --preset "$DIT" --steps "$DIT_STEPS" --seed "$s" --out "$run" --no-progress "${resume[@]}" \
      && touch "$run/done" ) > "$OUT/diffusion_${t}_seed$s.log" 2>&1 &
  done; done
  for job in $(jobs -p); do wait "$job" || status=1; done
  return $status
}

# Sampling and evaluation run one process per diffusion model at once: each is small.
phase_sample() {
  local status=0
  for t in $TOKENIZERS; do for s in $SEEDS; do
    local run="$OUT/diffusion/${t}_seed$s"
    ( for g in 1.0 "$GUIDANCE"; do
        [ -f "$run/samples_g$g.npz" ] && continue
        $MAETOK diffusion sample --checkpoint "$run/diffusion.safetensors" --num "$NUM" \
            --sampler "$SAMPLER" --steps "$NFE_STEPS" --guidance "$g" --seed "$s" \
            --out "$run/samples_g$g.npz" --grid "$run/grid_g$g.png" || exit 1
      done ) > "$OUT/sample_${t}_seed$s.log" 2>&1 &
  done; done
  for job in $(jobs -p); do wait "$job" || status=1; done
  return $status
}

phase_eval() {
  local status=0
  for t in $TOKENIZERS; do for s in $SEEDS; do
    local run="$OUT/diffusion/${t}_seed$s"
    ( for g in 1.0 "$GUIDANCE"; do
        [ -f "$run/eval_g$g.json" ] && continue
        $MAETOK diffusion eval --samples "$run/samples_g$g.npz" --cifar "$CIFAR" \
            --cache "$CACHE" --out "$run/eval_g$g.json" || exit 1
      done ) > "$OUT/eval_${t}_seed$s.log" 2>&1 &
  done; done
  for job in $(jobs -p); do wait "$job" || status=1; done
  return $status
}

phase_table() {
  python "$(dirname "$0")/diffusability_table.py" "$OUT" --guidance "$GUIDANCE" | tee "$OUT/table.md"
}

case "$PHASE" in
  all) phase_prepare; phase_classifier & phase_tokenizers; wait; phase_tokmetrics; phase_diffusion; phase_sample
       phase_eval; phase_table ;;
  prepare|classifier|tokenizers|tokmetrics|diffusion|sample|eval|table) "phase_$PHASE" ;;
  *) echo "unknown phase $PHASE (all, prepare, classifier, tokenizers, tokmetrics, diffusion, sample, eval, table)"; exit 2 ;;
esac
