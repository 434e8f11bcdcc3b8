"""One sweep shared by several hosts through PostgreSQL, against a real server (tests/postgres.py).

Two sweep processes stand in for two hosts: each gets its own ``TDLIGHT_HOST_ID``, so neither can
judge the other's trials by pid and only the database's heartbeats tell a dead host's trial from
a running one — as between real machines.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
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
from tests.postgres import PASSWORD, USER, PostgresServer, binaries, free_port
from tests.conftest import tdlight
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


def host_env(host: str, **extra: str) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}  # no password but the test's own
    return {**env, "TDLIGHT_HOST_ID": host, "OMP_NUM_THREADS": "1", **extra}


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
        # (sweep.yaml keeps no password: the report's libpq takes it from PGPASSWORD)
        r = tdlight("sweep-report", str(tmp_path / h), env=host_env(h, PGPASSWORD=PASSWORD))
        assert r.returncode == 0 and "Pareto front" in r.stdout, r.stderr[-2000:]
        md = (tmp_path / h / "trials.md").read_text()
        assert "lost: its sweep process stopped beating (re-queued)" in md and md.count(" complete |") == 5
    assert PASSWORD not in log("b")


def test_bad_database_input_is_one_error_and_writes_nothing(postgres, tmp_path, teacher_dir):
    url = postgres.new_database()
    # a study made by one sweep file, one finished trial in it
    path = write(tmp_path, teacher_dir, "a", url, n_trials=1)
    r = tdlight("sweep", str(path), env=host_env("a"), timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    before = [(t.number, t.state, t.params) for t in study(url).get_trials()]
    attrs = study(url).user_attrs

    def refused(url_: str, *overrides: str, expect: str) -> None:
        p = write(tmp_path, teacher_dir, "b", url_, n_trials=3)
        r = tdlight("sweep", str(p), *overrides, env=host_env("b"), timeout=300)
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


def test_the_password_is_never_shown_or_stored_and_libpq_can_give_it(postgres, tmp_path, teacher_dir):
    url = postgres.new_database()
    bare = url.replace(f"{USER}:{PASSWORD}@", f"{USER}@")  # the same URL without its password
    path = write(tmp_path, teacher_dir, "a", url, n_trials=1)
    sweep_dir = tmp_path / "a"
    shown = []

    def run(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
        r = tdlight(*args, env=env or host_env("a"), timeout=900)  # (its output captured at fds 1 and 2)
        shown.append(r.stdout + r.stderr)
        return r

    # a password inside the URL connects ...
    r = run("sweep", str(path))
    assert r.returncode == 0, r.stderr[-3000:]
    # ... and is written nowhere: sweep.yaml keeps the URL without it (was: in plain text)
    assert yaml.safe_load((sweep_dir / "sweep.yaml").read_text())["sweep"]["storage"] == bare
    # a usage error quoting the arguments masks it (was: printed)
    r = run("sweep-report", str(sweep_dir), f"sweep.storage={url}", "extra")
    assert r.returncode == 2 and "sweep.storage=postgresql://tdlight:***@" in r.stderr, r.stderr[-2000:]
    # the report reads the stored URL; libpq gives the password from the environment (or ~/.pgpass, PGSERVICE)
    r = run("sweep-report", str(sweep_dir))
    (line,) = [ln for ln in r.stderr.splitlines() if ln.startswith("tdlight: error:")]
    assert r.returncode == 2 and "no password supplied" in line and "PGPASSWORD" in line, r.stderr[-2000:]
    r = run("sweep-report", str(sweep_dir), env=host_env("a", PGPASSWORD=PASSWORD))
    assert r.returncode == 0 and "Pareto front" in r.stdout, r.stderr[-2000:]
    r = run("sweep-report", str(sweep_dir), f"sweep.storage={url}")  # or the URL given again
    assert r.returncode == 0 and "Pareto front" in r.stdout, r.stderr[-2000:]
    # a sweep on a URL without password, the password in PGPASSWORD: connects (resumes the finished study)
    r = run("sweep", str(path), f"sweep.storage={bare}", env=host_env("a", PGPASSWORD=PASSWORD))
    assert r.returncode == 0 and "1/1 trials done" in r.stderr, r.stderr[-3000:]
    # never on the console, in any file of the sweep directory, or in the study's attributes
    assert not [out for out in shown if PASSWORD in out]
    written = [p for p in sweep_dir.rglob("*") if p.is_file() and PASSWORD.encode() in p.read_bytes()]
    assert (sweep_dir / "trials.md").is_file() and (sweep_dir / "trials").is_dir() and not written
    attrs = [study(url).user_attrs, *[t.user_attrs for t in study(url).get_trials()]]
    assert PASSWORD not in repr(attrs)


@pytest.mark.parametrize("kill_group", [False, True], ids=["the-test-process", "its-process-group"])
def test_the_test_server_dies_with_the_test_process_whatever_kills_it(kill_group):
    """A test run killed midway (a CI timeout's SIGKILL) leaves no PostgreSQL server or data directory."""
    bindir = binaries()
    if bindir is None:
        pytest.skip("no PostgreSQL binaries (initdb, pg_ctl) on this machine: apt-get install postgresql")
    script = ("import json, time; from tests.postgres import PostgresServer, binaries; "
              "s = PostgresServer(binaries()).start(); "
              "print(json.dumps([str(s.root), s.port, s.postmaster_pid()]), flush=True); time.sleep(600)")
    child = subprocess.Popen([sys.executable, "-c", script], cwd=Path(__file__).resolve().parent.parent,
                             stdout=subprocess.PIPE, text=True, start_new_session=True)
    root = port = pid = None
    try:
        root, port, pid = json.loads(child.stdout.readline())
        root = Path(root)
        assert pid and Path(f"/proc/{pid}").exists() and (root / "data").is_dir()
        with socket.create_connection(("127.0.0.1", port), timeout=5):
            pass  # the server answers
        (os.killpg if kill_group else os.kill)(child.pid, signal.SIGKILL)
        child.wait()
        deadline = time.time() + 30
        while time.time() < deadline and (_alive(pid) or root.exists() or _listening(port)):
            time.sleep(0.2)
        assert not _alive(pid) and not _listening(port) and not root.exists()
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
        if pid and _alive(pid):  # the test failed: leave nothing behind all the same
            os.kill(pid, signal.SIGKILL)
        if root is not None:
            shutil.rmtree(root, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _listening(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return True
    except OSError:
        return False
