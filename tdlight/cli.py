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

from tdlight.config import ROOT, register
from tdlight.errors import TdlightError

log = logging.getLogger("tdlight")
_task_started = False


def _stages():
    from tdlight.stages import decompose

    return {"decompose": decompose.run}


def _discard_fresh_run_dir(run_dir: Path) -> None:
    """Remove a run directory that holds nothing but what Hydra wrote at start-up."""
    if not run_dir.is_dir():
        return
    hydra_only = all(p.name == ".hydra" or p.suffix == ".log" for p in run_dir.iterdir())
    if hydra_only:
        shutil.rmtree(run_dir, ignore_errors=True)


@hydra.main(version_base="1.3", config_path=str(ROOT / "conf"), config_name="config")
def _app(cfg: DictConfig) -> None:
    global _task_started
    _task_started = True
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    stages = _stages()
    try:
        if cfg.stage.name not in stages:
            raise TdlightError(f"unknown stage {cfg.stage.name!r}; valid: {sorted(stages)}")
        print(OmegaConf.to_yaml(cfg, resolve=True), flush=True)
        stages[cfg.stage.name](cfg, run_dir)
    except TdlightError as e:
        print(f"tdlight: error: {e}", file=sys.stderr, flush=True)
        logging.shutdown()
        _discard_fresh_run_dir(run_dir)
        sys.exit(2)


def main() -> None:
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
