"""The fine-tuned teachers against the GLUE dev numbers published for encoders of their size.

    python benchmarks/teachers.py outputs/teachers            # every <task>/metrics.json under it
    python benchmarks/teachers.py outputs/teachers/mrpc ...   # or named finetune run directories

``bash benchmarks/finetune_teachers.sh`` makes the runs (each task's own recipe, ``conf/task/*.yaml``).
A teacher is the ceiling of every student distilled from it, so each row is read against the
published numbers for its size, the dev set's majority class, and the share of its most frequent
prediction (a teacher that mostly predicts one class teaches a constant student). Issue 28's targets
(docs/RESULTS.md): SST-2 and MRPC within 3 points of MiniLM-L6-H384's published score, STS-B ≥ 0.86,
CoLA MCC ≥ 0.35, RTE ≥ 0.62, and no top share more than 0.10 above gold's majority share.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

# GLUE dev, ×0.01 (as quoted in issue 28): MiniLM-L6-H384 (Wang et al. 2020) and DistilBERT (Sanh et
# al. 2019, 6 layers, D = 768). The papers give one number for MRPC (accuracy or F1); the table shows our
# F1 and accuracy and judges the target on the GLUE score, their mean.
PUBLISHED = {
    "sst2": {"minilm": 0.915, "distilbert": 0.913},
    "mrpc": {"minilm": 0.889, "distilbert": 0.875},
    "stsb": {"distilbert": 0.869},
    "rte": {"minilm": 0.688, "distilbert": 0.599},
    "cola": {"minilm": 0.475, "distilbert": 0.513},
}
# issue 28's floors where it sets one instead of "within 3 points of MiniLM's"
FLOORS = {"stsb": 0.86, "cola": 0.35, "rte": 0.62}
SHARE_MARGIN = 0.10


def _fmt(x, spec: str = ".4f") -> str:
    return "–" if x is None else format(x, spec)


def target(task: str) -> float | None:
    if task in FLOORS:
        return FLOORS[task]
    pub = PUBLISHED.get(task, {}).get("minilm")
    return None if pub is None else pub - 0.03


def row(m: dict) -> list[str]:
    task, dev = m["task"], m["dev"]
    ours = m["score"]
    goal = target(task)
    share, gold = dev.get("top_share"), dev.get("majority_share")
    skewed = share is not None and gold is not None and share > gold + SHARE_MARGIN
    met = None if goal is None else (ours >= goal and not skewed)
    pub = PUBLISHED.get(task, {})
    minutes = sum(m.get("epoch_seconds") or []) / 60
    teacher = Path(str(m.get("teacher", "–"))).name  # a name (minilm, mpnet) or a directory's
    return [task, teacher, f"{m['lr']:g}", f"{m.get('epochs_run', m['epochs'])}/{m['epochs']}", _fmt(m.get("patience"), "d"),
            _fmt(m["score"]) + (f" ({dev['f1']:.3f} / {dev['accuracy']:.3f})" if "f1" in dev else ""),
            _fmt(pub.get("minilm"), ".3f"), _fmt(pub.get("distilbert"), ".3f"),
            _fmt(goal, ".3f"), _fmt(dev.get("majority_score")), _fmt(gold, ".3f"),
            _fmt(share, ".3f") + (" **skewed**" if skewed else ""), _fmt(dev.get("balanced_accuracy")),
            f"{minutes:.1f}", "–" if met is None else ("✓" if met else "✗")]


HEAD = ["task", "teacher", "lr", "epochs run", "patience", "GLUE score (F1 / acc)", "MiniLM-L6 published",
        "DistilBERT published", "target", "majority score", "gold majority share", "top share",
        "balanced accuracy", "train min", "met"]


def table(runs: list[dict]) -> str:
    lines = ["| " + " | ".join(HEAD) + " |", "|" + "---|" * len(HEAD)]
    lines += ["| " + " | ".join(row(m)) + " |" for m in runs]
    return "\n".join(lines)


def load(paths: list[Path]) -> list[dict]:
    runs = []
    for p in paths:
        files = [p / "metrics.json"] if (p / "metrics.json").is_file() else sorted(p.glob("*/metrics.json"))
        for f in files:
            m = json.loads(f.read_text())
            if m.get("stage") == "finetune":
                runs.append(m)
    return runs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("runs", nargs="+", type=Path, help="finetune run directories, or directories holding them")
    a = ap.parse_args()
    runs = load(a.runs)
    if not runs:
        raise SystemExit(f"no finished finetune run (metrics.json with stage finetune) in {[str(p) for p in a.runs]}")
    print(table(runs))
    print("\n'train min': the epochs' training time; 'met': issue 28's target for the task, on the GLUE score, "
          f"and top share ≤ gold's majority + {SHARE_MARGIN:.2f}.")


if __name__ == "__main__":
    main()
