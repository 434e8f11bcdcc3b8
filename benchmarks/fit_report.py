"""Plain HOOI vs the output fit, read from finished decompose runs (``metrics.json``), with the
untrained student's dev score when an evaluate run of it is given.

    python benchmarks/fit_report.py LABEL=DECOMPOSE_RUN[,EVALUATE_RUN] ...

A run decomposed with ``stage.fit=outputs`` holds both rows (its ``fit`` section has the HOOI
start and the fit, measured on the same held-out text); a plain HOOI run (``stage.fit=weights``)
has only its weight errors, so pair each with the ``fit=outputs`` run of the same spec. Columns:
relative output error of each layer given the teacher's input (L1..), of the last hidden state
(the student's own forward: errors compound), dead blocks, the dev score of the evaluate run.
``benchmarks/controls.sh`` (set ``untrained``) makes the runs.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def report_of(dec: Path) -> Path:
    """A decompose run's report: metrics.json (report.json in runs before 2026-12)."""
    return dec / "metrics.json" if (dec / "metrics.json").is_file() else dec / "report.json"


def rows(label: str, dec: Path, ev: Path | None) -> list[list[str]]:
    r = json.loads(report_of(dec).read_text())
    score = json.loads((ev / "metrics.json").read_text())["score"] if ev and (ev / "metrics.json").is_file() else None
    fit = r.get("fit")
    if not fit:
        return [[label, f"{r['ratio']:.2f}", "HOOI (weights)", "–", "–", str(len(r.get("dead_blocks", []))),
                 "–" if score is None else f"{score:.4f}"]]
    out = []
    for name, part in (("HOOI start", fit["hooi"]), ("fit=outputs", fit["outputs"])):
        out.append([label, f"{r['ratio']:.2f}", name, " ".join(f"{e:.2f}" for e in part["layer_errors"]),
                    f"{part['last_hidden']:.3f}", str(len(part["dead_blocks"])), "–"])
    refit = (fit.get("refit") or {}).get("records") or []
    kept = [rec for rec in refit if rec.get("kept") and rec.get("pass", 0) > 0]
    if kept:
        rec = kept[-1]
        out.append([label, f"{r['ratio']:.2f}", f"+ refit pass {rec['pass']} ({fit['refit']['mode']})",
                    " ".join(f"{e:.2f}" for e in rec["layer_errors"]), f"{rec['last_hidden']:.3f}", "–", "–"])
    out[-1][-1] = "–" if score is None else f"{score:.4f}"
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", help="LABEL=DECOMPOSE_RUN[,EVALUATE_RUN]")
    args = p.parse_args()
    head = ["spec", "ratio", "decomposition", "layer output errors L1..L6", "last hidden", "dead blocks",
            "untrained dev score"]
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for item in args.runs:
        label, _, dirs = item.partition("=")
        dec, _, ev = dirs.partition(",")
        if not report_of(Path(dec)).is_file():
            print(f"| {label} |" + " – |" * (len(head) - 1))
            continue
        for row in rows(label, Path(dec), Path(ev) if ev else None):
            print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()
