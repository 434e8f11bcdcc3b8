"""Sweep objectives (tdlight.sweep.objectives): the registry, the contract every registered objective
keeps, and that a new objective needs nothing but its class and its registry entry — registered from
outside the package, it is priced or read, optimised, constrained, recorded and reported.

The contract tests are parametrised over ``OBJECTIVES``, so a newly registered objective is checked
without touching this file.
"""

from __future__ import annotations

import json
import logging
import statistics
import warnings

import optuna
import pytest
import yaml
from optuna.trial import TrialState

from tdlight.sweep.objectives import OBJECTIVES, SCORE, Measured, Priced, lookup, register
from tdlight.sweep.runner import INFEASIBLE
from tdlight.sweep.spec import SweepError, load
from tdlight.sweep.storage import open_storage
from tests.test_sweep import trials, write_sweep

ALL = sorted(OBJECTIVES)
TASKS = ["mrpc", "rte"]
# a task's result as the pipeline leaves it (pipeline.json), and as a single stage does (metrics.json)
PIPELINE = {"task": "mrpc", "teacher_score": 0.8, "student_score": 0.7, "majority_score": 0.68,
            "student_top_share": 0.6, "student_bytes": 1_500_000, "speedup": 1.3, "student_ms": 2.5,
            "ratio": 4.0, "steps": {"finetune": "/a"}}
METRICS = {"stage": "evaluate", "score": 0.7, "dev": {"score": 0.7, "top_share": 0.6, "majority_score": 0.68},
           "model_bytes": 1_500_000}


def test_registry_holds_the_sweep_objectives_by_name():
    assert list(OBJECTIVES) == ["ratio", "params", "model_ratio", "bytes", "score", "speedup"]
    assert {n: o.direction for n, o in OBJECTIVES.items()} == {
        "ratio": "maximize", "params": "minimize", "model_ratio": "maximize", "bytes": "minimize",
        "score": "maximize", "speedup": "maximize"}
    assert [n for n, o in OBJECTIVES.items() if o.priced] == ["ratio", "params", "model_ratio"]
    assert OBJECTIVES["score"] is SCORE and SCORE.key == "scores"


@pytest.mark.parametrize("name", ALL)
def test_every_objective_names_itself_and_reads_back_what_a_trial_records(name, teacher_dir):
    o = OBJECTIVES[name]
    assert o.name == name and o.direction in ("maximize", "minimize") and o.label and o.header
    assert isinstance(o, (Priced, Measured)) and o.priced == isinstance(o, Priced)
    if o.priced:  # from the config alone, as trial.price records it
        from tdlight.sweep.trial import compose, price

        p = price(compose([f"teacher.path={teacher_dir}", "compression.rank=8"]))
        assert isinstance(p[name], (int, float)) and p[name] > 0
        assert o.recorded(p, TASKS) == p[name] and o.format(p[name]) != "–"
    else:  # from each task's whole result, recorded on the trial, read back by the report
        value = o.read(PIPELINE)
        assert isinstance(value, (int, float)), f"{name} reads nothing from a pipeline.json summary"
        per_task = {"mrpc": value, "rte": value / 2}
        kept = o.record(per_task)
        assert o.recorded({o.key: kept}, TASKS) == pytest.approx(o.combine(per_task))
        assert o.format(o.combine(per_task)) != "–"
    assert o.recorded({}, TASKS) is None and o.format(None) == "–"


def test_measured_objectives_read_a_single_stages_metrics_too():
    assert SCORE.read(METRICS) == SCORE.read(PIPELINE) == 0.7
    assert OBJECTIVES["bytes"].read(METRICS) == OBJECTIVES["bytes"].read(PIPELINE) == 1_500_000
    assert OBJECTIVES["speedup"].read(METRICS) is None  # the pipeline's alone: a trial that needs it fails
    assert lookup(METRICS, ("student_top_share", "dev.top_share")) == 0.6


def test_a_trial_passes_its_whole_result_through(tmp_path):
    from tdlight.sweep.trial import read_result

    (tmp_path / "pipeline.json").write_text(json.dumps(PIPELINE))
    assert read_result(tmp_path) == PIPELINE  # every key, as the pipeline wrote it
    (tmp_path / "pipeline.json").unlink()
    (tmp_path / "metrics.json").write_text(json.dumps(METRICS))
    assert read_result(tmp_path) == METRICS


@pytest.mark.parametrize("bad, msg", [("Speed", "objective name 'Speed'"), ("x1", "objective name 'x1'"),
                                      ("upward", "direction 'upward'")])
def test_a_malformed_objective_is_refused_at_registration(bad, msg):
    class Bad(Priced):
        name, direction = (bad, "maximize") if bad != "upward" else ("toy", bad)

    known = list(OBJECTIVES.values())
    with pytest.raises(ValueError, match=msg):
        register(*known, Bad())
    assert list(OBJECTIVES.values()) == known  # left as it was


# --- a new objective from outside the package -------------------------------------------------------
class EncoderParams(Priced):
    """The compressed encoder's parameters, priced from the config (a copy of ``params`` under its own name)."""

    name, direction, label, column = "encoder_params", "minimize", "encoder parameters (toy)", "enc. params"
    log = True

    def price(self, p) -> int:
        return int(p.counts["encoder"])


class StudentMs(Measured):
    """The student's forward time per batch, read from each task's pipeline.json (a key no objective reads)."""

    name, direction, label, column = "student_ms", "minimize", "student forward ms per batch (toy)", "student ms"
    keys = ("student_ms",)
    needs = "student_ms needs stage=pipeline"


def test_a_new_objective_is_one_class_and_one_registry_entry(tmp_path, teacher_dir, capsys, caplog):
    """Registered from outside: its values are the study's, a priced one constrains (an infeasible point is
    not trained), trials.md and the report show it — nothing in tdlight edited."""
    from tdlight.sweep.cli import main
    from tdlight.sweep.report import report
    from tdlight.sweep.trial import compose, price

    known = list(OBJECTIVES.values())
    register(*known, EncoderParams(), StudentMs())
    try:
        at = {r: price(compose([f"teacher.path={teacher_dir}", f"compression.rank={r}"]))["encoder_params"]
              for r in (4, 8, 16)}
        assert at[4] < at[8] < at[16]
        path = write_sweep(tmp_path, teacher_dir, n_trials=2, threads=1,
                           objectives=[{"name": "score"}, {"name": "encoder_params"}, {"name": "student_ms"}],
                           constraints=[f"encoder_params <= {at[8]}"],
                           enqueue=[{"compression.rank": 4}, {"compression.rank": 16}, {"compression.rank": 8}])
        spec = yaml.safe_load(path.read_text())
        spec["space"] = {"compression.rank": "choice(4, 8, 16)"}
        path.write_text(yaml.safe_dump(spec))
        with pytest.raises(SweepError, match="only quantities known before training"):  # measured: not before
            load(path, ["sweep.constraints=[student_ms<=1]"])
        with caplog.at_level(logging.INFO, logger="tdlight.sweep"):
            assert main("sweep", [str(path)]) == 0, capsys.readouterr().err[-3000:]
        out = capsys.readouterr().out
        # each finished trial says where the sweep stands (the infeasible one does not count)
        assert "1/2 trials done, about" in caplog.text and "2/2 trials done" in caplog.text, caplog.text[-2000:]

        ts = trials(tmp_path)
        with warnings.catch_warnings():  # (experimental in Optuna 5)
            warnings.simplefilter("ignore")
            names = optuna.load_study(study_name="tiny", storage=open_storage(None, tmp_path / "sweep")).metric_names
        assert names == ["score", "encoder_params", "student_ms"]  # what optuna-dashboard and Optuna's plots show
        assert [(t.params["compression.rank"], t.state) for t in ts] == [
            (4, TrialState.COMPLETE), (16, TrialState.PRUNED), (8, TrialState.COMPLETE)]
        # the priced objective: the study's value, recorded with the price, used by the constraint
        assert ts[1].user_attrs[INFEASIBLE] == f"encoder_params <= {at[8]:g}"
        assert ts[1].user_attrs["encoder_params"] == at[16]
        assert not (tmp_path / "sweep" / "trials" / "0001").exists()  # infeasible: not trained
        sweep = tmp_path / "sweep"
        for t in (ts[0], ts[2]):
            rank = t.params["compression.rank"]
            assert t.values[1] == t.user_attrs["encoder_params"] == t.user_attrs["params"] == at[rank]
            # the measured one: read from the task's whole pipeline.json, recorded per task, its mean the value
            summary = json.loads((sweep / "trials" / f"{t.number:04d}" / "mrpc" / "pipeline.json").read_text())
            assert t.user_attrs["student_ms"] == {"mrpc": summary["student_ms"]} and summary["student_ms"] > 0
            assert t.values[2] == pytest.approx(statistics.mean(t.user_attrs["student_ms"].values()))
            assert t.values[0] == t.user_attrs["scores"]["mrpc"]

        # trials.md: a column for each, after the score, with the trial's values
        md = (sweep / "trials.md").read_text().splitlines()
        assert "objectives score (maximize), encoder_params (minimize), student_ms (minimize)" in md[2]
        head = next(ln for ln in md if ln.startswith("| #"))
        cols = [c.strip() for c in head.strip("|").split("|")]
        assert cols[cols.index("score") + 1:cols.index("score") + 3] == ["enc. params", "student ms"]
        rows = {ln.split("|")[1].strip(): [c.strip() for c in ln.strip("|").split("|")] for ln in md
                if ln.startswith("| ") and not ln.startswith("| #")}
        for t in (ts[0], ts[2]):
            row = rows[str(t.number)]
            assert row[cols.index("enc. params")] == str(at[t.params["compression.rank"]])
            assert float(row[cols.index("student ms")]) == pytest.approx(t.values[2], rel=1e-3)
        assert rows["1"][cols.index("student ms")] == "–" and "infeasible (encoder_params <=" in rows["1"][-1]

        # the report: the console's front table and the plot's axes are the objectives (priced on x)
        assert "enc. params" in out and "student ms" in out
        result = report(sweep)
        assert result["axes"] == ["encoder_params", "score"] and (sweep / "pareto.png").stat().st_size > 1000
        assert set(result["front"]) <= {0, 2}
    finally:
        register(*known)
    assert "encoder_params" not in OBJECTIVES
    with pytest.raises(SweepError, match="unknown objective 'encoder_params'"):
        load(path)
