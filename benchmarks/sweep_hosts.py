"""Sweep throughput with one vs two sweep processes on one study, and the storage's cost per trial.

    python benchmarks/sweep_hosts.py [--trials 8] [--out outputs/bench/sweep_hosts]

Starts a real PostgreSQL server from the machine's binaries (``tests/postgres.py``), builds a tiny
random BERT teacher, and runs the same sweep of tiny pipelines (the test suite's trial: fine-tune,
decompose, distill on MRPC, one CPU thread per process) three ways: one process on the default
journal file, one process on PostgreSQL, two processes on PostgreSQL (two "hosts": their own
``TDLIGHT_HOST_ID`` and sweep directory, one study). Prints a table: finished trials, wall time
from the first trial's start to the last one's end, trials per hour, and the sweep's own time per
trial — a trial's span in the study (ask to tell) minus the time its task processes ran
(``task_seconds``): composing and pricing its config plus every storage call (ask, attributes,
heartbeats, budget and duplicate checks, tell). The journal row is the baseline for that
bookkeeping; the PostgreSQL rows minus it are the database's cost per trial.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import optuna
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.conftest import save_tiny_teacher  # noqa: E402 - the suite's tiny teacher, one definition
from tests.postgres import PostgresServer, binaries  # noqa: E402
from tests.test_sweep import TRIAL  # noqa: E402
from tdlight.sweep.runner import open_storage  # noqa: E402


def sweep_file(out: Path, name: str, host: str, storage: str | None, n: int, tdir: Path) -> Path:
    spec = {"sweep": {"name": name, "n_trials": n, "dir": str(out / name / host), "storage": storage, "threads": 1,
                      "sampler": {"name": "random", "seed": 0}},
            "tasks": ["mrpc"], "base": [f"teacher.path={tdir}", *TRIAL, "logger=none"],
            "space": {"compression.rank": "choice(4, 8, 12, 16)", "compression.bank": "choice(6, 12)",
                      "stage.distill.layer_map": "choice(all, last)"}}
    p = out / f"{name}-{host}.yaml"
    p.write_text(yaml.safe_dump(spec))
    return p


def run(out: Path, name: str, storage: str | None, hosts: list[str], n: int, tdir: Path) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, "-m", "tdlight.cli", "sweep", str(sweep_file(out, name, h, storage, n, tdir))],
                              env={**env, "TDLIGHT_HOST_ID": h}, stdout=open(out / f"{name}-{h}.log", "wb"),
                              stderr=subprocess.STDOUT) for h in hosts]
    if any([p.wait() != 0 for p in procs]):  # (every process waited for before the server may stop)
        raise SystemExit(f"{name}: a sweep process failed; see {out}/{name}-*.log")
    study = optuna.load_study(study_name=name, storage=open_storage(storage, out / name / hosts[0]))
    done = [t for t in study.get_trials() if t.state == optuna.trial.TrialState.COMPLETE]
    span = (max(t.datetime_complete for t in done) - min(t.datetime_start for t in done)).total_seconds()
    own = [(t.datetime_complete - t.datetime_start).total_seconds() - t.user_attrs["task_seconds"] for t in done]
    return {"name": name, "processes": len(hosts), "done": len(done), "span": span,
            "per_hour": 3600 * len(done) / span, "own": statistics.mean(own),
            "task": statistics.mean(t.user_attrs["task_seconds"] for t in done)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trials", type=int, default=8)
    ap.add_argument("--out", default="outputs/bench/sweep_hosts")
    a = ap.parse_args()
    out = Path(a.out).resolve() / time.strftime("%Y%m%d-%H%M%S")
    out.mkdir(parents=True)
    os.environ.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1", WANDB_MODE="offline")
    bindir = binaries()
    if bindir is None:
        raise SystemExit("no PostgreSQL binaries (initdb, pg_ctl): apt-get install postgresql")
    tdir = save_tiny_teacher(out / "teacher", out)
    server = PostgresServer(bindir).start()
    try:
        rows = [run(out, "journal1", None, ["h1"], a.trials, tdir),
                run(out, "postgres1", server.new_database(), ["h1"], a.trials, tdir),
                run(out, "postgres2", server.new_database(), ["h1", "h2"], a.trials, tdir)]
    finally:
        server.stop()
    print("| storage | sweep processes | finished trials | wall (s) | trials per hour | task processes per trial (s) "
          "| sweep's own time per trial (s) |\n|---|---|---|---|---|---|---|")
    for r in rows:
        storage = "journal file" if r["name"].startswith("journal") else "PostgreSQL"
        print(f"| {storage} | {r['processes']} | {r['done']} | {r['span']:.0f} | {r['per_hour']:.1f} | {r['task']:.1f} "
              f"| {r['own']:.2f} |")


if __name__ == "__main__":
    main()
