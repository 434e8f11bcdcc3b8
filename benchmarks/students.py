"""A Markdown table of finished runs read like an outsider would: score against the teacher and
the dev set's majority-class baseline, and the share of the most frequent prediction.

    python benchmarks/students.py --teacher outputs/controls/teacher LABEL=RUN_DIR [LABEL=RUN_DIR ...]

Each RUN_DIR is a finetune, distill or evaluate run (its ``metrics.json``), or a pipeline run
(``pipeline.json``: the student's row). Missing runs show as ``–``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def _metrics(run: Path) -> dict | None:
    for name in ("metrics.json", "pipeline.json"):
        f = run / name
        if f.is_file():
            d = json.loads(f.read_text())
            if name == "pipeline.json":
                return {"score": d["student_score"], "dev": {"majority_score": d.get("majority_score"),
                                                             "top_share": d.get("student_top_share")},
                        "ratio": d.get("ratio"), "global_step": None}
            return d
    return None


def _fmt(x, spec: str = ".4f") -> str:
    return "–" if x is None else format(x, spec)


def table(teacher: dict | None, rows: list[tuple[str, dict | None]]) -> str:
    t_score = teacher["score"] if teacher else None
    head = ["run", "ratio", "steps", "dev score", "% of teacher", "majority baseline", "top-prediction share",
            "constant"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for label, m in [("teacher", teacher), *rows]:
        if m is None:
            lines.append(f"| {label} |" + " – |" * (len(head) - 1))
            continue
        dev = m.get("dev", {})
        share = dev.get("top_share", dev.get("spread"))
        const = dev.get("constant")
        lines.append("| " + " | ".join([
            label, _fmt(m.get("ratio"), ".2f"), _fmt(m.get("global_step"), "d"), _fmt(m["score"]),
            _fmt(100 * m["score"] / t_score if t_score else None, ".1f"), _fmt(dev.get("majority_score")),
            _fmt(share, ".3f"), "**yes**" if const else ("no" if const is not None else "–"),
        ]) + " |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--teacher", type=Path, help="the teacher's finetune run directory")
    ap.add_argument("runs", nargs="+", help="LABEL=RUN_DIR")
    a = ap.parse_args()
    rows = []
    for item in a.runs:
        label, _, path = item.partition("=")
        rows.append((label, _metrics(Path(path))))
    print(table(_metrics(a.teacher) if a.teacher else None, rows))


if __name__ == "__main__":
    main()
