"""One sweep shared by several hosts through PostgreSQL, against a real server (tests/postgres.py).

Two sweep processes stand in for two hosts: each gets its own ``TDLIGHT_HOST_ID``, so neither can
judge the other's trials by pid and only the database's heartbeats tell a dead host's trial from
a running one — as between real machines.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import optuna
import pytest
import yaml
from optuna.trial import TrialState

from tdlight.sweep.runner import DUPLICATE, IDENTITY_ATTR, counts_toward_budget
from tests.postgres import PASSWORD, PostgresServer, binaries, free_port
from tests.test_sweep import TRIAL, sweep_cmd


@pytest.fixture(scope="module")
def postgres():
    bindir = binaries()
    if bindir is None:
        pytest.skip("no PostgreSQL binaries (initdb, pg_ctl) on this machine: apt-get install postgresql")
    server = PostgresServer(bindir).start()
    try:
        yield server
    finally:
        server.stop()


def write(tmp_path: Path, teacher_dir: Path, host: str, url: str, **settings) -> Path:
    """The same sweep file as another host would hold it: its own sweep directory (no shared disk)."""
    spec = {
        "sweep": {"name": "shared", "n_trials": 5, "dir": str(tmp_path / host), "storage": url,
                  "sampler": {"name": "random", "seed": 0}, **settings},
        "tasks": ["mrpc"],
        "base": [f"teacher.path={teacher_dir}", *TRIAL],
        "space": {"compression.rank": "choice(4, 8, 16)", "compression.bank": "choice(6, 12)",
                  "stage.distill.layer_map": "choice(all, last)"},
    }
    p = tmp_path / f"{host}.yaml"
    p.write_text(yaml.safe_dump(spec))
    return p


def host_env(host: str) -> dict:
    return {**os.environ, "TDLIGHT_HOST_ID": host, "OMP_NUM_THREADS": "1"}


def study(url: str) -> optuna.Study:
    # (skip_compatibility_check: the test reads the study even after making its schema look old)
    return optuna.load_study(study_name="shared",
                             storage=optuna.storages.RDBStorage(url, skip_compatibility_check=True))


def test_two_hosts_share_one_study_and_one_finishes_what_a_killed_host_left(postgres, tmp_path, teacher_dir):
    url = postgres.new_database()
    fast = {"heartbeat_interval": 2, "grace_period": 15}  # a dead host is noticed within seconds
    logs = {h: open(tmp_path / f"{h}.log", "wb") for h in ("a", "b")}
    procs = {h: subprocess.Popen(sweep_cmd(write(tmp_path, teacher_dir, h, url, **fast)), env=host_env(h),
                                 stdout=logs[h], stderr=subprocess.STDOUT, start_new_session=True)
             for h in ("a", "b")}

    def log(h: str) -> str:
        return (tmp_path / f"{h}.log").read_text(errors="replace")[-3000:]

    try:
        # host a dies (SIGKILL to its sweep and its trial: the machine is gone) while it runs a trial,
        # once it has finished one
        deadline, victim = time.time() + 600, None
        while time.time() < deadline and victim is None:
            time.sleep(1)
            try:
                ts = study(url).get_trials()
            except KeyError:  # the study is not created yet
                continue
            mine = [t for t in ts if t.user_attrs.get("host") == "a"]
            if any(t.state == TrialState.COMPLETE for t in mine):
                victim = next((t for t in mine if t.state == TrialState.RUNNING and "trial_pid" in t.user_attrs), None)
            if procs["b"].poll() is not None or procs["a"].poll() is not None:
                break
        assert victim is not None, f"host a never ran a second trial\n{log('a')}\n{log('b')}"
        os.killpg(procs["a"].pid, signal.SIGKILL)
        procs["a"].wait()
        assert procs["b"].wait(timeout=900) == 0, log("b")
    finally:
        for p in procs.values():
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
        for f in logs.values():
            f.close()

    ts = study(url).get_trials()
    by_number = {t.number: t for t in ts}
    lost = by_number[victim.number]
    # the dead host's trial was failed by the heartbeat check (no error of its own) ...
    assert lost.state == TrialState.FAIL and "error" not in lost.user_attrs and not counts_toward_budget(lost)
    # ... re-queued with its parameters, and run to the end by the surviving host
    (retry,) = [t for t in ts if t.user_attrs.get("retry_of") == victim.number]
    assert retry.params == lost.params and retry.state == TrialState.COMPLETE and retry.user_attrs["host"] == "b"
    # the budget holds across both hosts: exactly n_trials count, all of them finished
    assert sum(counts_toward_budget(t) for t in ts) == 5
    done = [t for t in ts if t.state == TrialState.COMPLETE]
    assert len(done) == 5 and {t.user_attrs["host"] for t in done} == {"a", "b"}
    # no parameter point finished twice; no trial left running or waiting
    assert max(Counter(tuple(sorted(t.params.items())) for t in done).values()) == 1
    assert not [t for t in ts if t.state in (TrialState.RUNNING, TrialState.WAITING)]
    assert all(DUPLICATE in t.user_attrs for t in ts if t.state == TrialState.PRUNED)
    # each host kept its own artifacts (no shared disk): the report reads the database from either
    for h in ("a", "b"):
        r = subprocess.run([sys.executable, "-m", "tdlight.cli", "sweep-report", str(tmp_path / h)],
                           capture_output=True, text=True, timeout=300)
        assert r.returncode == 0 and "Pareto front" in r.stdout, r.stderr[-2000:]
        md = (tmp_path / h / "trials.md").read_text()
        assert "lost: its sweep process stopped beating (re-queued)" in md and md.count(" complete |") == 5
    assert PASSWORD not in log("b")


def test_bad_database_input_is_one_error_and_writes_nothing(postgres, tmp_path, teacher_dir):
    url = postgres.new_database()
    # a study made by one sweep file, one finished trial in it
    path = write(tmp_path, teacher_dir, "a", url, n_trials=1)
    r = subprocess.run(sweep_cmd(path), env=host_env("a"), capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    before = [(t.number, t.state, t.params) for t in study(url).get_trials()]
    attrs = study(url).user_attrs

    def refused(url_: str, *overrides: str, expect: str) -> None:
        p = write(tmp_path, teacher_dir, "b", url_, n_trials=3)
        r = subprocess.run(sweep_cmd(p, *overrides), env=host_env("b"), capture_output=True, text=True, timeout=300)
        lines = [ln for ln in r.stderr.splitlines() if ln.startswith("tdlight: error:")]
        assert r.returncode == 2 and len(lines) == 1 and expect in lines[0], r.stderr[-3000:]
        assert PASSWORD not in r.stderr + r.stdout  # a URL's password is never printed
        assert [(t.number, t.state, t.params) for t in study(url).get_trials()] == before
        assert study(url).user_attrs == attrs

    # nothing listens on that port / a wrong password / a database that does not exist
    closed = free_port()  # nothing listens there
    refused(postgres.url(url.rsplit("/", 1)[1], port=closed), expect="cannot open sweep.storage=")
    refused(postgres.url(url.rsplit("/", 1)[1], password="wrong"), expect="password authentication failed")
    refused(postgres.url("no_such_db"), expect='database "no_such_db" does not exist')
    # the same study name from another sweep file (another search space)
    refused(url, "space.compression.rank=choice(4,32)", expect="was created by another sweep definition: its space")
    assert IDENTITY_ATTR in attrs
    # a database whose schema an older Optuna wrote
    postgres.execute(url, "UPDATE alembic_version SET version_num = 'v3.0.0.a'")
    refused(url, expect="no longer compatible with the table schema")
