"""``tdlight sweep``: an Optuna study driven trial by trial, each trial its own tdlight process.

Why not ``hydra-optuna-sweeper``: its release pins optuna<3 (whose RDB storage breaks under
SQLAlchemy 2), runs trials in blocking batches, cannot resume and dies with one bad trial.
Here Optuna's ask/tell API drives ``sweep.workers`` independent worker threads on one
shared study; each trial is a subprocess (so DDP inside a trial works, and a crash or a
NaN is recorded as that trial's failure). Optuna provides the samplers, the storage (a
journal file by default, any RDB URL to share a study between machines) and the atomic
hand-out of queued trials; this module adds what Optuna leaves to the caller: the trial
budget across restarts, re-queuing interrupted trials, GPU pinning and the constraint check
before training.
"""

from __future__ import annotations

import logging
import os
import re
import signal
import threading
import time
import warnings
from datetime import datetime
from pathlib import Path

import optuna
from omegaconf import OmegaConf
from optuna.trial import TrialState

from tdlight.errors import TdlightError
from tdlight.files import atomic_write_text
from tdlight.stages.loggers import wandb_offline
from tdlight.sweep import trial as T
from tdlight.sweep.objectives import OBJECTIVES, READINGS, SCORE, finite, lookup, measured_values
from tdlight.sweep.spec import Sweep, SweepError, override, sampler
from tdlight.sweep.storage import (first_line, has_heartbeat, heartbeat, heartbeats_enabled, host_id, open_storage,
                                   storage_name, stored_url)

log = logging.getLogger("tdlight.sweep")
INTERRUPTED = "interrupted"  # user attr: the trial was stopped by Ctrl-C / a killed sweep; a copy is re-queued
SURPLUS = "surplus"  # user attr: asked after the budget was full (machines racing); not run, not counted
INFEASIBLE = "infeasible"  # user attr on PRUNED trials: the constraint it violates; not trained, not counted
TRIAL_PID = "trial_pid"  # user attr: the running task process of the trial (stopped if its sweep died)
DUPLICATE = "duplicate_of"  # user attr on PRUNED trials: the finished trial with the same point; not trained
# user attr on FAIL trials found RUNNING with no sweep process recorded (no host: a process that died between
# ask and recording itself, or an older tdlight): why it was failed, and whether it was re-queued; not counted
ABANDONED = "abandoned"
SAVED = "sweep.yaml"
IDENTITY_ATTR = "tdlight_sweep"  # study user attr: the definition (IDENTITY parts) that created the study
# the parts of a sweep that define its study: a rerun must not change them
IDENTITY = ("tasks", "base", "space")


def counts_toward_budget(t: optuna.trial.FrozenTrial) -> bool:
    if t.state == TrialState.COMPLETE:
        return True
    if t.state == TrialState.FAIL:
        # our failures always carry "error"; a FAIL without it was failed by the storage's heartbeat check
        return "error" in t.user_attrs and not t.user_attrs.get(INTERRUPTED) and not t.user_attrs.get(SURPLUS)
    return False


class Runner:
    def __init__(self, sweep: Sweep):
        self.sweep = sweep
        self.s = sweep.settings
        self.dir = sweep.directory()
        self.lock = threading.Lock()  # ask/tell and budget checks within this process
        self.stop = threading.Event()
        self.procs: set = set()
        self.skipped_streak = 0  # samples in a row not trained: infeasible, or a point already finished
        self.host, self.pid = host_id(), os.getpid()
        self.waiting_logged = False

    # --- set-up, all before any trial runs -------------------------------------------
    def prepare(self) -> optuna.Study:
        sw = self.sweep
        self._check_saved()
        # every key, value type and task is checked by composing the config, one part at a time so
        # that the error names the culprit
        T.compose(list(sw.cfg.base))
        probe = [override(k, _extremes(d)[0]) for k, d in sw.space.items()]  # a representative point
        for k, d in sw.space.items():
            for v in _extremes(d):  # both ends of a range: its values are range-checked too
                try:
                    T.compose([*sw.cfg.base, override(k, v)])
                except SweepError as e:
                    raise SweepError(f"search space key {k!r}: {e}") from e
        for task in sw.cfg.tasks:
            T.price(T.compose([*sw.cfg.base, *probe, f"task={task}"]))
        for point in self.s.enqueue:
            unknown = sorted(set(point) - set(sw.space))
            if unknown:
                raise SweepError(f"sweep.enqueue point {dict(point)} sets {unknown}, which are not in the search space "
                                 f"{sorted(sw.space)}")
            # a point outside its range would crash the worker inside study.ask (the trial left running)
            for k, v in point.items():
                if not _in_space(sw.space[k], v):
                    raise SweepError(f"sweep.enqueue point {dict(point)}: {k}={v!r} is outside the search space; "
                                     f"valid: {_describe(sw.space[k])}")
            try:
                T.compose([*sw.cfg.base, *(override(k, v) for k, v in point.items())])  # range-checked like a trial
            except SweepError as e:
                raise SweepError(f"sweep.enqueue point {dict(point)}: {e}") from e
        storage = open_storage(self.s.storage, self.dir, heartbeat_interval=self.s.heartbeat_interval,
                               grace_period=self.s.grace_period)
        where = storage_name(self.s.storage, self.dir)
        try:
            study = optuna.create_study(study_name=self.s.name, storage=storage, directions=sw.directions,
                                        sampler=sampler(sw), load_if_exists=True)
        except ValueError as e:
            raise SweepError(f"study {self.s.name!r} in {where}: {e}") from e
        except Exception as e:  # noqa: BLE001 - the database went away or refused: one clear line
            raise SweepError(f"study {self.s.name!r} in {where}: {first_line(e, self.s.storage or '')}") from e
        if [d.name.lower() for d in study.directions] != sw.directions:
            raise SweepError(f"study {self.s.name!r} exists with directions {[d.name.lower() for d in study.directions]}; "
                             f"this sweep asks for {sw.directions}. Use a new sweep.name or sweep.dir")
        self._check_identity(study, where)
        with warnings.catch_warnings():  # (metric names are "experimental" in Optuna 5)
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            if study.metric_names != sw.objectives:  # optuna-dashboard and Optuna's plots name the objectives
                study.set_metric_names(list(sw.objectives))
        if not study.trials:
            for point in self.s.enqueue:
                study.enqueue_trial(dict(point))
        # a fixed seed would replay the same points after every resume, and in every process on one
        # study: each process (and each resume) gets its own, recorded on its trials
        self.sampler_seed = process_seed(self.s.sampler.seed, len(study.trials), self.host, self.pid)
        study.sampler = sampler(sw, self.sampler_seed)
        log.info("sampler %s seeded %d (sweep.sampler.seed %d, %d trials in the study, %s:%d)", self.s.sampler.name,
                 self.sampler_seed, self.s.sampler.seed, len(study.trials), self.host, self.pid)
        self._save()
        return study

    def _check_saved(self) -> None:
        saved = self.dir / SAVED
        if not saved.is_file():
            return
        old = OmegaConf.load(saved)
        for key in IDENTITY:
            a = OmegaConf.to_container(old.get(key), resolve=True)
            b = OmegaConf.to_container(self.sweep.cfg.get(key), resolve=True)
            if a != b:
                raise SweepError(f"{self.dir} holds a sweep whose {key} differs ({a} vs {b}); resuming it with another "
                                 "definition would mix two studies. Use a new sweep.name or sweep.dir")

    def _check_identity(self, study: optuna.Study, where: str) -> None:
        """The study remembers the definition that created it (tasks, base, space): a sweep process on
        any host with another definition is refused before it writes anything — the local
        ``sweep.yaml`` check cannot see a study shared through a database."""
        mine = {k: OmegaConf.to_container(self.sweep.cfg.get(k), resolve=True) for k in IDENTITY}
        theirs = study.user_attrs.get(IDENTITY_ATTR)
        if theirs is None:
            study.set_user_attr(IDENTITY_ATTR, mine)  # a new study (or one from before this check)
            return
        for key in IDENTITY:
            if theirs.get(key) != mine[key]:
                raise SweepError(f"study {self.s.name!r} in {where} was created by another sweep definition: its {key} "
                                 f"differs ({theirs.get(key)} vs {mine[key]}); sharing the study would mix two searches. "
                                 "Use a new sweep.name")

    def _save(self) -> None:
        """``sweep.yaml``: the definition, to resume and report from (and to share between hosts); a
        storage URL's password is never written (see ``stored_url``)."""
        self.dir.mkdir(parents=True, exist_ok=True)
        cfg = OmegaConf.to_container(self.sweep.cfg, resolve=False)
        url = cfg["sweep"]["storage"]
        note = ""
        if url and stored_url(url) != url:
            cfg["sweep"]["storage"] = stored_url(url)
            note = ("# sweep.storage: its password is not stored. libpq reads it from PGPASSWORD, ~/.pgpass or "
                    "PGSERVICE;\n# or give the URL again: tdlight sweep-report <dir> sweep.storage=<url>\n")
        atomic_write_text(self.dir / SAVED, note + OmegaConf.to_yaml(OmegaConf.create(cfg)))

    def recover(self, study: optuna.Study) -> int:
        """Trials left RUNNING by a sweep process of this machine that is gone: failed, re-queued.
        A trial process that outlived its sweep (it should not: see ``trial.die_with_sweep``) is
        stopped first, so that the retry never waits on its locks or adopts its half-done work."""
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            optuna.storages.fail_stale_trials(study)  # RDB storages: stale heartbeats (any machine)
        n = 0
        for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            if t.user_attrs.get("host") is None:
                n += self._recover_hostless(study, t)
            elif t.user_attrs.get("host") == self.host and not _alive(t.user_attrs.get("pid")):
                orphan = t.user_attrs.get(TRIAL_PID)
                if orphan and T.stop_orphan(int(orphan), self.trial_dir(t.number)):
                    log.warning("trial %d: stopped its process %s, left running by a sweep that died", t.number, orphan)
                self._interrupt(study, t.number, t._trial_id, t.params)
                n += 1
        if n:
            log.info("re-queued %d interrupted trial(s)", n)
        return n

    def _recover_hostless(self, study: optuna.Study, t: optuna.trial.FrozenTrial) -> int:
        """A RUNNING trial with no host recorded. Every sweep process records its host on a trial right
        after asking for it, and beats for it on storages with heartbeats: one without a host and without
        a heartbeat, older than ``sweep.grace_period``, has no live process (here or on any host) — its
        process died in between (or was an older tdlight that crashed inside ``study.ask``). It is failed
        (not counted) and its point, if it was one asked for and lies in the space, re-queued."""
        age = (datetime.now() - t.datetime_start).total_seconds() if t.datetime_start else float("inf")
        if age <= self.s.grace_period or has_heartbeat(study, t._trial_id):
            return 0  # a process may be between ask and recording its host; a beating one is Optuna's to judge
        point = t.system_attrs.get("fixed_params") or (t.params if set(t.params) == set(self.sweep.space) else {})
        outside = {k: v for k, v in point.items() if k not in self.sweep.space or not _in_space(self.sweep.space[k], v)}
        why = "left running with no sweep process recorded (no host)"
        if point and not outside:
            why += "; its point was re-queued"
        elif outside:
            why += f"; its point {point} is outside the search space: not re-queued"
        else:
            why += " before its point was sampled"
        self._interrupt(study, t.number, t._trial_id, point, {ABANDONED: why}, requeue=bool(point) and not outside)
        log.warning("trial %d: %s", t.number, why)
        return 1

    def _interrupt(self, study: optuna.Study, number: int, trial_id: int, params: dict, attrs: dict | None = None,
                   requeue: bool = True) -> None:
        storage = study._storage
        try:
            for k, v in (attrs or {INTERRUPTED: True}).items():
                storage.set_trial_user_attr(trial_id, k, v)
            storage.set_trial_state_values(trial_id, TrialState.FAIL)
        except optuna.exceptions.UpdateFinishedTrialError:
            return
        if requeue:
            study.enqueue_trial(params, user_attrs={"retry_of": number}, skip_if_exists=False)

    def trial_dir(self, number: int) -> Path:
        return self.dir / "trials" / f"{number:04d}"

    # --- the budget --------------------------------------------------------------------
    def _progress(self, study: optuna.Study) -> str:
        """``N/M trials done, about T left``: the trials that count toward the budget (every sweep
        process's), and the time left at this process's pace so far (wall time per trial it finished,
        its workers together)."""
        done = sum(1 for t in study.get_trials(deepcopy=False) if counts_toward_budget(t))
        text = f"{done}/{self.s.n_trials} trials done"
        left = self.s.n_trials - done
        if left > 0 and self.finished_here:
            secs = (time.time() - self.started) / self.finished_here * left
            text += f", about {secs / 60:.0f} min left" if secs >= 90 else f", about {secs:.0f} s left"
        return text

    def _used(self, study: optuna.Study, below: int | None = None) -> int:
        ts = study.get_trials(deepcopy=False)
        return sum(1 for t in ts if (below is None or t.number < below)
                   and (counts_toward_budget(t) or t.state == TrialState.RUNNING))

    # --- workers -------------------------------------------------------------------------
    def _gpus(self) -> list[str] | None:
        if self.s.gpus is not None:
            return [str(g) for g in self.s.gpus] or None
        vis = os.environ.get("CUDA_VISIBLE_DEVICES")
        if vis is not None:
            return [g for g in vis.split(",") if g.strip()] or None
        try:
            import torch

            n = torch.cuda.device_count()
        except Exception:  # noqa: BLE001 - no usable CUDA means CPU trials
            n = 0
        return [str(i) for i in range(n)] or None

    def _others_running(self, study: optuna.Study) -> list[optuna.trial.FrozenTrial]:
        """Trials another sweep process is running whose fate this one can learn: on this host (a dead
        process is seen by its pid) or anywhere when the storage records heartbeats."""
        beats = heartbeats_enabled(study)
        return [t for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
                if (t.user_attrs.get("host"), t.user_attrs.get("pid")) != (self.host, self.pid)
                and (beats or t.user_attrs.get("host") == self.host)]

    def worker(self, study: optuna.Study, index: int, gpu: str | None, threads: int, held: dict | None = None) -> None:
        """Ask for trials and run them until the budget is spoken for. ``held["trial"]``: the trial this
        worker holds, which ``_guard`` fails if the worker dies of an exception."""
        held = {} if held is None else held
        while not self.stop.is_set():
            with self.lock:
                full = self._used(study) >= self.s.n_trials
                others = self._others_running(study) if full else []
                if full and not others:
                    return
            if full:
                # the budget is spoken for, partly by trials of other processes: if one of them dies
                # its trial is re-queued (recover) and this process runs it
                if not self.waiting_logged:
                    log.info("budget reached with %d trial(s) of other sweep processes running (%s): waiting for "
                             "them to finish, or to be re-queued if their process is gone", len(others),
                             ", ".join(f"{t.number} on {t.user_attrs.get('host')}" for t in others))
                    self.waiting_logged = True
                self.stop.wait(max(1.0, min(10.0, self.s.heartbeat_interval)))
                with self.lock:
                    self.recover(study)
                continue
            with self.lock:
                if self.skipped_streak >= self.s.max_infeasible:
                    log.error("%d samples in a row were not trained (they violate the constraints %s or repeat a "
                              "finished point: the space may be exhausted); stopping this worker",
                              self.skipped_streak, [str(c) for c in self.sweep.constraints])
                    return
                self.recover(study)  # a dead process's trial is re-queued, and handed out first
                trial = study.ask()
                held["trial"] = trial  # from here, an exception in this worker fails the trial (_guard)
                if heartbeats_enabled(study):  # alive from the start: a trial that never beats is never reaped
                    study._storage.record_heartbeat(trial._trial_id)
                for k, v in {"host": self.host, "pid": self.pid, "worker": index, "gpu": gpu,
                             "sampler_seed": self.sampler_seed}.items():
                    trial.set_user_attr(k, v)
                # what study.ask(space) does, once the trial names its process: an enqueued point the
                # space cannot hold fails here, and the trial is failed, not left running forever
                for name, dist in self.sweep.space.items():
                    trial._suggest(name, dist)
                same = None if self.s.allow_duplicates else _finished_twin(study, trial)
                if same is not None:
                    # samplers repeat points of a small discrete space; a point finished or being run (here
                    # or by another process) is not run again
                    trial.set_user_attr(DUPLICATE, same)
                    self._tell(study, trial, state=TrialState.PRUNED)
                    self.skipped_streak += 1
                    log.info("trial %d: %s is trial %d's: not run again (sweep.allow_duplicates=true "
                             "runs it)", trial.number, trial.params, same)
                    continue
            if self._used(study, below=trial.number) >= self.s.n_trials:  # another machine filled the budget
                trial.set_user_attr(SURPLUS, True)
                with self.lock:
                    self._tell(study, trial, state=TrialState.FAIL)
                if "retry_of" in trial.user_attrs:
                    study.enqueue_trial(trial.params, user_attrs=dict(trial.user_attrs), skip_if_exists=False)
                return
            try:
                self._run(study, trial, gpu, threads)
            except optuna.exceptions.UpdateFinishedTrialError:
                _lost_warning(trial.number)

    def _run(self, study: optuna.Study, trial: optuna.Trial, gpu: str | None, threads: int) -> None:
        sw = self.sweep
        params = [override(k, v) for k, v in trial.params.items()]
        tdir = self.trial_dir(trial.number)
        t0 = time.time()
        try:
            cfg = T.compose([*sw.cfg.base, *params, f"task={sw.cfg.tasks[0]}"])
            price = T.price(cfg)
        except TdlightError as e:
            self._fail(study, trial, str(e))
            return
        for k, v in price.items():
            trial.set_user_attr(k, v)
        broken = [c for c in sw.constraints if not c.ok(price[c.key])]
        if broken:
            trial.set_user_attr(INFEASIBLE, ", ".join(str(c) for c in broken))
            with self.lock:
                self.skipped_streak += 1
                self._tell(study, trial, state=TrialState.PRUNED)
            log.info("trial %d: %s violates %s: not trained", trial.number,
                     ", ".join(f"{c.key} {OBJECTIVES[c.key].format(price[c.key])}" for c in broken),
                     [str(c) for c in broken])
            return
        with self.lock:
            self.skipped_streak = 0
        log.info("trial %d: %s (ratio %.1f)%s", trial.number, " ".join(params), price["ratio"],
                 f" on GPU {gpu}" if gpu is not None else "")
        tags = [f"trial-{trial.number}", f"ratio={price['ratio']:.1f}", f"d={price['rank_in']}x{price['rank_out']}"]
        if price["bank"]:
            tags.append(f"k={price['bank']}")
        env = T.environment(gpu, threads)
        beat = heartbeat(study, trial)
        results: dict[str, dict] = {}  # task -> the whole result its process left (pipeline.json / metrics.json)
        per_task: dict[str, float] = {}  # task -> its score
        task_seconds = 0.0  # the trial's own processes; the rest of its time is the sweep's bookkeeping
        try:
            for task in sw.cfg.tasks:
                run_dir = tdir / task
                overrides = [*sw.cfg.base, *params, f"task={task}", f"paths.output_dir={self.dir / 'artifacts'}",
                             f"hydra.run.dir={run_dir}", f"logger.group={self.s.name}",
                             "logger.trial_tags=[" + ",".join(f"'{t}'" for t in tags) + "]"]
                started = time.monotonic()
                res = T.run_task(T.command(overrides), run_dir, env, timeout=self.s.trial_timeout, stop=self.stop,
                                 on_wait=beat, procs=self.procs,
                                 on_start=lambda p: trial.set_user_attr(TRIAL_PID, p.pid))
                task_seconds += time.monotonic() - started
                results[task] = res
                per_task[task] = SCORE.read(res)
        except KeyboardInterrupt:
            with self.lock:
                self._interrupt(study, trial.number, trial._trial_id, trial.params)
            return
        except T.TrialFailed as e:
            self._fail(study, trial, str(e), per_task)
            return
        except Exception as e:  # noqa: BLE001 - a broken trial must not take the sweep down
            log.exception("trial %d", trial.number)
            self._fail(study, trial, f"{type(e).__name__}: {e}", per_task)
            return
        # every registered objective's value: priced from the config, or read from each task's result
        measured = measured_values(results)
        values = {o.name: price[o.name] if o.priced else o.combine(measured[o.name]) for o in OBJECTIVES.values()}
        missing = [o for o in sw.strategies if values[o.name] is None]
        if missing:
            needs = "; ".join(o.needs for o in missing if getattr(o, "needs", ""))
            self._fail(study, trial, f"objective(s) {[o.name for o in missing]} not produced by this trial's stage"
                                     + (f" ({needs})" if needs else ""), per_task)
            return
        broken = {o.name: values[o.name] for o in sw.strategies if not finite(values[o.name])}
        if broken:
            self._fail(study, trial, f"objective(s) {broken} not finite", per_task)
            return
        for o in OBJECTIVES.values():
            kept = None if o.priced else o.record(measured[o.name])  # priced ones are recorded with the price
            if kept is not None:
                trial.set_user_attr(o.key, kept)
        for name, keys in READINGS.items():
            got = {task: v for task, r in results.items() if (v := lookup(r, keys)) is not None}
            if got:
                trial.set_user_attr(name, got)
        trial.set_user_attr("seconds", time.time() - t0)
        trial.set_user_attr("task_seconds", task_seconds)
        with self.lock:
            self._tell(study, trial, [values[o] for o in sw.objectives])
            self.finished_here += 1
            progress = self._progress(study)
        log.info("trial %d: %s (%s); %s", trial.number,
                 " ".join(f"{o.name} {o.format(values[o.name])}" for o in sw.strategies),
                 ", ".join(f"{t} {s:.4f}" for t, s in per_task.items()), progress)
        self._wandb_summary(cfg, trial, price, per_task, values, tags, tdir)

    @staticmethod
    def _tell(study: optuna.Study, trial: optuna.Trial, values=None, state=None) -> None:
        try:
            study.tell(trial, values, state=state)
        except optuna.exceptions.UpdateFinishedTrialError:
            _lost_warning(trial.number)

    def _fail(self, study, trial, error: str, per_task: dict | None = None) -> None:
        trial.set_user_attr("error", error if len(error) <= 2000 else error_summary(error))
        if per_task:
            trial.set_user_attr(SCORE.key, per_task)
        with self.lock:
            self._tell(study, trial, state=TrialState.FAIL)
        log.warning("trial %d failed: %s", trial.number, error_summary(error))

    def _wandb_summary(self, cfg, trial, price, per_task, values, tags, tdir: Path) -> None:
        """One W&B run per trial (group = the sweep), for side-by-side comparison in the W&B UI."""
        if not cfg.logger.wandb:
            return
        try:
            import wandb

            with self.lock:
                run = wandb.init(project=cfg.logger.project, entity=cfg.logger.entity, group=self.s.name,
                                 job_type="trial", name=f"{self.s.name}/trial-{trial.number}",
                                 tags=[*tags, f"score={values['score']:.3f}"], dir=str(tdir),
                                 config={**trial.params, **price}, reinit="create_new",
                                 mode="offline" if wandb_offline(cfg.logger) else "online")
                run.summary.update({**{k: v for k, v in values.items() if v is not None},
                                    **{f"score/{t}": s for t, s in per_task.items()}})
                run.finish()
        except Exception as e:  # noqa: BLE001 - W&B trouble never fails a finished trial
            log.warning("trial %d: W&B summary run not written: %s", trial.number, e)

    # --- the whole sweep ---------------------------------------------------------------------
    def run(self) -> optuna.Study:
        study = self.prepare()
        self.recover(study)
        gpus = self._gpus()
        workers = self.s.workers
        threads = self.s.threads or max(1, (os.cpu_count() or 1) // (1 if gpus else workers))
        if gpus and workers > len(gpus):
            log.warning("%d workers share %d GPU(s)", workers, len(gpus))
        done = self._used(study)
        self.started, self.finished_here = time.time(), 0
        log.info("sweep %s in %s: %d/%d trials done, %d worker(s)%s", self.s.name, self.dir, done, self.s.n_trials,
                 workers, f" on GPUs {gpus}" if gpus else f", {threads} CPU thread(s) each")
        self.crashes: list[str] = []
        finished = [threading.Event() for _ in range(workers)]
        pool = [threading.Thread(target=self._guard, args=(study, i, gpus[i % len(gpus)] if gpus else None, threads,
                                                           finished[i]),
                                 name=f"sweep-worker-{i}", daemon=True) for i in range(workers)]
        # The main thread waits by polling events with sleep, not Thread.join: a Ctrl-C that lands
        # inside join() marks a still-running thread as finished on CPython < 3.13, and the sweep
        # would exit before its workers had re-queued their trials.
        previous = signal.signal(signal.SIGTERM, _as_interrupt)
        # SIGINT explicitly too: a process started in the background by a non-interactive shell
        # (`cmd &` in a script, nohup, CI) inherits SIGINT *ignored*, and Python then installs no
        # KeyboardInterrupt for it — `kill -INT` would leave the sweep and its trials running
        previous_int = signal.signal(signal.SIGINT, signal.default_int_handler)
        try:
            for p in pool:
                p.start()
            _wait_all(finished)
        except KeyboardInterrupt:
            self.stop.set()
            _wait_all(finished)
            raise
        finally:
            signal.signal(signal.SIGTERM, previous)
            signal.signal(signal.SIGINT, previous_int)
        if self.crashes:
            raise WorkerCrashed("; ".join(self.crashes) + f". Rerun the same command to go on ({self.dir})")
        return study

    def _guard(self, study, index, gpu, threads, done: threading.Event) -> None:
        held: dict = {}
        try:
            self.worker(study, index, gpu, threads, held)
        except Exception as e:  # noqa: BLE001 - logged, its trial failed; the other workers go on, the sweep exits 1
            log.exception("sweep worker %d stopped", index)
            error = f"the sweep worker stopped: {type(e).__name__}: {e}"
            number = self._fail_held(study, held.get("trial"), error)
            self.crashes.append(f"sweep worker {index} stopped by {type(e).__name__}: {e}"
                                + (f" (its trial {number} is marked failed)" if number is not None else ""))
        finally:
            done.set()

    def _fail_held(self, study: optuna.Study, trial: optuna.Trial | None, error: str) -> int | None:
        """Fail the trial a dying worker held, if still RUNNING (else ``recover`` finds it later); its number."""
        if trial is None:
            return None
        storage = study._storage
        try:
            with self.lock:
                if storage.get_trial(trial._trial_id).state != TrialState.RUNNING:
                    return None
                storage.set_trial_user_attr(trial._trial_id, "error", error[-2000:])
                storage.set_trial_state_values(trial._trial_id, TrialState.FAIL)
        except Exception as e:  # noqa: BLE001 - the storage itself failed: the next run's recover() handles it
            log.warning("trial %d could not be marked failed (%s): the next run of the sweep re-queues it",
                        trial.number, e)
            return None
        return trial.number


class WorkerCrashed(TdlightError):
    """A sweep worker died of an exception (its trial was marked failed): the sweep exits 1."""


def error_summary(error: str) -> str:
    """The part of a trial's error worth a line: its exit code and its last meaningful line, whole — the
    last ``tdlight: error:`` line if any (a trial's error is its log's error lines joined by `` | ``)."""
    head, rest = "", error.strip()
    m = re.match(r"(exit code -?\d+): ", rest)
    if m:
        head, rest = m.group(0), rest[m.end():]
    parts = [p.strip() for p in re.split(r" \| |\n", rest) if p.strip()]
    if not parts:
        return error.strip()
    return head + next((p for p in reversed(parts) if p.startswith("tdlight: error:")), parts[-1])


def _wait_all(events: list[threading.Event]) -> None:
    while not all(e.is_set() for e in events):
        time.sleep(0.2)


def _finished_twin(study: optuna.Study, trial: optuna.Trial) -> int | None:
    """The number of a finished trial with ``trial``'s point — or of an earlier one running it (in
    any sweep process: of two processes that sample one point at once, the later trial yields) —
    unless the point was enqueued (asked for)."""
    if study._storage.get_trial(trial._trial_id).system_attrs.get("fixed_params"):
        return None
    for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.RUNNING)):
        if t.params == trial.params and (t.state == TrialState.COMPLETE or t.number < trial.number):
            return t.number
    return None


def _in_space(d: optuna.distributions.BaseDistribution, value) -> bool:
    """Whether ``value`` is one the distribution can take (choices, range and step)."""
    if isinstance(d, optuna.distributions.CategoricalDistribution):
        return value in d.choices
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    if not d.low <= value <= d.high:
        return False
    if isinstance(d, optuna.distributions.IntDistribution) and value != int(value):
        return False
    step = getattr(d, "step", None)
    return step is None or abs((value - d.low) / step - round((value - d.low) / step)) < 1e-8


def _describe(d: optuna.distributions.BaseDistribution) -> str:
    if isinstance(d, optuna.distributions.CategoricalDistribution):
        return f"one of {list(d.choices)}"
    step = getattr(d, "step", None)
    return (f"{'an integer' if isinstance(d, optuna.distributions.IntDistribution) else 'a number'} in "
            f"[{d.low}, {d.high}]" + (f" in steps of {step}" if step else ""))


def _lost_warning(number: int) -> None:
    # another sweep process declared the trial lost (its heartbeats stopped for longer than
    # sweep.grace_period: a stalled machine) and re-queued it; the retry's result counts
    log.warning("trial %d was declared lost by another sweep process while it ran (no heartbeat for "
                "sweep.grace_period); its result is dropped and its re-queued copy counts", number)



def process_seed(seed: int, n_trials: int, host: str, pid: int) -> int:
    """The sampler seed of one sweep process: ``sweep.sampler.seed`` mixed with the number of trials
    already in the study and the process identity (reproducible from the values recorded)."""
    import hashlib

    digest = hashlib.sha256(f"{seed}:{n_trials}:{host}:{pid}".encode()).digest()
    return int.from_bytes(digest[:4], "big") & 0x7FFFFFFF


def _extremes(dist: optuna.distributions.BaseDistribution) -> list:
    """Every value of a categorical distribution, both bounds of a numeric one."""
    if isinstance(dist, optuna.distributions.CategoricalDistribution):
        return list(dist.choices)
    return [dist.low, dist.high]


def _alive(pid) -> bool:
    if not pid:
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True



def _as_interrupt(signum, frame):
    raise KeyboardInterrupt
