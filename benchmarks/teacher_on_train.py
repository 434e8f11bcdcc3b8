"""How far a fine-tuned teacher's soft targets are from the gold labels on its own training set.

    python benchmarks/teacher_on_train.py RUN_OR_MODEL_DIR --task mrpc [--limit N] [--temperature T]

A teacher that memorised its training set (train accuracy near 1, the gold label's probability near
1) gives soft targets there that *are* the gold labels: distilling on that set teaches a student
nothing the labels do not (docs/RESULTS.md §12b). Prints, for a classifier: train accuracy, the mean
probability of the gold label, the mean top probability, the share of examples above 0.9, the
entropy of the targets at ``--temperature``, the top-prediction share against the labels' majority.
"""

from __future__ import annotations

import argparse
import math
import os
from pathlib import Path

import torch

from tdlight.config import ROOT
from tdlight.data.glue import get_task, load_split
from tdlight.model.teacher import load_classifier


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", help="a finetune run directory (its model/) or a model directory")
    ap.add_argument("--task", required=True)
    ap.add_argument("--limit", type=int, default=None, help="the first N training examples (default: all)")
    ap.add_argument("--max-length", type=int, default=128)
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--data-dir", default=os.environ.get("TDLIGHT_DATA_DIR", str(ROOT.parent / "shared" / "data")))
    a = ap.parse_args()
    task = get_task(a.task)
    if task.is_regression:
        raise SystemExit(f"--task {task.name}: a regression task has no class probabilities; valid: a classification task")
    path = Path(a.model)
    path = path / "model" if (path / "model").is_dir() else path
    model, tok = load_classifier(str(path), task.num_labels)
    model.eval()
    ds = load_split(task, "train", data_dir=Path(a.data_dir) / "glue")
    if a.limit:
        ds = ds.select(range(min(a.limit, len(ds))))
    cols = [ds[c] for c in task.text_columns]
    labels = torch.tensor(ds["label"])
    logits = []
    with torch.no_grad():
        for i in range(0, len(labels), 64):
            enc = tok(*[c[i:i + 64] for c in cols], truncation=True, max_length=a.max_length, padding=True,
                      return_tensors="pt")
            logits.append(model(**enc).logits.float())
    z = torch.cat(logits)
    p, pt = z.softmax(-1), (z / a.temperature).softmax(-1)
    pred = p.argmax(-1)
    top = p.max(-1).values
    entropy = -(pt * pt.clamp_min(1e-12).log()).sum(-1).mean() / math.log(task.num_labels)
    majority = torch.bincount(labels, minlength=task.num_labels).max() / len(labels)
    top_share = torch.bincount(pred, minlength=task.num_labels).max() / len(labels)
    print(f"| {task.name} train ({len(labels):,}) | value |\n|---|---|")
    for name, v in [("accuracy", (pred == labels).float().mean()), ("mean probability of the gold label",
                    p[torch.arange(len(labels)), labels].mean()), ("mean top probability", top.mean()),
                    ("share with top probability > 0.9", (top > 0.9).float().mean()),
                    (f"target entropy at T={a.temperature:g} (of its maximum)", entropy),
                    ("top-prediction share", top_share), ("labels' majority share", majority)]:
        print(f"| {name} | {float(v):.4f} |")


if __name__ == "__main__":
    main()
