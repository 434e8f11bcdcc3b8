"""benchmarks/teachers.py: the fine-tuned teachers against issue 28's lines, one row per run, named by teacher."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "teachers.py"


def _run(tmp_path: Path, name: str, **fields) -> Path:
    dev = {"score": fields.pop("score"), "majority_score": 0.0256, "majority_share": fields.pop("majority_share"),
           "top_share": fields.pop("top_share"), "balanced_accuracy": fields.pop("balanced")}
    m = {"stage": "finetune", "dev": dev, "score": dev["score"], "epochs": 3, "epochs_run": 3, "patience": 1,
         "epoch_seconds": [60.0, 60.0, 60.0], **fields}
    (tmp_path / name).mkdir()
    (tmp_path / name / "metrics.json").write_text(json.dumps(m))
    return tmp_path / name


def test_each_teacher_is_named_and_judged_on_its_score_and_its_lean(tmp_path):
    # CoLA's line is MCC 0.35 with a top share at most gold's majority + 0.10 (0.691 + 0.10)
    _run(tmp_path, "a", task="cola", teacher="mpnet", lr=1e-4, score=0.5626, majority_share=0.691, top_share=0.739,
         balanced=0.767)
    _run(tmp_path, "b", task="cola", teacher="/cache/teachers/minilm", lr=1e-4, score=0.3245, majority_share=0.691,
         top_share=0.818, balanced=0.636)
    _run(tmp_path, "c", task="rte", teacher="mpnet", lr=2e-5, score=0.66, majority_share=0.527, top_share=0.736,
         balanced=0.648)
    r = subprocess.run([sys.executable, str(SCRIPT), str(tmp_path)], capture_output=True, text=True, check=True)
    rows = {line.split("|")[1].strip() + "/" + line.split("|")[2].strip(): line for line in r.stdout.splitlines()
            if line.startswith("| ") and not line.startswith("| task")}
    assert set(rows) == {"cola/mpnet", "cola/minilm", "rte/mpnet"}
    assert rows["cola/mpnet"].rstrip().endswith("| ✓ |")
    assert rows["cola/minilm"].rstrip().endswith("| ✗ |")  # under the line
    assert "0.736 **skewed**" in rows["rte/mpnet"] and rows["rte/mpnet"].rstrip().endswith("| ✗ |")  # over it, leaning
