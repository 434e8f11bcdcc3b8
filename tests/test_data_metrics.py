"""GLUE metrics (``tdlight/data/metrics.py``): against scikit-learn/scipy, their scale and input
types, ``GlueMetric``'s accumulation and DDP-style state merging, the GLUE average.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.stats import pearsonr, spearmanr
from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef

from tdlight.data.glue import TASKS, get_task
from tdlight.data.metrics import GlueMetric, glue_metrics


# --- per-task metrics and GlueMetric ---------------------------------------------------------


def reference(task, p, y):
    t = get_task(task)
    if t.is_regression:
        r = {"pearson": pearsonr(p, y)[0], "spearman": spearmanr(p, y)[0]}
    else:
        r = {}
        for m in t.metrics:
            r[m] = {"accuracy": accuracy_score, "f1": f1_score, "matthews_correlation": matthews_corrcoef}[m](y, p)
    r["score"] = float(np.mean([r[m] for m in t.metrics]))
    return r


@pytest.mark.parametrize("task", sorted(TASKS))
def test_metrics_match_sklearn_scipy(task):
    t = get_task(task)
    rng = np.random.default_rng(len(task))
    n = 257
    if t.is_regression:
        y = rng.uniform(0, 5, n)
        logits = y[:, None] + rng.normal(0, 1.5, (n, 1))
        p = logits[:, 0]
    else:
        y = rng.integers(0, t.num_labels, n)
        logits = rng.normal(0, 1, (n, t.num_labels))
        logits[np.arange(n), y] += rng.uniform(0, 1.5, n)  # better than chance, not perfect
        p = logits.argmax(1)
    ref = reference(task, p, y)
    got = glue_metrics(task, torch.tensor(p), torch.tensor(y))
    assert set(got) == set(ref)
    for k in ref:
        assert got[k] == pytest.approx(ref[k], abs=1e-5), k
    m = GlueMetric(task)
    for chunk in np.array_split(np.arange(n), 5):  # several updates accumulate
        m.update(torch.tensor(logits[chunk], dtype=torch.float32),
                 torch.tensor(y[chunk], dtype=torch.float32 if t.is_regression else torch.long))
    got = m.compute()
    for k in ref:
        assert got[k] == pytest.approx(ref[k], abs=1e-5), k
    m.reset()
    m.update(torch.tensor(logits[:10], dtype=torch.float32), torch.tensor(y[:10]))
    assert m.compute()["score"] == pytest.approx(reference(task, p[:10], y[:10])["score"], abs=1e-5)


def perfect(task: str, n: int = 64):
    t = get_task(task)
    rng = np.random.default_rng(0)
    y = rng.uniform(0, 5, n) if t.is_regression else rng.permutation(np.arange(n) % t.num_labels)
    return y.copy(), y


@pytest.mark.parametrize("task", sorted(TASKS))
def test_metrics_are_fractions_and_accept_numpy_lists_and_tensors(task):
    p, y = perfect(task)
    t = get_task(task)
    expected = {m: 1.0 for m in (*t.metrics, "score")}
    for cast in (np.asarray, list, torch.as_tensor):
        got = glue_metrics(task, cast(p), cast(y))
        assert got == pytest.approx(expected) and all(isinstance(v, float) for v in got.values())


def test_glue_metric_regression_accepts_flat_scores():
    rng = np.random.default_rng(3)
    y = rng.uniform(0, 5, 50)
    p = y + rng.normal(0, 1, 50)
    flat, column = GlueMetric("stsb"), GlueMetric("stsb")
    flat.update(torch.tensor(p), torch.tensor(y))
    column.update(torch.tensor(p).unsqueeze(1), torch.tensor(y))
    assert flat.compute() == pytest.approx(column.compute())
    official = glue_metrics("stsb", p, y)
    assert {k: flat.compute()[k] for k in official} == pytest.approx(official, abs=1e-6)  # float32 scores


@pytest.mark.parametrize("task", ["mrpc", "cola", "stsb", "mnli"])
def test_glue_metric_states_concatenate_across_processes(task):
    """Two "ranks" with uneven shares, merged with the states' own reduction (cat), equal one process."""
    t = get_task(task)
    rng = np.random.default_rng(7)
    n = 91
    if t.is_regression:
        y = torch.tensor(rng.uniform(0, 5, n))
        logits = (y + torch.tensor(rng.normal(0, 1, n))).unsqueeze(1)
    else:
        y = torch.tensor(rng.integers(0, t.num_labels, n))
        logits = torch.tensor(rng.normal(0, 1, (n, t.num_labels)))
    single, rank0, rank1 = GlueMetric(task), GlueMetric(task), GlueMetric(task)
    single.update(logits, y)
    rank0.update(logits[:30], y[:30])
    rank1.update(logits[30:60], y[30:60])
    rank1.update(logits[60:], y[60:])
    rank0.merge_state(rank1)
    assert rank0.compute() == pytest.approx(single.compute(), abs=1e-12)
