"""How far apart does a classifier's input lie? Pooled states and logits of models on a dev set.

    python benchmarks/pooled_spread.py --task sst2 LABEL=MODEL [LABEL=MODEL ...] [--pooling mean] [--head-from RUN]

For each model (a run directory with ``model/`` or a model directory, dense or compressed) on
the first ``--n`` dev examples of the task: the mean pairwise cosine of the pooled states the
classifier reads (its own pooling: [CLS] pooler or masked mean; near 1 = every input looks the
same to the head), the standard deviation of its logits, and — with ``--head-from`` — of the
logits the head of that run's model gives on these pooled states (what a student that copies
the teacher's head starts from). Prints a Markdown table.

    python benchmarks/pooled_spread.py --task cola --n 0 --probe 4000 LABEL=MODEL [LABEL=MODEL ...]

``--probe N`` adds a linear probe: a logistic regression (scikit-learn, standardized features) fitted
on the pooled states of the first N training examples, scored on the dev examples with the task's
GLUE score, balanced accuracy and top share — what a linear head can read from the features alone,
whatever the model's own head learned (docs/RESULTS.md §12e, §12h). ``--n 0``: the whole dev split.

    python benchmarks/pooled_spread.py --task rte --n 0 --readout TEACHER_RUN --readout-n 2490 LABEL=MODEL ...

``--readout TEACHER_RUN`` adds how much of *that teacher's judgement* a linear head can read: a ridge
regression (scikit-learn, standardized features, its penalty chosen by cross-validation) of the fine-tuned
teacher's logits (a regression task: its score) on each model's pooled states, fitted on the first 85% of the
first ``--readout-n`` training examples; the held-out R² on the last 15% (1: the teacher's logits are a linear
function of these states; 0 or below: nothing a linear head can use), and the fitted head's dev score /
balanced accuracy / top share. It works for regression tasks too, and tells apart a student whose features
carry the task under a head that has not found it from one whose features do not (docs/RESULTS.md §12k).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from tdlight.data.glue import get_task, load_split  # noqa: E402
from tdlight.data.metrics import glue_metrics, prediction_stats  # noqa: E402
from tdlight.model.pooling import pooling_of  # noqa: E402
from tdlight.model.teacher import load_classifier  # noqa: E402


def _model_dir(p: str) -> str:
    return str(Path(p) / "model") if (Path(p) / "model").is_dir() else p


@torch.no_grad()
def pooled_and_logits(model, tokenizer, texts: list[tuple[str, ...]], max_length: int, batch: int = 64):
    """:func:`pooled_batch` over ``texts`` in batches of ``batch`` (one padded batch for all of them would
    pad every short text to the longest)."""
    parts = [pooled_batch(model, tokenizer, texts[i:i + batch], max_length) for i in range(0, len(texts), batch)]
    return torch.cat([a for a, _ in parts]), torch.cat([b for _, b in parts])


@torch.no_grad()
def pooled_batch(model, tokenizer, texts: list[tuple[str, ...]], max_length: int):
    """The pooled states the classifier reads and the logits: ``base_model.pooler``'s output (BERT), else
    the last hidden states as a first-token head reads them (their masked mean under mean pooling, the
    first token otherwise: RoBERTa, ELECTRA, MPNet, DeBERTa, DistilBERT)."""
    seen = {}
    pooler = getattr(model.base_model, "pooler", None)
    if pooler is not None:
        hook = pooler.register_forward_hook(lambda m, a, out: seen.__setitem__("pooled", out))
    else:
        hook = model.base_model.register_forward_hook(lambda m, a, out: seen.__setitem__("hidden", out[0]))
    try:
        enc = tokenizer(*zip(*texts), truncation=True, max_length=max_length, padding=True, return_tensors="pt")
        logits = model.eval()(**enc).logits
    finally:
        hook.remove()
    if pooler is not None:
        return seen["pooled"], logits
    h = seen["hidden"]
    if pooling_of(model) == "mean":
        w = enc["attention_mask"][..., None].to(h.dtype)
        return (h * w).sum(1) / w.sum(1), logits
    return h[:, 0], logits


def mean_pairwise_cosine(x: torch.Tensor) -> float:
    x = torch.nn.functional.normalize(x.float(), dim=-1)
    sim = x @ x.T
    n = len(x)
    return float((sim.sum() - sim.diagonal().sum()) / (n * (n - 1)))


def linear_probe(task, train_x: torch.Tensor, train_y, dev_x: torch.Tensor, dev_y) -> dict[str, float]:
    """A logistic regression on standardized features, fitted on (train_x, train_y) and read on the dev set:
    the task's metrics and :func:`~tdlight.data.metrics.prediction_stats` (balanced accuracy, top share)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    clf = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000))
    clf.fit(train_x.double().numpy(), list(train_y))
    pred = clf.predict(dev_x.double().numpy())
    return {**glue_metrics(task, pred, list(dev_y)), **prediction_stats(task, pred, list(dev_y))}


def teacher_readout(task, train_x: torch.Tensor, teacher_logits: torch.Tensor, dev_x: torch.Tensor, dev_y,
                    holdout: float = 0.15) -> dict[str, float]:
    """Ridge regression of ``teacher_logits`` on ``train_x`` (standardized; the penalty by scikit-learn's
    efficient leave-one-out over a log grid), fitted on all but the last ``holdout`` of the rows: ``r2``, the
    held-out R² (variance-weighted over the logits), ``alpha``, and the task's metrics of the fitted head on
    ``(dev_x, dev_y)`` (argmax of the predicted logits; a regression task's predicted score)."""
    import numpy as np
    from sklearn.linear_model import RidgeCV
    from sklearn.metrics import r2_score
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    x, t = train_x.double().numpy(), teacher_logits.double().numpy()
    cut = int(len(x) * (1 - holdout))
    if cut < 2 or cut == len(x):
        raise ValueError(f"{len(x)} training rows leave nothing to fit or to hold out at holdout={holdout}")
    fit = make_pipeline(StandardScaler(), RidgeCV(alphas=np.logspace(-2, 5, 15))).fit(x[:cut], t[:cut])
    r2 = float(r2_score(t[cut:], fit.predict(x[cut:]), multioutput="variance_weighted"))
    pred = np.asarray(fit.predict(dev_x.double().numpy())).reshape(len(dev_x), -1)
    labels = pred[:, 0] if get_task(task).is_regression else pred.argmax(1)
    dev_y = list(dev_y)
    return {"r2": r2, "alpha": float(fit[-1].alpha_), **glue_metrics(task, labels, dev_y),
            **prediction_stats(task, labels, dev_y)}


def head_logits(head_model, pooled: torch.Tensor) -> torch.Tensor:
    """``head_model``'s classifier applied to pooled states (BERT: dropout then a linear; a head that reads
    the first token of the hidden states gets them as a one-token sequence)."""
    head_model.eval()
    if getattr(head_model.base_model, "pooler", None) is None:
        return head_model.classifier(pooled[:, None, :])
    return head_model.classifier(pooled)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("models", nargs="+", help="LABEL=RUN_OR_MODEL_DIR")
    p.add_argument("--task", default="sst2")
    p.add_argument("--n", type=int, default=128, help="dev examples (0: all)")
    p.add_argument("--probe", type=int, default=0, metavar="N",
                   help="fit a linear probe on the first N training examples' pooled states (0: no probe)")
    p.add_argument("--readout", default=None, metavar="TEACHER_RUN",
                   help="a fine-tuned teacher (run or model dir): how much of its logits a linear head reads from each model")
    p.add_argument("--readout-n", type=int, default=4000, metavar="N",
                   help="training examples for --readout (the last 15%% of them held out; default 4000)")
    p.add_argument("--max-length", type=int, default=64)
    p.add_argument("--data-dir", default=str(ROOT.parent / "shared" / "data" / "glue"))
    p.add_argument("--pooling", default=None, choices=["cls", "mean"],
                   help="what every model pools (default: each model's own, see teacher.pooling)")
    p.add_argument("--head-from", default=None, help="a fine-tuned run whose head is applied to every model's pooled states")
    args = p.parse_args()
    task = get_task(args.task)
    if args.n < 0 or args.probe < 0:
        p.error(f"--n={args.n}, --probe={args.probe}; valid: integers ≥ 0")
    if args.readout and args.readout_n < 20:
        p.error(f"--readout-n={args.readout_n}; valid: an integer ≥ 20 (85% fit, 15% held out)")
    if args.probe and task.is_regression:
        p.error(f"--probe fits a classifier; task {task.name} is a regression (valid: a classification task)")

    def examples(split: str, n: int):
        ds = load_split(task, split, data_dir=args.data_dir, source="local")
        ds = ds.select(range(min(n, len(ds)))) if n else ds
        return [tuple(ds[i][c] for c in task.text_columns) for i in range(len(ds))], ds["label"]

    texts, labels = examples(task.validation_splits[0], args.n)
    train_texts, train_labels = examples("train", args.probe) if args.probe else ([], [])
    head = load_classifier(_model_dir(args.head_from), task.num_labels)[0] if args.head_from else None
    readout_texts, teacher_logits = [], None
    if args.readout:
        readout_texts, _ = examples("train", args.readout_n)
        teacher, teacher_tok = load_classifier(_model_dir(args.readout), task.num_labels)
        teacher_logits = pooled_and_logits(teacher, teacher_tok, readout_texts, args.max_length)[1]
    cols = ["model", "pooled states: mean pairwise cosine", "logit std (own head)"]
    if head is not None:
        cols.append(f"logit std ({args.head_from} head)")
    if args.probe:
        cols.append(f"linear probe ({len(train_texts)} train): score / balanced / top share")
    if args.readout:
        cols += [f"teacher readout ({len(readout_texts)} train): held-out R²", "readout head: " + (
            "score / spread" if task.is_regression else "score / balanced / top share")]
    print("| " + " | ".join(cols) + " |")
    print("|" + "---|" * len(cols))
    for item in args.models:
        label, _, path = item.partition("=")
        model, tok = load_classifier(_model_dir(path), task.num_labels, pooling=args.pooling)
        pooled, logits = pooled_and_logits(model, tok, texts, args.max_length)
        row = [label, f"{mean_pairwise_cosine(pooled):.3f}", f"{float(logits.float().std(0).mean()):.3f}"]
        if head is not None:
            row.append(f"{float(head_logits(head, pooled).float().std(0).mean()):.3f}")
        if args.probe:
            train_pooled, _ = pooled_and_logits(model, tok, train_texts, args.max_length)
            r = linear_probe(task, train_pooled, train_labels, pooled, labels)
            row.append(f"{r['score']:.3f} / {r['balanced_accuracy']:.3f} / {r['top_share']:.3f}")
        if args.readout:  # (the pooled states of the readout's training examples: one more pass over them)
            r = teacher_readout(task, pooled_and_logits(model, tok, readout_texts, args.max_length)[0], teacher_logits,
                                pooled, labels)
            read = (f"{r['score']:.3f} / spread {r['spread']:.3f}" if task.is_regression
                    else f"{r['score']:.3f} / {r['balanced_accuracy']:.3f} / {r['top_share']:.3f}")
            row += [f"{r['r2']:.3f}", read]
        print("| " + " | ".join(row) + " |", flush=True)


if __name__ == "__main__":
    main()
