"""tdlight sweep: Optuna multi-objective sweeps of tiny-BERT pipelines, resumable, parallel, reported."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
import yaml
from optuna.trial import TrialState

from tdlight.sweep.runner import (ABANDONED, DUPLICATE, INTERRUPTED, TRIAL_PID, Runner, counts_toward_budget,
                                  error_summary, open_storage)
from tdlight.sweep.spec import SweepError, distribution, load
from tests.conftest import tdlight

TRIAL = ["stage=pipeline", "stage.steps=[finetune,decompose,distill]", "trainer=cpu",
         "trainer.enable_progress_bar=false", "logger=csv",
         "stage.finetune.epochs=1", "stage.finetune.limit_train=32", "stage.finetune.limit_eval=16",
         "stage.finetune.batch_size=16", "stage.finetune.max_length=16",
         "stage.distill.intermediate_epochs=1", "stage.distill.prediction_epochs=1",
         "stage.distill.limit_train=32", "stage.distill.limit_eval=16", "stage.distill.batch_size=16",
         "stage.distill.max_length=16", "stage.speed_reps=1", "stage.speed_batch_size=4"]


def write_sweep(tmp_path: Path, teacher_dir: Path, **settings) -> Path:
    spec = {
        "sweep": {"name": "tiny", "n_trials": 3, "dir": str(tmp_path / "sweep"),
                  "sampler": {"name": "random", "seed": 0}, **settings},
        "tasks": ["mrpc"],
        "base": [f"teacher.path={teacher_dir}", *TRIAL],
        "space": {"compression.rank": "choice(4, 8, 16)", "compression.bank": "choice(6, 12)",
                  "stage.distill.layer_map": "choice(all, last)"},
    }
    p = tmp_path / "tiny.yaml"
    p.write_text(yaml.safe_dump(spec))
    return p


def sweep_cmd(path: Path, *overrides: str) -> list[str]:
    return [sys.executable, "-m", "tdlight.cli", "sweep", str(path), *overrides]


def trials(tmp_path: Path, duplicates: bool = True) -> list[optuna.trial.FrozenTrial]:
    """The study's trials; ``duplicates=False`` leaves out samples that repeated a finished point
    (pruned untrained: a small random space repeats points by chance)."""
    storage = open_storage(None, tmp_path / "sweep")
    ts = optuna.load_study(study_name="tiny", storage=storage).get_trials()
    return ts if duplicates else [t for t in ts if DUPLICATE not in t.user_attrs]


def test_search_space_maps_onto_optuna_distributions():
    D = optuna.distributions
    assert distribution("a", "choice(1, 2)") == D.CategoricalDistribution([1, 2])
    assert distribution("a", "int(interval(16, 192))") == D.IntDistribution(16, 192)
    assert distribution("a", "tag(log, interval(1e-5, 1e-3))") == D.FloatDistribution(1e-5, 1e-3, log=True)
    assert distribution("a", "range(8, 40, 8)") == D.IntDistribution(8, 32, step=8)
    # a non-scalar choice is kept in Hydra syntax, so it goes back on the command line as is
    assert distribution("a", "choice([[1,1]], all)").choices == ("[[1,1]]", "all")
    for bad, msg in [("interval(5, 5)", "empty range"), ("range(8, 8)", "empty range"), ("choice()", "empty"),
                     ("7", "single value"), ("tag(log, interval(0, 1))", "positive lower bound")]:
        with pytest.raises(SweepError, match=msg):
            distribution("a", bad)


@pytest.mark.parametrize("override, msg", [
    ("space.compression.rnk=choice(4,8)", "compression.rnk"),
    ("space.compression.rank=interval(9,9)", "empty range"),
    ("sweep.sampler.name=cma", "unknown sampler 'cma'"),
    ("sweep.objectives=[{name: accuracy}]", "unknown objective 'accuracy'"),
    ("sweep.constraints=[speedup>2]", "only quantities known before training"),
    ("sweep.storage=mysql://nobody@127.0.0.1:1/none", "cannot open sweep.storage"),
    ("sweep.workerz=2", "workerz"),
    # a range reaching a negative learning rate: never trained (it would diverge to a finite, ranked score)
    ("space.stage.distill.lr=interval(-1.0, 1e-3)", "stage.distill.lr=-1.0;"),
    # a renamed key, by the message that names the new one
    ("space.stage.pretrain.steps=choice(4,8)", "'stage.pretrain.steps' was renamed"),
    # an enqueued point outside its range (was: the worker crashed in study.ask, the trial stayed running)
    ("sweep.enqueue=[{compression.rank: 5, compression.bank: 6}]", "compression.rank=5 is outside the search space; "
                                                                 "valid: one of [4, 8, 16]"),
    (("space.stage.distill.lr=tag(log, interval(1e-5, 1e-3))",
      "sweep.enqueue=[{compression.rank: 4, compression.bank: 6, stage.distill.lr: 0.01}]"),
     "stage.distill.lr=0.01 is outside the search space; valid: a number in [1e-05, 0.001]"),
])
def test_bad_sweep_input_is_one_clear_error_before_any_trial(tmp_path, teacher_dir, override, msg):
    path = write_sweep(tmp_path, teacher_dir)
    overrides = override if isinstance(override, tuple) else (override,)
    r = tdlight("sweep", str(path), *overrides)
    assert r.returncode == 2, r.stderr[-3000:]
    assert msg in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "sweep" / "trials").exists()


def error_lines(err: str) -> list[str]:
    return [ln for ln in err.splitlines() if ln.startswith("tdlight: error:")]


@pytest.mark.parametrize("content, msg", [
    ("sweep: {name: [\n", "is not valid YAML at line 2, column 1: expected the node content"),
    ("", "is empty; valid: a YAML mapping with the top-level keys sweep, tasks, base, space"),
    ("# only a comment\n", "is empty; valid: a YAML mapping"),
    ("sweep: 5\n", "sweep: 5 is not a mapping of settings; valid: a mapping of settings"),
    ("7\n", "cannot be read as a sweep definition (Invalid loaded object type: int); valid: a YAML mapping"),
    ("- rte\n", "holds a list at the top level; valid: a YAML mapping"),
    ("space:\n  compression.rank: range(1,10,0)\n",
     "search space compression.rank: 'range(1,10,0)' has step 0; valid: range(start, stop[, step]) with a step > 0"),
], ids=["yaml-syntax", "empty", "comment-only", "sweep-not-a-mapping", "scalar", "list", "zero-step"])
def test_a_broken_sweep_file_is_one_error_naming_it(tmp_path, capsys, content, msg):
    from tdlight.sweep.cli import main

    path = tmp_path / "broken.yaml"
    path.write_text(content)
    assert main("sweep", [str(path)]) == 2  # (was: a traceback from yaml, OmegaConf or range())
    (line,) = error_lines(capsys.readouterr().err)
    assert f"sweep file {str(path)!r}" in line and msg in line, line


@pytest.mark.parametrize("setting, msg", [
    # (were: every trial failed at once / nothing ran, and both exited 0)
    ("sweep.trial_timeout=-1", "sweep.trial_timeout=-1.0: out of range; valid: null (no limit) or a number of seconds > 0"),
    ("sweep.trial_timeout=0", "sweep.trial_timeout=0.0: out of range; valid: null (no limit)"),
    ("sweep.max_infeasible=0", "sweep.max_infeasible=0: out of range; valid: an integer >= 1"),
    ("sweep.n_trials=-2", "sweep.n_trials=-2: out of range; valid: an integer >= 1"),
    ("sweep.workers=0", "sweep.workers=0: out of range; valid: an integer >= 1"),
    ("sweep.threads=0", "sweep.threads=0: out of range; valid: null (the machine's cores / workers) or an integer >= 1"),
    ("sweep.heartbeat_interval=0", "sweep.heartbeat_interval=0: out of range; valid: an integer number of seconds >= 1"),
    ("sweep.grace_period=30", ("sweep.grace_period=30: out of range; valid: an integer number of seconds > "
                               "sweep.heartbeat_interval (30)")),
    ("sweep.sampler.n_startup_trials=-1", "sweep.sampler.n_startup_trials=-1: out of range; valid: null"),
    ("sweep.sampler.population_size=1", ("sweep.sampler.population_size=1: out of range; valid: null (Optuna's "
                                         "default) or an integer >= 2")),
    ("sweep.name=a/b", "sweep.name='a/b': valid: a non-empty name without '/'"),
    ("sweep.enqueue=[5]", "sweep.enqueue entry 5 is not a point; valid: a list of mappings"),
])
def test_sweep_settings_that_cannot_run_are_refused_up_front(tmp_path, teacher_dir, capsys, setting, msg):
    from tdlight.sweep.cli import main

    assert main("sweep", [str(write_sweep(tmp_path, teacher_dir)), setting]) == 2
    (line,) = error_lines(capsys.readouterr().err)
    assert msg in line, line
    assert not (tmp_path / "sweep").exists()


def test_a_worker_that_dies_fails_its_trial_and_the_sweep_exits_nonzero(tmp_path, teacher_dir, capsys):
    from tdlight.sweep.cli import main

    path = write_sweep(tmp_path, teacher_dir, n_trials=1)
    study = optuna.create_study(study_name="tiny", storage=open_storage(None, tmp_path / "sweep"),
                                directions=["maximize", "maximize"])
    # a point the space cannot hold, queued in the study by an older tdlight (it did not check them): the
    # worker dies inside sampling it (was: exit 0, trial 0 running forever with no host, the budget used up)
    study.enqueue_trial({"compression.rank": 5, "compression.bank": 6, "stage.distill.layer_map": "all"})
    assert main("sweep", [str(path)]) == 1
    (line,) = error_lines(capsys.readouterr().err)
    assert "sweep worker 0 stopped by ValueError: '5' not in (4, 8, 16)" in line and "trial 0 is marked failed" in line
    (t,) = trials(tmp_path)
    assert t.state == TrialState.FAIL and "ValueError" in t.user_attrs["error"] and t.user_attrs["host"]
    assert not (tmp_path / "sweep" / "trials").exists()


def test_a_running_trial_without_host_or_heartbeat_is_recovered_after_the_grace_period(tmp_path, teacher_dir):
    from tdlight.sweep.report import _status

    url = f"sqlite:///{tmp_path / 'study.db'}"  # an RDB storage: heartbeats, as between hosts
    path = write_sweep(tmp_path, teacher_dir, storage=url, heartbeat_interval=1, grace_period=2)
    runner = Runner(load(path))
    study = optuna.create_study(study_name="tiny", directions=["maximize", "maximize"],
                                storage=open_storage(url, runner.dir, heartbeat_interval=1, grace_period=2))
    good = {"compression.rank": 8, "compression.bank": 6, "stage.distill.layer_map": "all"}
    study.enqueue_trial(good)
    study.enqueue_trial({**good, "compression.rank": 5})  # outside the space
    # trials popped and left RUNNING with no host attribute, as by a process that died inside study.ask
    stale_good, stale_bad, beating = study.ask(), study.ask(), study.ask()
    time.sleep(2.5)  # older than sweep.grace_period
    study._storage.record_heartbeat(beating._trial_id)  # a process beats for it: Optuna's heartbeat judges it
    young = study.ask()  # a process may be between ask and recording its host
    assert runner.recover(study) == 2
    ts = {t.number: t for t in study.get_trials()}
    assert ts[beating.number].state == ts[young.number].state == TrialState.RUNNING
    for t in (stale_good, stale_bad):
        assert ts[t.number].state == TrialState.FAIL and not counts_toward_budget(ts[t.number])
    retries = [t for t in ts.values() if "retry_of" in t.user_attrs]
    assert [(t.user_attrs["retry_of"], t.state, t.system_attrs["fixed_params"]) for t in retries] == [
        (stale_good.number, TrialState.WAITING, good)]  # a point outside the space is not queued again
    assert _status(ts[stale_good.number]).startswith("abandoned: left running with no sweep process recorded")
    assert "is outside the search space: not re-queued" in ts[stale_bad.number].user_attrs[ABANDONED]
    assert runner.recover(study) == 0  # done once


def test_a_failed_trial_shows_the_end_of_its_error_whole(tmp_path, teacher_dir, caplog):
    from tdlight.sweep.report import _status
    from tdlight.sweep.trial import _tail

    log = tmp_path / "mrpc.log"
    last = "tdlight: error: stage.distill.layer_map=[[7,7]]: " + "x" * 1600 + " till the end"
    log.write_text("[2025-01-01][lightning][INFO] - " + "y" * 3000 + "\nValueError: first\n" + last + "\n")
    error = f"exit code 1: {_tail(log)}"
    assert error_summary(error) == "exit code 1: " + last  # (was cut at its start: "failed: till] ...")
    assert error_summary("exit code 1: RuntimeError: a | tdlight: error: b | x") == "exit code 1: tdlight: error: b"
    assert error_summary("timed out after 3 s (sweep.trial_timeout)") == "timed out after 3 s (sweep.trial_timeout)"
    runner = Runner(load(write_sweep(tmp_path, teacher_dir)))
    study = optuna.create_study(directions=["maximize", "maximize"])
    with caplog.at_level("WARNING", logger="tdlight.sweep"):
        runner._fail(study, study.ask(), error)
    assert f"trial 0 failed: exit code 1: {last}" in caplog.text  # the console
    assert _status(study.trials[0]) == f"failed: exit code 1: {last}"  # trials.md


def test_pareto_front_leaves_constant_students_off():
    from tdlight.sweep.report import pareto_front

    def trial(score, ratio, top):
        return optuna.trial.create_trial(values=[score, ratio], params={}, distributions={},
                                         user_attrs={"top_share": {"sst2": top}, "ratio": ratio}, state=TrialState.COMPLETE)

    ts = [trial(0.79, 1.7, 0.52), trial(0.76, 7.1, 0.52), trial(0.74, 6.0, 0.60),  # 2: dominated by 1
          trial(0.51, 87.5, 1.00), trial(0.62, 48.6, 0.83)]  # 3: a constant student at the highest ratio
    for i, t in enumerate(ts):
        t.number = i
    maximise = [optuna.study.StudyDirection.MAXIMIZE] * 2
    assert sorted(t.number for t in pareto_front(ts, maximise)) == [0, 1, 4]
    # the same student below the threshold (CONSTANT_SHARE = 0.95) is a trade-off like any other
    ts[3].user_attrs["top_share"] = {"sst2": 0.9}
    assert sorted(t.number for t in pareto_front(ts, maximise)) == [0, 1, 3, 4]


def test_sweep_with_two_workers_records_failures_and_reports(tmp_path, teacher_dir):
    # the enqueued first point has an impossible layer map: that trial fails, the sweep goes on; the second
    # enqueued point is a sound one (the random draws of the other two may both be the impossible map)
    path = write_sweep(tmp_path, teacher_dir, n_trials=4, workers=2,
                       enqueue=[{"compression.rank": 8, "compression.bank": 6, "stage.distill.layer_map": "[[7,7]]"},
                                {"compression.rank": 8, "compression.bank": 6, "stage.distill.layer_map": "all"}])
    spec = yaml.safe_load(path.read_text())
    spec["space"]["stage.distill.layer_map"] = "choice(all, last, [[7,7]])"
    path.write_text(yaml.safe_dump(spec))
    r = tdlight("sweep", str(path), timeout=900)
    assert r.returncode == 0, r.stderr[-4000:]
    ts = trials(tmp_path, duplicates=False)
    assert sum(counts_toward_budget(t) for t in ts) == 4 and len(ts) == 4  # the budget, exactly
    failed = [t for t in ts if t.state == TrialState.FAIL]
    assert failed and all("layer" in t.user_attrs["error"] for t in failed), [t.user_attrs for t in failed]
    done = [t for t in ts if t.state == TrialState.COMPLETE]
    assert done, r.stderr[-3000:]
    for t in done:
        assert t.values[1] == pytest.approx(t.user_attrs["ratio"]) and t.values[1] > 1
        assert 0 <= t.values[0] <= 1 and set(t.user_attrs["scores"]) == {"mrpc"}
        assert {"worker", "gpu", "host"} <= set(t.user_attrs)
        # what the user takes home, beside the paper's ratio: the whole-model ratio (priced) and the bytes
        assert 1 < t.user_attrs["model_ratio"] < t.user_attrs["ratio"] and t.user_attrs["bytes"] > 0
    # two workers, one study: every trial ran once in its own directory
    sweep = tmp_path / "sweep"
    assert sorted(p.name for p in (sweep / "trials").iterdir()) == [f"{t.number:04d}" for t in ts]
    assert {t.user_attrs["worker"] for t in ts} == {0, 1}
    # the fine-tuned teacher is computed once and shared by all trials (pipeline steps under a lock)
    assert len([p for p in (sweep / "artifacts" / "finetune").iterdir() if p.is_dir()]) == 1
    # the report: plot, Markdown table of every trial, the front printed
    assert (sweep / "pareto.png").stat().st_size > 1000
    md = (sweep / "trials.md").read_text()
    assert md.count("\n| ") == len(ts) + 1 and "failed:" in md
    # the front stars the finished students that are not constant predictors; none left: the report says so
    useful = [t for t in done if max(t.user_attrs.get("top_share", {}).values(), default=0) <= 0.95]
    assert ("★" in md) == bool(useful) and ("No Pareto front" in md) == (not useful)
    assert "Pareto front" in r.stdout
    r2 = tdlight("sweep-report", str(sweep))
    assert r2.returncode == 0 and "Pareto front" in r2.stdout, r2.stderr[-2000:]
    flat = len(done) - len(useful)  # the console says why a constant student is not on the front
    assert (f"{flat} of {len(done)} finished student(s) are constant predictors" in " ".join(r2.stdout.split())) \
        == bool(flat), r2.stdout
    # a reference point: a finished run that is not a trial (here a trial's own pipeline, read back as one)
    ref = sweep / "trials" / f"{done[0].number:04d}" / "mrpc"
    r2 = tdlight("sweep-report", str(sweep), f"reference.again={ref}")
    assert r2.returncode == 0, r2.stderr[-2000:]
    md = (sweep / "trials.md").read_text()
    row = next(line for line in md.splitlines() if line.startswith("| again |"))
    assert f"{done[0].user_attrs['ratio']:.2f}" in row and str(ref) in row and "compressed" in row
    assert f"reference again (compressed): ratio {done[0].user_attrs['ratio']:.2f}" in " ".join(r2.stdout.split())
    bad = tdlight("sweep-report", str(sweep), f"reference.peer={sweep}")
    assert bad.returncode == 2 and "has no pipeline.json or metrics.json" in bad.stderr, bad.stderr[-2000:]
    bad = tdlight("sweep-report", str(sweep), f"reference.peer={ref},{ref}")
    assert bad.returncode == 2 and "two runs on task 'mrpc'" in bad.stderr, bad.stderr[-2000:]
    # logger=wandb offline leaves a wandb/offline-run-* in each step's directory: one script uploads them all
    assert not (sweep / "wandb_sync.sh").exists()  # (logger=csv: none)
    step_dirs = [p for p in (sweep / "artifacts" / "distill").iterdir() if p.is_dir()][:2]
    for i, step in enumerate(step_dirs):
        (step / "wandb" / f"offline-run-20261205_120000-id{i}").mkdir(parents=True)
    r2 = tdlight("sweep-report", str(sweep))
    assert r2.returncode == 0, r2.stderr[-2000:]
    assert f"W&B: {len(step_dirs)} offline run(s) in this sweep; upload them all with: sh {sweep / 'wandb_sync.sh'}" \
        in " ".join(r2.stdout.split())
    script = (sweep / "wandb_sync.sh").read_text()
    assert "wandb sync" in script and all(f"'{d}/wandb/offline-run-20261205_120000-id{i}'" in script
                                          for i, d in enumerate(step_dirs))
    # rerunning a finished sweep runs nothing more
    n = len(trials(tmp_path))
    r3 = tdlight("sweep", str(path), timeout=300)
    assert r3.returncode == 0 and len(trials(tmp_path)) == n


def signal_during_second_trial(tmp_path: Path, path: Path, sig: int, sigint_ignored: bool = False) -> int:
    """Start a sweep in its own process group, send ``sig`` to the whole group (as a terminal's
    Ctrl-C does) once one trial has finished and the next one runs; return the sweep's exit code.
    ``sigint_ignored``: the sweep starts with SIGINT ignored, as a process started in the
    background by a script or CI does; otherwise with the default, whatever pytest inherited."""
    log = open(tmp_path / "sweep-under-signal.log", "wb")  # read by the callers' failure messages
    disposition = signal.SIG_IGN if sigint_ignored else signal.SIG_DFL
    proc = subprocess.Popen(sweep_cmd(path), stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, disposition))
    deadline = time.time() + 600
    try:
        while time.time() < deadline:
            time.sleep(1)
            if (tmp_path / "sweep" / "study.journal").exists():
                ts = trials(tmp_path)
                if any(t.state == TrialState.COMPLETE for t in ts) and any(t.state == TrialState.RUNNING for t in ts):
                    break
        else:
            pytest.fail("the sweep did not get to its second trial")
        time.sleep(2)
        os.killpg(proc.pid, sig)
        return proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()


def sweep_log(tmp_path: Path) -> str:
    return (tmp_path / "sweep-under-signal.log").read_text(errors="replace")[-3000:]


def test_sweep_killed_mid_trial_resumes_without_losing_or_duplicating(tmp_path, teacher_dir):
    path = write_sweep(tmp_path, teacher_dir, n_trials=3)
    # the whole sweep, trial process included, dies at once
    rc = signal_during_second_trial(tmp_path, path, signal.SIGKILL)
    assert rc == -signal.SIGKILL, sweep_log(tmp_path)
    before = {t.number: t for t in trials(tmp_path)}
    finished = {n for n, t in before.items() if t.state == TrialState.COMPLETE}
    running = [t for t in before.values() if t.state == TrialState.RUNNING]
    assert len(running) == 1
    r = tdlight("sweep", str(path), timeout=900)
    assert r.returncode == 0, r.stderr[-4000:]
    ts = trials(tmp_path)
    after = {t.number: t for t in ts}
    # finished trials are kept as they were
    assert all(after[n].state == TrialState.COMPLETE and after[n].values == before[n].values for n in finished)
    # the killed one is marked and re-queued with the same parameters
    killed = after[running[0].number]
    assert killed.state == TrialState.FAIL and killed.user_attrs[INTERRUPTED]
    retry = [t for t in ts if t.user_attrs.get("retry_of") == killed.number]
    assert len(retry) == 1 and retry[0].params == killed.params and retry[0].state == TrialState.COMPLETE
    # and the total is the budget: 3 trials that count, no more
    assert sum(counts_toward_budget(t) for t in ts) == 3
    assert sum(t.state == TrialState.COMPLETE for t in ts) == 3
    # the resumed process sampled with its own (recorded) seed, not the first process's again
    seeds = {t.user_attrs["pid"]: t.user_attrs["sampler_seed"] for t in ts if "sampler_seed" in t.user_attrs}
    assert len(seeds) == 2 and len(set(seeds.values())) == 2


def test_each_sweep_process_and_resume_samples_with_its_own_seed():
    from tdlight.sweep.runner import process_seed

    seeds = {process_seed(0, n, host, pid) for n in (0, 3) for host in ("a", "b") for pid in (1, 2)}
    assert len(seeds) == 8 and all(0 <= s < 2**31 for s in seeds)
    assert process_seed(0, 3, "a", 1) == process_seed(0, 3, "a", 1)  # reproducible from what is recorded


@pytest.mark.parametrize("sigint_ignored", [False, True], ids=["from-a-terminal", "started-in-the-background"])
def test_ctrl_c_stops_the_sweep_cleanly_and_requeues_the_running_trial(tmp_path, teacher_dir, sigint_ignored):
    path = write_sweep(tmp_path, teacher_dir, n_trials=3)
    rc = signal_during_second_trial(tmp_path, path, signal.SIGINT, sigint_ignored)
    assert rc == 130, (rc, sweep_log(tmp_path), [(t.number, t.state.name, t.params) for t in trials(tmp_path)])
    ts = trials(tmp_path)
    stopped = [t for t in ts if t.user_attrs.get(INTERRUPTED)]
    # the trial that was running is interrupted (not failed with an error, not counted) ...
    assert len(stopped) == 1 and stopped[0].state == TrialState.FAIL and "error" not in stopped[0].user_attrs
    assert not counts_toward_budget(stopped[0])
    # ... and waits, re-queued with its parameters, for the next run of the same command
    retry = [t for t in ts if t.user_attrs.get("retry_of") == stopped[0].number]
    assert len(retry) == 1 and retry[0].state == TrialState.WAITING
    assert retry[0].system_attrs["fixed_params"] == stopped[0].params  # an enqueued trial's parameters
    assert not any(t.state == TrialState.RUNNING for t in ts)


def test_resuming_with_another_search_space_is_refused(tmp_path, teacher_dir):
    path = write_sweep(tmp_path, teacher_dir)
    sw = load(path)
    (tmp_path / "sweep").mkdir()
    from omegaconf import OmegaConf

    (tmp_path / "sweep" / "sweep.yaml").write_text(OmegaConf.to_yaml(sw.cfg))
    r = tdlight("sweep", str(path), "space.compression.rank=choice(4,32)")
    assert r.returncode == 2 and "space differs" in r.stderr, r.stderr[-2000:]


def test_sweep_on_an_rdb_storage_url_runs_and_resumes(tmp_path, teacher_dir):
    # any Optuna storage URL: here SQLite (PostgreSQL is the same code path, RDBStorage with heartbeats)
    url = f"sqlite:///{tmp_path / 'study.db'}"
    path = write_sweep(tmp_path, teacher_dir, n_trials=2, storage=url)
    r = tdlight("sweep", str(path), timeout=900)
    assert r.returncode == 0, r.stderr[-4000:]
    assert not (tmp_path / "sweep" / "study.journal").exists() and (tmp_path / "study.db").stat().st_size > 0
    ran = lambda: [t for t in optuna.load_study(study_name="tiny", storage=url).get_trials()  # noqa: E731
                   if DUPLICATE not in t.user_attrs]
    ts = ran()
    assert [t.state for t in ts] == [TrialState.COMPLETE] * 2
    assert (tmp_path / "sweep" / "trials.md").is_file()
    first = [t.values for t in ts]
    # the same command with a larger budget resumes the study in the database
    r = tdlight("sweep", str(path), "sweep.n_trials=3", timeout=900)
    assert r.returncode == 0, r.stderr[-4000:]
    ts = ran()
    assert [t.state for t in ts] == [TrialState.COMPLETE] * 3 and [t.values for t in ts[:2]] == first


def test_a_point_already_finished_is_not_run_again_unless_asked(tmp_path, teacher_dir):
    # a one-point space: the first trial runs; every later sample repeats it and is pruned untrained
    path = write_sweep(tmp_path, teacher_dir, n_trials=3, max_infeasible=2)
    spec = yaml.safe_load(path.read_text())
    spec["space"] = {"compression.rank": "choice(4, 8)"}
    spec["sweep"]["enqueue"] = [{"compression.rank": 4}]
    path.write_text(yaml.safe_dump(spec))
    r = tdlight("sweep", str(path), "space.compression.rank=choice(4)")
    assert r.returncode == 0, r.stderr[-4000:]
    ts = trials(tmp_path)
    assert [t.state for t in ts] == [TrialState.COMPLETE, TrialState.PRUNED, TrialState.PRUNED], r.stderr[-3000:]
    assert [t.user_attrs.get(DUPLICATE) for t in ts] == [None, 0, 0]
    assert not any(counts_toward_budget(t) for t in ts[1:])
    assert "space may be exhausted" in r.stderr and (tmp_path / "sweep" / "trials").is_dir()
    assert sorted(p.name for p in (tmp_path / "sweep" / "trials").iterdir()) == ["0000"]
    assert "2 sampled point(s) repeated a finished trial" in (tmp_path / "sweep" / "trials.md").read_text()
    # asked for, a finished point runs again (one more trial that counts)
    r = tdlight("sweep", str(path), "space.compression.rank=choice(4)", "sweep.allow_duplicates=true",
                "sweep.n_trials=2")
    assert r.returncode == 0, r.stderr[-4000:]
    assert [t.state for t in trials(tmp_path)][3:] == [TrialState.COMPLETE]


def _sleeper(*argv: str) -> subprocess.Popen:
    """A long-lived process whose command line carries ``argv`` (as a trial's carries its directory)."""
    return subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)", *argv])


def test_rerun_stops_a_trial_process_its_dead_sweep_left_running(tmp_path, teacher_dir):
    path = write_sweep(tmp_path, teacher_dir)
    runner = Runner(load(path))
    study = optuna.create_study(study_name="tiny", storage=open_storage(None, runner.dir),
                                directions=["maximize", "maximize"])
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    orphan = _sleeper(f"hydra.run.dir={runner.dir / 'trials' / '0000' / 'mrpc'}")
    stranger = _sleeper(f"hydra.run.dir={runner.dir / 'trials' / '0007' / 'mrpc'}")  # a recycled pid
    try:
        t = study.ask({"compression.rank": optuna.distributions.CategoricalDistribution([4, 8])})
        for k, v in {"host": runner.host, "pid": dead.pid, TRIAL_PID: orphan.pid}.items():
            t.set_user_attr(k, v)
        u = study.ask({"compression.rank": optuna.distributions.CategoricalDistribution([4, 8])})
        for k, v in {"host": runner.host, "pid": dead.pid, TRIAL_PID: stranger.pid}.items():
            u.set_user_attr(k, v)
        assert runner.recover(study) == 2
        assert orphan.poll() is not None  # stopped (and reaped) before its trial was re-queued
        assert stranger.poll() is None  # its command line is not trial 1's: left alone
        ts = study.get_trials()
        assert ts[0].state == TrialState.FAIL and ts[0].user_attrs[INTERRUPTED]
        assert [x.user_attrs.get("retry_of") for x in ts[2:]] == [0, 1]
    finally:
        for p in (orphan, stranger):
            p.kill()
            p.wait()


def test_a_sweep_killed_alone_takes_its_running_trial_with_it(tmp_path, teacher_dir):
    # kill -9 of the sweep process only (not its process group): the trial must not train on
    path = write_sweep(tmp_path, teacher_dir, n_trials=3)
    spec = yaml.safe_load(path.read_text())
    spec["base"].append("stage.finetune.epochs=1000")  # a trial that would train on for many minutes
    path.write_text(yaml.safe_dump(spec))
    proc = subprocess.Popen(sweep_cmd(path), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    try:
        deadline, child = time.time() + 600, None
        while time.time() < deadline and child is None:
            time.sleep(0.5)
            if (tmp_path / "sweep" / "study.journal").exists():
                child = next((t.user_attrs[TRIAL_PID] for t in trials(tmp_path)
                              if t.state == TrialState.RUNNING and TRIAL_PID in t.user_attrs), None)
        assert child is not None, "no trial started"
        time.sleep(1)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()

        def gone() -> bool:
            try:
                return Path(f"/proc/{child}/stat").read_text().split(")")[-1].split()[0] == "Z"
            except OSError:
                return True

        deadline = time.time() + 60
        while time.time() < deadline and not gone():
            time.sleep(0.2)
        assert gone(), f"trial process {child} outlived its killed sweep"
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # anything left in the group, whatever the outcome
        except ProcessLookupError:
            pass


def test_sweep_subcommands_answer_help():
    for sub in ("sweep", "sweep-report"):
        r = tdlight(sub, "--help")
        assert r.returncode == 0 and r.stdout.startswith("usage: tdlight sweep"), (sub, r.stdout, r.stderr)
        # every sweep.* key with its default, read from the schema; the objectives by name
        for key in ("sweep.n_trials=10", "sweep.workers=1", "sweep.trial_timeout=null", "sweep.grace_period=120"):
            assert f"  {key}\n" in r.stdout, (key, r.stdout)
        assert "objectives: " in r.stdout and "score" in r.stdout.split("objectives: ")[-1]


def test_a_sweep_file_s_base_is_extended_from_the_command_line(tmp_path, teacher_dir):
    path = write_sweep(tmp_path, teacher_dir)
    file_base = list(load(path).cfg.base)
    sw = load(path, ["+base=stage.distill.lr=1e-4", "sweep.n_trials=2", "+base=stage.finetune.epochs=2"])
    assert list(sw.cfg.base) == [*file_base, "stage.distill.lr=1e-4", "stage.finetune.epochs=2"]
    assert sw.settings.n_trials == 2
    assert list(load(path, ["base=[stage.distill.lr=1e-4]"]).cfg.base) == ["stage.distill.lr=1e-4"]  # = replaces
