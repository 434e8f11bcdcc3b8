#!/usr/bin/env bash
# The reproduction grid of docs/RESULTS.md §5: the MiniLM teacher fine-tuned on five GLUE tasks,
# then students at the paper's encoder ratios 7 (compression=paper_1_7) and 48 (paper_1_48):
#   dec   decomposition of the fine-tuned teacher alone, evaluated as is
#   dist  decompose the pretrained teacher -> task distillation          (experiment=no_pretrain)
#   pt    decompose -> reconstruction pretraining -> task distillation  (experiment=paper_1_*)
# Every run has a fixed directory under $OUT (default outputs/repro); a run whose result file
# exists is skipped, so rerunning the script continues where it stopped.  Budgets are knobs
# (the defaults take several hours on a 2-core CPU; docs/RESULTS.md §5 lists the budgets it ran
# with); a GPU user runs the full schedule with
#   PRETRAIN_STEPS=100000 PRETRAIN_BATCH=256 LIMIT_TRAIN=null INTERMEDIATE_EPOCHS=10 \
#   PREDICTION_EPOCHS=3 bash benchmarks/reproduce.sh trainer=gpu
# and prints the table with  python benchmarks/reproduce_table.py
# On a 2-core CPU two single-threaded copies, one per ratio, finish sooner than one 2-thread run:
#   export OMP_NUM_THREADS=1 TABLE=0; RATIOS=48 bash benchmarks/reproduce.sh & RATIOS=7 bash benchmarks/reproduce.sh
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-outputs/repro}
TASKS=${TASKS:-"rte mrpc stsb cola sst2"}
RATIOS=${RATIOS:-"48 7"}
PRETRAIN_STEPS=${PRETRAIN_STEPS:-500}
PRETRAIN_BATCH=${PRETRAIN_BATCH:-32}
LIMIT_TRAIN=${LIMIT_TRAIN:-2000}          # training examples per task for distillation (null: all)
INTERMEDIATE_EPOCHS=${INTERMEDIATE_EPOCHS:-1}
PREDICTION_EPOCHS=${PREDICTION_EPOCHS:-2}
TEACHER_EPOCHS=${TEACHER_EPOCHS:-}         # teacher fine-tuning epochs (empty: each task's own, RTE 4)
SST2_LIMIT=${SST2_LIMIT:-20000}            # SST-2 teacher: one epoch on this many examples
extra=("$@")
td() {  # td <run dir> <overrides...>: run a stage in <run dir>, or resume it if it stopped mid-way
  local dir=$1 lock; shift
  # one writer per run directory: two copies of this script (e.g. RATIOS=48 and RATIOS=7 side by
  # side) wait for each other's shared runs (the teachers) instead of both computing them
  local lockfile=$OUT/.locks/${dir#"$OUT"/}.lock
  mkdir -p "$(dirname "$dir")" "$(dirname "$lockfile")"
  exec {lock}>"$lockfile"; flock "$lock"
  if [[ -f $dir/metrics.json || -f $dir/report.json ]]; then :   # the other copy finished it meanwhile
  elif [[ -f $dir/checkpoints/last.ckpt ]]; then .venv/bin/tdlight resume="$dir"
  else
    rm -rf "$dir"   # a run that died before its first checkpoint starts over
    .venv/bin/tdlight paths.output_dir="$OUT" trainer.enable_progress_bar=false "${extra[@]}" "$@" hydra.run.dir="$dir"
  fi
  exec {lock}>&-
}
stamp() { echo "=== $* $(date -u +%H:%M:%S)"; }

distill() {  # distill <task> <student run> <name>
  [[ -f $OUT/distill/$3/metrics.json ]] && return 0
  stamp distill "$3"
  td "$OUT/distill/$3" stage=distill task="$1" teacher.run_dir="$OUT/finetune/$1" stage.student="$2" \
     stage.limit_train="$LIMIT_TRAIN" stage.intermediate_epochs="$INTERMEDIATE_EPOCHS" \
     stage.prediction_epochs="$PREDICTION_EPOCHS"
}

# Task by task, so that a stopped grid leaves whole rows of the table.
for t in $TASKS; do
  # 1. the teacher (RTE 4 epochs, SST-2 one epoch on SST2_LIMIT examples; others their task's default)
  if [[ ! -f $OUT/finetune/$t/metrics.json ]]; then
    case $t in rte) e=(stage.epochs=4);; sst2) e=(stage.epochs=1 stage.limit_train="$SST2_LIMIT");; *) e=();; esac
    [[ -n $TEACHER_EPOCHS && $t != sst2 ]] && e=(stage.epochs="$TEACHER_EPOCHS")
    stamp finetune "$t"; td "$OUT/finetune/$t" stage=finetune task="$t" "${e[@]}"
  fi
  for r in $RATIOS; do
    c=paper_1_$r
    # 2. decomposition alone: the fine-tuned teacher decomposed, evaluated without training
    d=$OUT/decompose/$c-$t
    [[ -f $d/metrics.json || -f $d/report.json ]] || { stamp decompose "$c $t"; td "$d" stage=decompose compression="$c" teacher.run_dir="$OUT/finetune/$t"; }
    [[ -f $OUT/evaluate/$c-$t/metrics.json ]] || { stamp evaluate "$c $t"; td "$OUT/evaluate/$c-$t" stage=evaluate task="$t" stage.model="$d"; }
    # 3. task distillation alone: the student decomposed from the pretrained teacher (shared by all tasks)
    [[ -f $OUT/decompose/$c/metrics.json || -f $OUT/decompose/$c/report.json ]] || { stamp decompose "$c"; td "$OUT/decompose/$c" stage=decompose compression="$c"; }
    distill "$t" "$OUT/decompose/$c" "$c-$t-dist"
    # 4. reconstruction pretraining (once per ratio), then task distillation from the pretrained student
    p=$OUT/pretrain/$c
    [[ -f $p/metrics.json ]] || { stamp pretrain "$c"; td "$p" stage=pretrain stage.student="$OUT/decompose/$c" \
        stage.max_steps="$PRETRAIN_STEPS" stage.batch_size="$PRETRAIN_BATCH"; }
    distill "$t" "$p" "$c-$t-pt"
  done
done
stamp done
# the table times teacher vs students: TABLE=0 skips it (e.g. while another copy still trains)
[[ ${TABLE:-1} == 0 ]] || .venv/bin/python benchmarks/reproduce_table.py --out "$OUT"
