#!/usr/bin/env bash
# Fine-tune the embedded MiniLM teacher on five GLUE tasks, one after another (docs/RESULTS.md §4).
# Each run lands in outputs/finetune/<date>_<time>/ with metrics.json. Extra arguments are passed
# to every run, e.g.  bash benchmarks/finetune_teachers.sh trainer=gpu
set -euo pipefail
cd "$(dirname "$0")/.."
extra=("$@")
runs=("task=cola" "task=mrpc" "task=stsb" "task=rte stage.epochs=4" "task=sst2 stage.epochs=1")
for r in "${runs[@]}"; do
  read -r -a args <<< "$r"
  echo "=== ${args[*]} $(date -u +%H:%M:%S)"
  .venv/bin/tdlight stage=finetune "${args[@]}" trainer.enable_progress_bar=false "${extra[@]}"
done
