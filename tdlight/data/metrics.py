"""GLUE metrics on torchmetrics, and the single GLUE score of each task.

All values are fractions in [0, 1] (correlations in [-1, 1]), not ×100. The ``score`` of
a task is its GLUE leaderboard number: CoLA Matthews correlation; STS-B the mean of
Pearson and Spearman; MRPC and QQP the mean of F1 (positive class 1) and accuracy; the
rest accuracy. MNLI is scored per validation split (matched, mismatched); its task score
is the mean of the two, and it counts once in the GLUE average.
"""

from __future__ import annotations

import warnings

import torch
import torchmetrics
from sklearn.metrics import balanced_accuracy_score
from torchmetrics.functional import pearson_corrcoef, spearman_corrcoef
from torchmetrics.functional.classification import binary_f1_score, matthews_corrcoef, multiclass_accuracy
from torchmetrics.utilities import dim_zero_cat

from tdlight.data.glue import GlueTask, get_task


def glue_metrics(task: GlueTask | str, preds, labels) -> dict[str, float]:
    """The task's official metrics and ``score`` from 1-D predictions (class indices, or floats for STS-B)."""
    task = get_task(task)
    p, y = torch.as_tensor(preds), torch.as_tensor(labels)
    if task.is_regression:
        p, y = p.double().flatten(), y.double().flatten()
        out = {"pearson": pearson_corrcoef(p, y).item(), "spearman": spearman_corrcoef(p, y).item()}
        out["score"] = (out["pearson"] + out["spearman"]) / 2
        return out
    p, y = p.long().flatten(), y.long().flatten()
    n = task.num_labels
    out: dict[str, float] = {}
    for m in task.metrics:
        if m == "accuracy":
            out[m] = multiclass_accuracy(p, y, num_classes=n, average="micro").item() if len(y) else 0.0
        elif m == "f1":
            out[m] = binary_f1_score(p, y).item()
        elif m == "matthews_correlation":
            out[m] = matthews_corrcoef(p, y, task="multiclass", num_classes=n).item()
        else:  # pragma: no cover - the registry only names the metrics above
            raise KeyError(m)
    out = {k: float(v) for k, v in out.items()}  # torchmetrics gives an int tensor for a perfect MCC
    out["score"] = sum(out[m] for m in task.metrics) / len(task.metrics)
    return out


CONSTANT_SHARE = 0.95  # more of the dev predictions than this in one class: a constant predictor
CONSTANT_SPREAD = 0.05  # regression: prediction std below this fraction of the labels' std


def prediction_stats(task: GlueTask | str, preds, labels) -> dict[str, float]:
    """What a score alone hides: is the model a constant predictor?

    * ``majority_score``: the task's score of always predicting the dev set's most frequent
      label (0 for STS-B, whose correlations a constant cannot have);
    * ``top_share`` (classification): the share of the most frequent predicted class, to be read
      against ``majority_share``, the dev labels' own (MRPC 0.684: a top share near it is no sign of a
      constant model, one far above it is);
    * ``balanced_accuracy`` (classification): the mean of the per-class recalls — 1/C for any
      constant predictor however skewed the dev set (MRPC's majority class is 68%, CoLA's 69%), so
      it reads a student against chance where accuracy and F1 reward copying the majority;
    * ``spread`` (regression): std of the predictions / std of the labels;
    * ``constant``: 1.0 when ``top_share`` > :data:`CONSTANT_SHARE` (or ``spread`` <
      :data:`CONSTANT_SPREAD`), else 0.0 — a model that has learned nothing, whatever its score.
    """
    task = get_task(task)
    p, y = torch.as_tensor(preds), torch.as_tensor(labels)
    if not len(y):
        return {}
    if task.is_regression:
        p, y = p.double().flatten(), y.double().flatten()
        spread = (p.std() / y.std()).item() if len(y) > 1 and y.std() > 0 else 0.0
        return {"majority_score": 0.0, "spread": spread, "constant": float(spread < CONSTANT_SPREAD)}
    p, y = p.long().flatten(), y.long().flatten()
    top_share = torch.bincount(p, minlength=task.num_labels).max().item() / len(p)
    counts = torch.bincount(y, minlength=task.num_labels)
    majority = torch.full_like(y, int(counts.argmax()))
    # the mean recall over the classes present in the labels; torchmetrics' macro accuracy would count a
    # class absent from the labels (a small limit_eval slice) as recall 0, scikit-learn's ignores it
    with warnings.catch_warnings():  # "y_pred contains classes not in y_true": the case meant above
        warnings.simplefilter("ignore", UserWarning)
        balanced = float(balanced_accuracy_score(y.numpy(), p.numpy()))
    return {"majority_score": glue_metrics(task, majority, y)["score"], "majority_share": counts.max().item() / len(y),
            "top_share": top_share, "balanced_accuracy": balanced, "constant": float(top_share > CONSTANT_SHARE)}


class GlueMetric(torchmetrics.Metric):
    """Accumulates predictions and targets of one evaluation split; ``compute()`` -> :func:`glue_metrics`.

    ``update(preds, target)``: ``preds`` are logits (N, C), or (N,) / (N, 1) scores for STS-B;
    ``target`` (N,). The states are concatenated across processes under DDP, so the
    result equals a single-process evaluation of the same examples. ``compute()``
    returns a dict of Python floats.
    """

    full_state_update = False

    def __init__(self, task: GlueTask | str, **kwargs):
        super().__init__(**kwargs)
        self.task = get_task(task)
        self.add_state("preds", default=[], dist_reduce_fx="cat")
        self.add_state("target", default=[], dist_reduce_fx="cat")

    def update(self, preds: torch.Tensor, target: torch.Tensor) -> None:
        if self.task.is_regression:
            p = preds.detach().float().reshape(-1)
        else:
            p = preds.detach().argmax(dim=-1) if preds.ndim > 1 else preds.detach().long()
        self.preds.append(p)
        self.target.append(target.detach().reshape(-1))

    def compute(self) -> dict[str, float]:
        # a list of batches, or one tensor once synced across processes
        def cat(state):
            return torch.empty(0) if isinstance(state, list) and not state else dim_zero_cat(state)

        preds, target = cat(self.preds).cpu(), cat(self.target).cpu()
        return {**glue_metrics(self.task, preds, target), **prediction_stats(self.task, preds, target)}
