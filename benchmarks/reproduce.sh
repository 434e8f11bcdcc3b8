#!/usr/bin/env bash
# The grid of docs/RESULTS.md §5b with the recipe of §7: for each task, the CPU presets
# experiment=cpu_7 (compression=paper_1_7) and experiment=cpu_48 (paper_1_48), three columns each:
#   dist  tdlight experiment=cpu_<r> task=<t>: finetune -> decompose -> pretrain -> distill -> evaluate
#   nopt  the same pipeline without its reconstruction-pretraining step (what pretraining adds)
#   dec   the fine-tuned teacher decomposed at the preset's ratio (the preset's own decomposition when
#         it decomposes the fine-tuned teacher, as cpu_7 does; otherwise the output fit on the task's
#         text), evaluated as is with the teacher's head: what the decomposition alone keeps
#   peer  the same pipeline with cut in place of decompose: the teacher cut to the depth whose dense encoder
#         is nearest to the preset's student (the MiniLM: 1 layer at 1/7, none at 1/48, where pretrain has
#         nothing to train and the pipeline skips it), trained with the same budget — is the shared-factor
#         student better than simply cutting layers? PEER=0 leaves the column out. STS-B is read by a
#         bi-encoder (its cosine head has no weight), so its 0-layer peer at 1/48 would have nothing to
#         train with the embeddings frozen as the student's are: it trains them (train_embeddings=true),
#         12 M weights more than the student trains — a generous peer
#   gold  the same pipeline with stage.distill.gold_weight=1: the preset's decomposed, pretrained student
#         fine-tuned on the gold labels instead of the teacher's soft targets, same epochs and lr — what
#         distillation adds over plain fine-tuning of the same student (without the augmented copies a
#         preset adds for some tasks, conf/experiment_task: a copy has no gold label)
# Every pipeline writes its steps under $OUT (default outputs/repro), so the columns and the two ratios
# share what they have in common (the teacher of a task, a decomposition) and a second copy of this
# script waits for a step the first is computing instead of computing it twice. A column whose result
# file exists is skipped, and a stopped step resumes from its last.ckpt: rerunning the script continues
# where it stopped. On a 2-core CPU two single-threaded copies finish sooner than one 2-thread run:
#   export OMP_NUM_THREADS=1 TABLE=0; RATIOS=48 bash benchmarks/reproduce.sh & RATIOS=7 bash benchmarks/reproduce.sh
# then  python benchmarks/reproduce_table.py  prints the tables. Extra arguments are Hydra overrides
# passed to every run (e.g. logger=csv, stage.pretrain.max_steps=1000, or trainer=gpu stage.distill.limit_train=null).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-outputs/repro}
TASKS=${TASKS:-"rte mrpc stsb cola sst2"}
RATIOS=${RATIOS:-"7 48"}
COLUMNS=${COLUMNS:-"dist nopt dec peer gold"}   # in the order they run; a stopped grid leaves whole columns
extra=("$@")
TD=(.venv/bin/tdlight paths.output_dir="$OUT" trainer.enable_progress_bar=false)
stamp() { echo "=== $* $(date -u +%H:%M:%S)"; }
json() { .venv/bin/python -c "import json,sys; print(json.load(open(sys.argv[1]))$2)" "$1"; }

dist() {  # dist <ratio> <task> <column> [pipeline overrides]: the preset end to end, in $OUT/grid/<column>/
  local r=$1 t=$2 dir=$OUT/grid/$3/cpu_$1-$2; shift 3
  [[ -f $dir/pipeline.json ]] && return 0
  stamp "${dir#"$OUT"/grid/}"
  "${TD[@]}" experiment=cpu_"$r" task="$t" "$@" "${extra[@]}" hydra.run.dir="$dir"
}

dec() {  # dec <ratio> <task>: the fine-tuned teacher decomposed, evaluated untrained
  local r=$1 t=$2 dir=$OUT/grid/dec/cpu_$1-$2 p=$OUT/grid/dist/cpu_$1-$2/pipeline.json model
  [[ -f $dir/evaluate/metrics.json ]] && return 0
  [[ -f $p ]] || dist "$r" "$t" dist
  model=$(json "$p" "['steps']['decompose']")
  if [[ $(.venv/bin/python -c "import sys; from omegaconf import OmegaConf as O; print(O.load(sys.argv[1]).teacher.run_dir)" \
          "$model/.hydra/config.yaml") == None ]]; then   # the preset decomposes the pretrained teacher
    model=$dir/decompose
    if [[ ! -f $model/metrics.json ]]; then
      stamp "dec/cpu_$r-$t: decompose"
      "${TD[@]}" stage=decompose task="$t" compression=paper_1_"$r" teacher.run_dir="$(json "$p" "['steps']['finetune']")" \
        stage.fit=outputs stage.calibration_files=task "${extra[@]}" hydra.run.dir="$model"
    fi
  fi
  stamp "dec/cpu_$r-$t: evaluate"
  "${TD[@]}" stage=evaluate task="$t" stage.model="$model" "${extra[@]}" hydra.run.dir="$dir/evaluate"
}

for col in $COLUMNS; do
  for t in $TASKS; do
    for r in $RATIOS; do
      case $col in
        dist) dist "$r" "$t" dist;;
        dec) dec "$r" "$t";;
        nopt) dist "$r" "$t" nopt "stage.steps=[finetune,decompose,distill,evaluate]";;
        peer) [[ ${PEER:-1} == 0 ]] || dist "$r" "$t" peer "stage.steps=[finetune,cut,pretrain,distill,evaluate]" \
                $([[ $t == stsb && $r == 48 ]] && echo stage.distill.train_embeddings=true);;
        gold) dist "$r" "$t" gold stage.distill.gold_weight=1 stage.distill.augment=false;;
        *) echo "unknown column $col (valid: dist nopt dec peer gold)" >&2; exit 2;;
      esac
    done
  done
done
stamp done
[[ ${TABLE:-1} == 0 ]] || .venv/bin/python benchmarks/reproduce_table.py --out "$OUT"
