"""One trial: its config (Hydra compose API), its price before training, its process, its result.

A trial runs ``python -m tdlight.cli <base> <sampled params> task=<t>`` once per task of the
sweep, each in ``<sweep dir>/trials/<number>/<task>/``. All trials share
``<sweep dir>/artifacts`` as ``paths.output_dir``, so pipeline steps with the same inputs
(the fine-tuned teacher of a task, a decomposition with the same ranks) are computed once for
the whole sweep (``stage=pipeline`` reuses them, under a file lock).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

from omegaconf import DictConfig

from tdlight.config import ROOT, check_ranges, compression_spec
from tdlight.errors import TdlightError
from tdlight.model.teacher import teacher_shape
from tdlight.stages.registry import register
from tdlight.sweep.objectives import SCORE, Pricing, finite, holds, price_all
from tdlight.sweep.spec import SweepError
from tdlight.tensor.accounting import param_counts
from tdlight.tensor.spec import resolve

_compose_lock = threading.Lock()  # Hydra's GlobalHydra is process-global state


def compose(overrides: list[str]) -> DictConfig:
    """The trial's full tdlight config, composed exactly as the ``tdlight`` command would."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException


    register()
    with _compose_lock:
        try:
            with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
                cfg = hydra_compose("config", overrides=list(overrides))
        except (HydraException, OmegaConfBaseException) as e:
            msg = str(e).strip().splitlines()
            raise SweepError(f"{msg[0] if msg else type(e).__name__} (composing: {' '.join(overrides)})") from e
    try:
        check_ranges(cfg)  # as the tdlight command does: e.g. a negative learning rate never trains
    except TdlightError as e:
        raise SweepError(f"{e} (composing: {' '.join(overrides)})") from e
    return cfg


def price(cfg: DictConfig) -> dict:
    """A config's priced objectives (``objectives.Priced``: encoder and whole-model compression ratios,
    encoder parameters, ...) and its ranks, from the teacher's config.json only."""
    shape = teacher_shape(cfg.teacher.path)
    rspec = resolve(compression_spec(cfg.compression), shape)
    counts = param_counts(shape, rspec)
    return {**price_all(Pricing(cfg, shape, rspec, counts)), "rank_in": rspec.rank_in, "rank_out": rspec.rank_out,
            "bank": max(rspec.banks.values()) if rspec.banks else None, "variant": rspec.variant}


RESULTS = ("pipeline.json", "metrics.json")  # what a finished tdlight run leaves, in order of preference


def read_result(run_dir: Path) -> dict:
    """The whole result a finished tdlight run left: its ``pipeline.json``, else its ``metrics.json``
    (one with a score); the objectives read their values from it (``Measured.read``)."""
    for name in RESULTS:
        p = run_dir / name
        if p.is_file():
            d = json.loads(p.read_text())
            if holds(d, SCORE.keys):
                return d
    raise TdlightError(f"{run_dir} has no pipeline.json or metrics.json with a score (did the trial's stage train?)")


class TrialFailed(Exception):
    """A trial's process failed; the message is the tail of its log."""


# exit statuses of a process stopped by SIGINT / SIGTERM (killed by the signal, or exiting 128+n)
_INTERRUPTED = {-2, -15, 130, 143}


def run_task(cmd: list[str], run_dir: Path, env: dict, *, timeout: float | None, stop: threading.Event,
             on_wait=None, procs: set | None = None, on_start=None) -> dict:
    """Run one task of a trial as its own process; its stdout+stderr go to ``<run_dir>.log``."""
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    log_path = run_dir.parent / f"{run_dir.name}.log"
    t0 = time.monotonic()
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
        if procs is not None:
            procs.add(proc)
        if on_start:
            on_start(proc)
        try:
            while True:
                try:
                    rc = proc.wait(timeout=2.0)
                    break
                except subprocess.TimeoutExpired:
                    if on_wait:
                        on_wait()
                    if stop.is_set():
                        _stop(proc)
                        raise KeyboardInterrupt
                    if timeout and time.monotonic() - t0 > timeout:
                        _stop(proc)
                        raise TrialFailed(f"timed out after {timeout:g} s (sweep.trial_timeout)")
        except BaseException:
            if proc.poll() is None:  # e.g. the heartbeat's database went away: no trial trains on unwatched
                _stop(proc)
            raise
        finally:
            if procs is not None:
                procs.discard(proc)
    if rc != 0 and (stop.is_set() or rc in _INTERRUPTED):
        # Ctrl-C in a terminal reaches the whole process group: the child may exit on SIGINT
        # before the sweep has set `stop`. That trial was interrupted, not failed: it is re-queued.
        raise KeyboardInterrupt
    if rc != 0:
        raise TrialFailed(f"exit code {rc}: {_tail(log_path)}")
    res = read_result(run_dir)
    score = SCORE.read(res)
    if not finite(score):
        raise TrialFailed(f"the score is {score} (diverged)")
    return res


def _stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def _tail(path: Path, lines: int = 4) -> str:
    """The informative end of a failed trial's log: its error line(s), else its last lines."""
    text = [ln for ln in path.read_text(errors="replace").strip().splitlines()
            if ln.strip() and "HYDRA_FULL_ERROR" not in ln and not ln.startswith("See https://hydra.cc")]
    errs = [ln for ln in text if ln.startswith("tdlight: error") or ln.split(":")[0].endswith(("Error", "Exception"))]
    picked = errs[-2:] if errs else text[-lines:]
    while len(picked) > 1 and len(" | ".join(picked)) > 1500:
        picked = picked[1:]  # the last line stays whole: it says what went wrong (runner.error_summary)
    return " | ".join(picked)


SWEEP_PID = "TDLIGHT_SWEEP_PID"  # environment of a trial process: the pid of the sweep that started it
_PR_SET_PDEATHSIG = 1


def die_with_sweep() -> None:
    """Called first thing in a trial process: have the kernel send it SIGTERM when the sweep that
    started it dies, even by ``kill -9`` (Linux ``PR_SET_PDEATHSIG``), so that no trial trains on
    unsupervised. Set in the child itself: a ``preexec_fn`` is unsafe with the sweep's threads."""
    parent = os.environ.pop(SWEEP_PID, None)  # not inherited by the trial's own children
    if parent is None or not sys.platform.startswith("linux"):
        return  # elsewhere the next run of the sweep stops an orphan (stop_orphan)
    import ctypes
    import signal

    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0) != 0:
        return
    if os.getppid() != int(parent):  # the sweep died before the request took effect
        os.kill(os.getpid(), signal.SIGTERM)


def stop_orphan(pid: int, trial_dir: Path, grace: float = 30.0) -> bool:
    """Stop process ``pid`` if it is still a task process of the trial in ``trial_dir`` (its
    command line names that directory: a recycled pid is left alone). True if one was stopped."""
    import signal

    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
    except OSError:
        return False  # gone (or no /proc: nothing to check it against, leave it)
    if str(trial_dir) not in cmdline:
        return False
    try:
        os.kill(pid, signal.SIGTERM)
        t0 = time.monotonic()
        while Path(f"/proc/{pid}").exists() and time.monotonic() - t0 < grace:
            if _reap(pid):
                break
            time.sleep(0.1)
        else:
            if Path(f"/proc/{pid}").exists():
                os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    return True


def _reap(pid: int) -> bool:
    """True once ``pid`` has exited: reaped if it is our child, or a zombie of someone else's."""
    try:
        return os.waitpid(pid, os.WNOHANG)[0] == pid
    except ChildProcessError:
        try:
            return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] == "Z"
        except OSError:
            return True


def command(overrides: list[str]) -> list[str]:
    return [sys.executable, "-m", "tdlight.cli", *overrides]


def environment(gpu: str | None, threads: int) -> dict:
    """A trial's environment: pinned to one GPU, or to its share of the CPU cores."""
    env = dict(os.environ)
    if gpu is not None:
        env["CUDA_VISIBLE_DEVICES"] = str(gpu)
    env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(threads)
    env["TOKENIZERS_PARALLELISM"] = "false"
    env[SWEEP_PID] = str(os.getpid())  # the trial dies with this sweep (die_with_sweep)
    return env
