"""The grid's tables (docs/RESULTS.md §5b) from the runs of ``benchmarks/reproduce.sh``.

    python benchmarks/reproduce_table.py [--out outputs/repro] [--ratios 7,48]

Reads the pipelines' ``pipeline.json`` (columns ``nopt``, ``dist``, ``gold`` and ``peer``) and the untrained
students' ``evaluate/metrics.json`` (column ``dec``) under ``--out/grid``; missing runs show
as ``–``. Prints three Markdown tables: dev scores per task (teacher, majority-class baseline,
per ratio decomposition alone / the preset without its pretraining step / the preset / the same
student fine-tuned on gold labels instead of distilled / its peer at
equal size, the teacher cut to the nearest depth and trained with the same budget, each
with its share of the teacher's score), with the GLUE average; the share of the most frequent dev prediction
of every classifier (a constant student is marked); their balanced accuracies; and per ratio the encoder parameters, the
encoder and whole-model ratios, the bytes on disk of teacher and shipped student, the measured speed-up (the pipeline's paired timing of a dev batch), pretraining tokens and the
distillation budget, for the preset's student and for its peer.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from tdlight.data.glue import get_task

TASKS = ("sst2", "mrpc", "rte", "cola", "stsb")
COLUMNS = (("dec", "decomposed"), ("nopt", "distilled, no pretraining"), ("dist", "preset"),
           ("gold", "gold labels (same student)"), ("peer", "layer cut (peer)"))
PIPELINES = ("dist", "nopt", "gold", "peer")  # the columns that are pipelines (dec is an evaluate run)


def _load(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.is_file() else None


def _fmt(x: float | None) -> str:
    return "–" if x is None else f"{x:.4f}"


def collect(out: Path, ratios: list[str]) -> dict:
    """``runs[task][(ratio, column)]``: {score, top_share, constant} (and the pipeline summary, if any)."""
    runs: dict = {}
    for t in TASKS:
        runs[t] = {}
        for r in ratios:
            for col in PIPELINES:
                p = _load(out / "grid" / col / f"cpu_{r}-{t}" / "pipeline.json")
                if p:
                    runs[t].setdefault("teacher", {"score": p["teacher_score"], "top_share": p["teacher_top_share"],
                                                    "majority": p["majority_score"],
                                                    "balanced": p.get("teacher_balanced_accuracy")})
                    runs[t][(r, col)] = {"score": p["student_score"], "top_share": p["student_top_share"],
                                         "constant": p["student_constant"], "pipeline": p,
                                         "balanced": p.get("student_balanced_accuracy")}
            ev = _load(out / "grid" / "dec" / f"cpu_{r}-{t}" / "evaluate" / "metrics.json")
            if ev:
                runs[t][(r, "dec")] = {"score": ev["score"], "top_share": ev["dev"].get("top_share"),
                                       "constant": ev["constant_predictions"],
                                       "balanced": ev["dev"].get("balanced_accuracy")}
    return runs


def _cols(ratios: list[str]) -> list[tuple[str, str]]:
    return [(r, k) for r in ratios for k, _ in COLUMNS]


def score_table(runs: dict, ratios: list[str]) -> str:
    head = ["task (metric)", "teacher", "majority"] + [f"1/{r} {name}" for r in ratios for _, name in COLUMNS]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    per_col: dict = {c: [] for c in [("teacher",), *_cols(ratios)]}
    for t in TASKS:
        teacher = runs[t].get("teacher")
        ts = teacher and teacher["score"]
        regression = get_task(t).num_labels == 1  # (a constant predictor's correlation: no baseline to show)
        row = [_fmt(ts), _fmt(None if regression else teacher and teacher["majority"])]
        per_col[("teacher",)].append(ts)
        for c in _cols(ratios):
            s = runs[t].get(c, {}).get("score")
            per_col[c].append(s)
            row.append(_fmt(s) + ("" if s is None or not ts else f" ({100 * s / ts:.0f}%)"))
        lines.append(f"| {t} ({'/'.join(get_task(t).metrics)}) | " + " | ".join(row) + " |")
    teacher = per_col[("teacher",)]
    avg, share = [], []
    for c in [("teacher",), *_cols(ratios)]:
        pairs = [(s, ts) for s, ts in zip(per_col[c], teacher) if s is not None and ts is not None]
        a = statistics.mean(s for s, _ in pairs) if pairs else None
        avg.append(_fmt(a) + ("" if len(pairs) == len(TASKS) or a is None else f" ({len(pairs)} tasks)"))
        # share of the teacher's average over the same tasks
        share.append("–" if not pairs else f"{100 * a / statistics.mean(ts for _, ts in pairs):.1f}%")
        if c == ("teacher",):
            avg.append("")
            share.append("")
    lines.append("| **average** | " + " | ".join(avg) + " |")
    lines.append("| **% of teacher** | " + " | ".join(share) + " |")
    return "\n".join(lines)


def share_table(runs: dict, ratios: list[str]) -> str:
    head = ["task", "teacher"] + [f"1/{r} {name}" for r in ratios for _, name in COLUMNS]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for t in TASKS:
        if get_task(t).num_labels == 1:
            continue  # a regression has no most frequent prediction
        teacher = runs[t].get("teacher")
        row = ["–" if not teacher or teacher["top_share"] is None else f"{teacher['top_share']:.3f}"]
        for c in _cols(ratios):
            m = runs[t].get(c)
            row.append("–" if not m or m["top_share"] is None
                       else f"{m['top_share']:.3f}" + (" **constant**" if m["constant"] else ""))
        lines.append(f"| {t} | " + " | ".join(row) + " |")
    return "\n".join(lines)


def balanced_table(runs: dict, ratios: list[str]) -> str:
    """The balanced accuracy (mean class recall: 0.5 for any constant binary classifier) of every
    classifier, with its share of the teacher's — the reading a skewed dev set (MRPC, CoLA) needs."""
    head = ["task", "teacher"] + [f"1/{r} {name}" for r in ratios for _, name in COLUMNS]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for t in TASKS:
        if get_task(t).num_labels == 1:
            continue
        teacher = (runs[t].get("teacher") or {}).get("balanced")
        row = [_fmt(teacher)]
        for c in _cols(ratios):
            b = (runs[t].get(c) or {}).get("balanced")
            row.append(_fmt(b) + ("" if b is None or not teacher else f" ({100 * b / teacher:.0f}%)"))
        lines.append(f"| {t} | " + " | ".join(row) + " |")
    return "\n".join(lines)


def budget_table(out: Path, runs: dict, ratios: list[str]) -> str:
    lines = ["| preset | encoder params | encoder ratio | whole-model ratio | MB on disk (teacher → student) | "
             "speed-up (measured) | pretraining tokens | distillation (examples × epochs) |",
             "|---|---|---|---|---|---|---|---|"]
    for r in ratios:
        for col in ("dist", "peer"):
            dist = next((runs[t][(r, col)]["pipeline"] for t in TASKS if (r, col) in runs[t]), None)
            name = f"`experiment=cpu_{r}`"
            if col == "peer":
                if dist is None:
                    continue  # (PEER=0, or not run yet)
                name += f" peer: the teacher cut to {dist.get('student_layers', '?')} layer(s), not compressed"
            if dist is None:
                lines.append(f"| {name} | – | – | – | – | – | – | – |")
                continue
            # what the user takes home (pipelines from before it was recorded show –)
            whole = f"{dist['model_ratio']:.2f}×" if dist.get("model_ratio") else "–"
            size = (f"{dist['teacher_bytes'] / 1e6:.1f} → {dist['student_bytes'] / 1e6:.1f} "
                    f"({dist.get('student_precision', 'fp32')})" if dist.get("student_bytes") else "–")
            budgets = []
            for t in TASKS:
                p = runs[t].get((r, col))
                d = p and _load(Path(p["pipeline"]["steps"]["distill"]) / "metrics.json")
                if d:
                    budgets.append(f"{t} {d.get('train_examples', '?')} × ({d['intermediate_epochs']} + "
                                   f"{d['prediction_epochs']})" + (", embeddings trained" if d.get("train_embeddings")
                                                                   else ""))
            speed = statistics.median(runs[t][(r, col)]["pipeline"]["speedup"] for t in TASKS if (r, col) in runs[t])
            ratio = "no encoder layer" if dist["ratio"] is None else f"{dist['ratio']:.2f}×"  # (a cut to none)
            lines.append(f"| {name} | {dist['student_encoder_params']:,} | {ratio} | {whole} "
                         f"| {size} | {speed:.2f}× "
                         f"| {'–' if not dist.get('pretrain_tokens') else format(dist['pretrain_tokens'], ',')} "
                         f"| {'; '.join(budgets)} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="outputs/repro")
    ap.add_argument("--ratios", default="7,48")
    a = ap.parse_args()
    out, ratios = Path(a.out), a.ratios.split(",")
    runs = collect(out, ratios)
    print(score_table(runs, ratios))
    print()
    print(share_table(runs, ratios))
    print()
    print(balanced_table(runs, ratios))
    print()
    print(budget_table(out, runs, ratios))


if __name__ == "__main__":
    main()
