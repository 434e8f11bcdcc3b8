"""The ``tdlight`` command: one Hydra entry point, each stage in ``tdlight.stages``.

Exit codes: 0 success; 2 bad input (an unknown or mistyped config key, an impossible
rank, a missing teacher...), with one clear message and no partial run directory left
behind; anything else is a bug and exits 1 with a traceback.
"""

from __future__ import annotations

import logging
import shutil
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from tdlight.config import ROOT, check_ranges, register
from tdlight.errors import TdlightError

log = logging.getLogger("tdlight")
RESUME_OVERRIDES = "resume_overrides.yaml"
_task_started = False


def _stages():
    from tdlight.stages import decompose, distill, evaluate, finetune, pipeline, pretrain

    return {"decompose": decompose.run, "finetune": finetune.run, "evaluate": evaluate.run,
            "pretrain": pretrain.run, "distill": distill.run, "pipeline": pipeline.run}


def _resumed_config(cfg: DictConfig) -> tuple[DictConfig, Path]:
    """``resume=<run dir>``: that run's saved config with this command's value overrides on top."""
    from tdlight.config import Config
    from tdlight.stages.common import last_checkpoint, saved_config

    src = Path(cfg.resume)
    saved = saved_config(src)
    last_checkpoint(src)  # an error, never a silent restart, when there is nothing to resume
    # overrides given at earlier resumes of this run stay in force (.hydra/resume_overrides.yaml)
    history_file = src / ".hydra" / RESUME_OVERRIDES
    earlier = list(OmegaConf.load(history_file)) if history_file.is_file() else []
    saved = OmegaConf.merge(saved, OmegaConf.from_dotlist(earlier)) if earlier else saved
    overrides = [o for o in HydraConfig.get().overrides.task if not o.startswith(("resume=", "paths.output_dir="))]
    dotlist = []
    for o in overrides:
        key = o.split("=", 1)[0].lstrip("+~")
        if "=" not in o or o.startswith(("+", "~")) or OmegaConf.is_config(OmegaConf.select(saved, key)):
            raise TdlightError(
                f"when resuming, only value overrides (key.sub=value) apply on top of the saved config; "
                f"got {o!r}. Valid e.g.: trainer.max_epochs=5"
            )
        if OmegaConf.select(saved, key, default="__missing__") == "__missing__":
            raise TdlightError(f"override {o!r}: the saved config of {str(src)!r} has no key {key!r}")
        dotlist.append(o)
    merged = OmegaConf.merge(OmegaConf.structured(Config), saved, OmegaConf.from_dotlist(dotlist))
    merged.resume = str(src)
    if dotlist:
        from tdlight.model.io import atomic_write_text

        atomic_write_text(history_file, OmegaConf.to_yaml(OmegaConf.create(earlier + dotlist)))
    return merged, src


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


def _discard_fresh_run_dir(run_dir: Path) -> None:
    """Remove a run directory that holds nothing but what Hydra wrote at start-up."""
    if not run_dir.is_dir():
        return
    hydra_only = all(p.name == ".hydra" or p.suffix == ".log" for p in run_dir.iterdir())
    if hydra_only:
        shutil.rmtree(run_dir, ignore_errors=True)
        try:
            run_dir.parent.rmdir()  # and the <stage>/ folder, when it held only this run
        except OSError:
            pass


@hydra.main(version_base="1.3", config_path=str(ROOT / "conf"), config_name="config")
def _app(cfg: DictConfig) -> None:
    global _task_started
    _task_started = True
    fresh = run_dir = Path(HydraConfig.get().runtime.output_dir)
    stages = _stages()
    try:
        if cfg.get("resume"):
            cfg, run_dir = _resumed_config(cfg)
            # log into the resumed run's own tdlight.log; the fresh directory Hydra made is dropped
            handler = logging.FileHandler(run_dir / "tdlight.log")
            handler.setFormatter(logging.Formatter("[%(asctime)s][%(name)s][%(levelname)s] - %(message)s"))
            logging.getLogger().addHandler(handler)
            log.info("resuming %s", run_dir)
        else:
            refuse_unknown_added_keys(cfg, list(HydraConfig.get().overrides.task))
        check_ranges(cfg)
        if cfg.stage.name not in stages:
            raise TdlightError(f"unknown stage {cfg.stage.name!r}; valid: {sorted(stages)}")
        print(OmegaConf.to_yaml(cfg, resolve=True), flush=True)
        stages[cfg.stage.name](cfg, run_dir)
    except TdlightError as e:
        print(f"tdlight: error: {e}", file=sys.stderr, flush=True)
        logging.shutdown()
        _discard_fresh_run_dir(fresh)
        sys.exit(2)
    if fresh != run_dir:
        _discard_fresh_run_dir(fresh)


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] in ("sweep", "sweep-report"):
        from tdlight.sweep.cli import main as sweep_main

        sys.exit(sweep_main(sys.argv[1], sys.argv[2:]))
    register()
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
