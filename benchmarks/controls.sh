#!/usr/bin/env bash
# The controls of docs/RESULTS.md §7: is a bad student the student's fault or the recipe's?
# One teacher (mean pooling, 2,000 SST-2 examples, 1 epoch), then students distilled on the same
# 2,000 examples for 63 steps (one epoch), each beside the simplest thing that should work at the
# same budget:
#   exact   full-rank decomposition (ratio ~1): distillation must reach ~ the teacher
#   r256    rank 256, bank 72 (ratio 2.15), HOOI: soft targets vs gold labels, same steps
#   r7      compression=paper_1_7, HOOI vs stage.fit=outputs, soft targets vs gold labels,
#           a new head (the default) vs a copy of the teacher's
#   r48     compression=paper_1_48, HOOI vs stage.fit=outputs
#   untrained  the fine-tuned teacher itself decomposed (HOOI vs stage.fit=outputs) at ratios ~2, ~7,
#           ~48 and evaluated with no training at all: what the decomposition alone keeps
#   seeds   r256 soft targets vs gold labels again with seeds 1 and 2 (how much of a gap is noise)
# Every run has a fixed directory under $OUT (default outputs/controls); finished runs are skipped.
# One thread each; two copies can run side by side (different SETS). Prints the table at the end.
#   bash benchmarks/controls.sh                # all sets
#   SETS="r7" bash benchmarks/controls.sh
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 WANDB_MODE=offline
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
OUT=${OUT:-outputs/controls}
SETS=${SETS:-"exact r256 r7 r48 untrained seeds"}
LIMIT=${LIMIT:-2000}
CACHE=${CACHE:-$OUT/cache}   # decompositions and tokenized splits (share one with a pipeline to reuse its work)
common=(logger=csv trainer.enable_progress_bar=false "paths.output_dir=$OUT" "paths.cache_dir=$CACHE")
td() {  # td <run dir> <overrides...>: run once (skipped when its result exists)
  local dir=$1; shift
  [[ -f $dir/metrics.json || -f $dir/report.json ]] && return 0
  rm -rf "$dir"
  .venv/bin/tdlight "${common[@]}" "$@" hydra.run.dir="$dir" > "$dir.log" 2>&1
}
mkdir -p "$OUT"
td "$OUT/teacher" stage=finetune task=sst2 stage.limit_train="$LIMIT" stage.epochs=1 stage.lr=1e-4
distill() {  # distill <name> <student run> <overrides...>: one epoch of the prediction layer
  local name=$1 student=$2; shift 2
  td "$OUT/$name" stage=distill task=sst2 teacher.run_dir="$OUT/teacher" stage.student="$OUT/$student" \
    stage.limit_train="$LIMIT" stage.intermediate_epochs=0 stage.prediction_epochs=1 stage.lr=1e-4 "$@"
}
rows=()
for set in $SETS; do
  case $set in
    exact)
      td "$OUT/dec-exact" stage=decompose compression.rank=384 compression.bank=72
      distill exact-kl dec-exact
      rows+=("exact, soft targets=$OUT/exact-kl") ;;
    r256)
      td "$OUT/dec-r256" stage=decompose compression.rank=256 compression.bank=72
      distill r256-kl dec-r256
      distill r256-gold dec-r256 stage.gold_weight=1
      distill r256-kl-teacherhead dec-r256 stage.head=teacher
      rows+=("r256 HOOI, soft targets=$OUT/r256-kl" "r256 HOOI, gold labels=$OUT/r256-gold"
             "r256 HOOI, soft targets, teacher's head=$OUT/r256-kl-teacherhead") ;;
    untrained)
      for c in r256 paper_1_7 paper_1_48; do
        if [[ $c == r256 ]]; then spec=(compression.rank=256 compression.bank=72); else spec=(compression=$c); fi
        for fit in weights outputs; do
          td "$OUT/dect-$c-$fit" stage=decompose teacher.run_dir="$OUT/teacher" "${spec[@]}" stage.fit=$fit
          td "$OUT/untrained-$c-$fit" stage=evaluate task=sst2 stage.model="$OUT/dect-$c-$fit/model"
          rows+=("$c fit=$fit, no training=$OUT/untrained-$c-$fit")
        done
      done ;;
    seeds)
      td "$OUT/dec-r256" stage=decompose compression.rank=256 compression.bank=72
      for s in 1 2; do
        distill r256-kl-seed$s dec-r256 seed=$s
        distill r256-gold-seed$s dec-r256 stage.gold_weight=1 seed=$s
        rows+=("r256 HOOI, soft targets, seed $s=$OUT/r256-kl-seed$s" "r256 HOOI, gold labels, seed $s=$OUT/r256-gold-seed$s")
      done ;;
    r7|r48)
      c=paper_1_${set#r}
      td "$OUT/dec-$set" stage=decompose compression=$c
      td "$OUT/dec-$set-out" stage=decompose compression=$c stage.fit=outputs
      distill $set-kl dec-$set
      distill $set-out-kl dec-$set-out
      distill $set-out-gold dec-$set-out stage.gold_weight=1
      distill $set-out-kl-teacherhead dec-$set-out stage.head=teacher
      rows+=("$c HOOI, soft targets=$OUT/$set-kl" "$c fit=outputs, soft targets=$OUT/$set-out-kl"
             "$c fit=outputs, gold labels=$OUT/$set-out-gold"
             "$c fit=outputs, soft targets, teacher's head=$OUT/$set-out-kl-teacherhead") ;;
    *) echo "unknown set $set (valid: exact r256 r7 r48 untrained seeds)" >&2; exit 2 ;;
  esac
done
.venv/bin/python benchmarks/students.py --teacher "$OUT/teacher" "${rows[@]}"
