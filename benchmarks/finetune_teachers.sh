#!/usr/bin/env bash
# Fine-tune the embedded MiniLM teacher on the local GLUE tasks with each task's own recipe
# (conf/task/<task>.yaml: lr, epochs, warm-up, early stopping), one after another, then print the
# teachers against the published numbers for their size (benchmarks/teachers.py; docs/RESULTS.md §12).
# Each run lands in $OUT/<task> (default outputs/teachers); a finished run is skipped.
#   bash benchmarks/finetune_teachers.sh                      # cola mrpc stsb rte sst2
#   TASKS="mrpc cola" bash benchmarks/finetune_teachers.sh stage.limit_train=8000
#   OUT=outputs/teachers-mpnet bash benchmarks/finetune_teachers.sh teacher=mpnet   # the 110M teacher, same recipes
# Extra arguments are passed to every run (e.g. trainer=gpu).
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 WANDB_MODE=offline
OUT=${OUT:-outputs/teachers}
TASKS=${TASKS:-"cola mrpc stsb rte sst2"}
mkdir -p "$OUT"
for t in $TASKS; do
  dir=$OUT/$t
  if [[ -f $dir/metrics.json ]]; then echo "=== $t: done ($dir)"; continue; fi
  rm -rf "$dir"
  echo "=== $t $(date -u +%H:%M:%S)"
  .venv/bin/tdlight stage=finetune task="$t" logger=csv trainer.enable_progress_bar=false \
    "paths.output_dir=$OUT" hydra.run.dir="$dir" "$@" > "$dir.log" 2>&1 || { echo "$t failed: $dir.log"; tail -5 "$dir.log"; }
done
.venv/bin/python benchmarks/teachers.py "$OUT"
