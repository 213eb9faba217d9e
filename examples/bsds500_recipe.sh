#!/usr/bin/env bash
# A realistic small run on one GPU: Stage 1 on random 256² crops of BSDS500/train with the
# `seed` preset, Stage 2 from its checkpoint with mask annealing, then `maetok eval` on
# BSDS500/val against the equal-size thumbnail baseline.
#
#   DATA=../shared/data/bsds500 OUT=runs/bsds500 bash examples/bsds500_recipe.sh [variant]
#
# variant: full (default: Stage 1 + Stage 2, and the Stage-1 checkpoint evaluated too),
# plain_ae (mask ratio 0, no auxiliary decoders, S1 + S2 steps in one stage: the same step
# budget), gan (Stage 1 + Stage 2 with the adversarial loss on), all (the three at once on
# the same GPU — the `seed` model fills about 6 % of an H100/H200 alone — then the table of
# examples/quality_table.py).
#
# tuned: Stage 1 + Stage 2 with r ~ U[0, 0.6] in Stage 1 and γ = 0.1 for every auxiliary
# target, the settings that close the gap to the plain autoencoder on the CPU proxy
# (examples/cpu_proxy.py); see the README's Quality section.
#
# The decoders get learnable absolute query positions (model.query_pos): at this budget they
# converge faster than with RoPE alone (see the README's Quality section).
set -euo pipefail
DATA=${DATA:-../shared/data/bsds500}
OUT=${OUT:-runs/bsds500}
VARIANT=${1:-full}
S1=${S1_STEPS:-1100}      # Stage-1 steps
S2=${S2_STEPS:-1200}      # Stage-2 steps (mask ratio annealed 0.6 → 0 over the first 3/4)
BATCH=${BATCH:-64}
LR1=${LR1:-2e-3}
LR2=${LR2:-2e-3}
HERE=$(cd "$(dirname "$0")" && pwd)

if [ "$VARIANT" = all ]; then
  mkdir -p "$OUT"
  for v in full plain_ae gan; do
    bash "$0" "$v" > "$OUT/$v.log" 2>&1 &
  done
  status=0
  for job in $(jobs -p); do wait "$job" || status=1; done
  python "$HERE/quality_table.py" "$OUT" | tee "$OUT/table.md"
  exit $status
fi

COMMON=(--preset seed --data "$DATA/train" --batch-size "$BATCH" --dtype bfloat16 --no-progress
        --overwrite --set model.attention=fused --set model.query_pos=true --set train.log_every=50
        --set train.ckpt_every=100000 --set train.sample_every=500 --set train.ema_decay=0)
EXTRA=()
case "$VARIANT" in
  full|stage1) ;;
  plain_ae) EXTRA=(--set train.mask_min=0 --set train.mask_max=0 --set 'model.aux_targets=[]') ;;
  gan) EXTRA=(--set loss.use_adv=true --set loss.disc_start=$((S1 / 3)) --set loss.adaptive_weight=true) ;;
  tuned) EXTRA=(--set train.mask_min=0 --set 'loss.gamma={"hog": 0.1, "conv": 0.1, "pixel": 0.1}') ;;
  *) echo "unknown variant $VARIANT (full, stage1, plain_ae, gan, tuned, all)"; exit 2 ;;
esac
RUN="$OUT/$VARIANT"
evaluate() { maetok eval --checkpoint "$1/checkpoint.safetensors" --data "$DATA/val" --batch-size 50 \
                     --mask-ratios 0.02,0.1,0.5 --out "$1/eval"; }

STEPS1=$S1
[ "$VARIANT" = plain_ae ] && STEPS1=$((S1 + S2))
maetok train "${COMMON[@]}" "${EXTRA[@]}" --steps "$STEPS1" --lr "$LR1" \
    --set train.warmup_steps=100 --out "$RUN/stage1"
evaluate "$RUN/stage1"
if [ "$VARIANT" != stage1 ] && [ "$VARIANT" != plain_ae ]; then
  maetok train "${COMMON[@]}" "${EXTRA[@]}" --stage 2 --steps "$S2" --lr "$LR2" \
      --set train.warmup_steps=50 --set train.anneal_steps=$((S2 * 3 / 4)) \
      --set loss.disc_start=0 \
      --init-from "$RUN/stage1/checkpoint.safetensors" --out "$RUN/stage2"
  evaluate "$RUN/stage2"
fi
