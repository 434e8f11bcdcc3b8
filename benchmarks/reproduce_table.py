"""The reproduction table (docs/RESULTS.md §5) from the runs of ``benchmarks/reproduce.sh``.

    python benchmarks/reproduce_table.py [--out outputs/repro] [--batch 32 --length 128 --reps 10]

Reads every run's ``metrics.json`` under ``--out``; missing runs show as ``–``. Prints two
Markdown tables: dev scores per task (teacher; per ratio decomposition alone, distillation
alone, pretraining + distillation) with the GLUE average and its share of the teacher's, and
per ratio the encoder parameters, measured speed-up of a forward pass (paired timing,
``tdlight.model.speed``) and the training budget each student saw (and where its task head
started: ``stage.head``).
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch

from tdlight.data.glue import get_task
from tdlight.model.speed import paired_speedup, random_inputs
from tdlight.model.teacher import load_classifier

TASKS = ("sst2", "mrpc", "rte", "cola", "stsb")
COLUMNS = (("dec", "decomposed"), ("dist", "distilled"), ("pt", "pretrained + distilled"))


def _load(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.is_file() else None


def _fmt(x: float | None) -> str:
    return "–" if x is None else f"{x:.4f}"


def collect(out: Path, ratios: list[str]) -> dict:
    runs: dict = {}
    for t in TASKS:
        runs[t] = {"teacher": _load(out / "finetune" / t / "metrics.json")}
        for r in ratios:
            c = f"paper_1_{r}"
            runs[t][(r, "dec")] = _load(out / "evaluate" / f"{c}-{t}" / "metrics.json")
            runs[t][(r, "dist")] = _load(out / "distill" / f"{c}-{t}-dist" / "metrics.json")
            runs[t][(r, "pt")] = _load(out / "distill" / f"{c}-{t}-pt" / "metrics.json")
    return runs


def score_table(runs: dict, ratios: list[str]) -> str:
    cols = [("teacher",)] + [(r, k) for r in ratios for k, _ in COLUMNS]
    head = ["task (metric)", "teacher"] + [f"1/{r} {name}" for r in ratios for _, name in COLUMNS]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    per_col: dict = {c: [] for c in cols}
    for t in TASKS:
        row = []
        for c in cols:
            m = runs[t]["teacher" if c == ("teacher",) else c]
            s = None if m is None else m["score"]
            per_col[c].append(s)
            row.append(_fmt(s))
        metric = "/".join(get_task(t).metrics)
        lines.append(f"| {t} ({metric}) | " + " | ".join(row) + " |")
    teacher = per_col[("teacher",)]
    avg, share = [], []
    for c in cols:
        pairs = [(s, ts) for s, ts in zip(per_col[c], teacher) if s is not None and ts is not None]
        complete = len(pairs) == len(TASKS)
        a = statistics.mean(s for s, _ in pairs) if pairs else None
        avg.append(_fmt(a) + ("" if complete or a is None else f" ({len(pairs)} tasks)"))
        # share of the teacher's average over the same tasks
        share.append("–" if not pairs else f"{100 * a / statistics.mean(ts for _, ts in pairs):.1f}%")
    lines.append("| **average** | " + " | ".join(avg) + " |")
    lines.append("| **% of teacher** | " + " | ".join(share) + " |")
    return "\n".join(lines)


def budget_table(out: Path, runs: dict, ratios: list[str], batch: int, length: int, reps: int) -> str:
    lines = ["| ratio preset | encoder params | encoder ratio | speed-up (measured) | pretraining tokens | "
             "distillation (examples × epochs), student head |", "|---|---|---|---|---|---|"]
    teacher_dir = next((out / "finetune" / t / "model" for t in TASKS if (out / "finetune" / t / "model").is_dir()), None)
    for r in ratios:
        c = f"paper_1_{r}"
        dec = _load(out / "decompose" / c / "metrics.json") or _load(out / "decompose" / c / "report.json")  # (its name before 2026-12)
        pt = _load(out / "pretrain" / c / "metrics.json")
        dist = next((runs[t][(r, k)] for k in ("pt", "dist") for t in TASKS if runs[t][(r, k)]), None)
        params = ratio = speed = None
        student_dir = out / "decompose" / c / "model"
        if dec:
            params, ratio = dec["parameters_after"]["encoder"], dec["ratio"]
        if teacher_dir is not None and student_dir.is_dir():
            teacher, _ = load_classifier(str(teacher_dir), 2)
            student, _ = load_classifier(str(student_dir), 2)
            inputs = random_inputs(batch, length, teacher.config.vocab_size)
            speed = paired_speedup(teacher, student, inputs, reps=reps)["speedup"]
        budget = "–"
        if dist:
            n = dist.get("train_examples")
            budget = f"{n if n is not None else '?'} × ({dist['intermediate_epochs']} + {dist['prediction_epochs']})"
            # runs from before stage.head existed started from a new head
            budget += f", head: {dist.get('head', 'student')}"
        lines.append(f"| `compression={c}` | {params:,} | {ratio:.2f}× | "
                     f"{'–' if speed is None else f'{speed:.2f}×'} | {'–' if not pt else format(pt['tokens'], ',')} | {budget} |"
                     if params is not None else f"| `compression={c}` | – | – | – | – | – |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="outputs/repro")
    ap.add_argument("--ratios", default="7,48")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--length", type=int, default=128)
    ap.add_argument("--reps", type=int, default=10)
    a = ap.parse_args()
    torch.set_grad_enabled(False)
    out, ratios = Path(a.out), a.ratios.split(",")
    runs = collect(out, ratios)
    print(score_table(runs, ratios))
    print()
    print(budget_table(out, runs, ratios, a.batch, a.length, a.reps))


if __name__ == "__main__":
    main()
