"""The loggers of a run: Lightning's CSV logger and W&B (offline unless credentials are set), the
W&B run id kept in the run directory so that a resume logs into the same W&B run."""

from __future__ import annotations

import logging
import netrc
import os
import uuid
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from tdlight.config import WandbMode

log = logging.getLogger("tdlight")


def _wandb_configured() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        return netrc.netrc().authenticators("api.wandb.ai") is not None
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        return False


def wandb_offline(lc) -> bool:
    """Whether W&B runs offline for logger config ``lc`` (offline unless credentials or ``mode=online``)."""
    offline = lc.mode == WandbMode.offline or (lc.mode == WandbMode.auto and not _wandb_configured())
    return offline or os.environ.get("WANDB_MODE") in ("offline", "disabled")


def _wandb_settings():
    """No console output of W&B's own (banner, offline notices, `wandb leet` hint, sync hint):
    :func:`build_loggers` logs the one line a user acts on."""
    import wandb

    return wandb.Settings(silent=True)


def build_loggers(cfg: DictConfig, run_dir: Path, summary: dict[str, Any]) -> list:
    """CSV logger (unless ``logger=none``) and W&B (``logger=wandb``), both inside ``run_dir``.

    The W&B run id is stored in ``run_dir/wandb_id`` so a resumed run logs into the same
    W&B run. W&B runs offline unless credentials are configured (or ``logger.mode=online``).
    """
    lc = cfg.logger
    loggers: list = []
    if lc.csv:
        from lightning.pytorch.loggers import CSVLogger

        # csv/version_N/metrics.csv: a resumed run starts a new version instead of overwriting
        loggers.append(CSVLogger(save_dir=str(run_dir), name="csv"))
    if lc.wandb:
        from lightning.pytorch.loggers import WandbLogger

        offline = wandb_offline(lc)
        id_file = run_dir / "wandb_id"
        run_id = id_file.read_text().strip() if id_file.is_file() else uuid.uuid4().hex[:12]
        id_file.write_text(run_id + "\n")
        wb = WandbLogger(
            project=lc.project, entity=lc.entity, group=lc.group, tags=[*lc.tags, *lc.get("trial_tags", [])] or None,
            name=run_name(cfg, run_dir, summary), id=run_id, resume="allow", offline=offline,
            save_dir=str(run_dir), job_type=cfg.stage.name, settings=_wandb_settings(),
        )
        # Lightning always passes `anonymous`, which this wandb ignores with a deprecation warning
        # on every run; WandbLogger has no way to leave it out but its init-kwargs dict
        wb._wandb_init.pop("anonymous", None)
        wb.tdlight_log_model = bool(lc.get("log_model", False))  # (end_loggers: the saved model as an artifact)
        log.info("W&B run %s (%s) in %s%s", run_id, "offline" if offline else f"project {lc.project}",
                 run_dir / "wandb", f"; upload it with `wandb sync {run_dir / 'wandb'}/offline-run-*-{run_id}`"
                 if offline else "")
        loggers.append(wb)
    for lg in loggers:
        lg.log_hyperparams({"config": OmegaConf.to_container(cfg, resolve=True), **summary})
    return loggers


def run_name(cfg: DictConfig, run_dir: Path, summary: dict[str, Any]) -> str:
    """A W&B run name a reader can scan: stage, task, compression ratio (a compressed model's), then
    the run directory's name, which keeps it unique (``distill/sst2/7.1x/pipeline-1bdd33752132``)."""
    parts = [str(cfg.stage.name)]
    if summary.get("task"):
        parts.append(str(summary["task"]))
    ratio = summary.get("ratio")
    if isinstance(ratio, (int, float)) and ratio > 1.01:
        parts.append(f"{ratio:.1f}x")
    return "/".join([*parts, run_dir.name])


def offline_runs(run_dirs: list[Path]) -> list[Path]:
    """The offline W&B runs that ``run_dirs`` hold (each run directory's ``wandb/offline-run-*``)."""
    return [p for d in run_dirs for p in sorted(Path(d).glob("wandb/offline-run-*")) if p.is_dir()]


def sync_command(run_dirs: list[Path]) -> str | None:
    """One ``wandb sync`` command that uploads the offline W&B runs of ``run_dirs`` (a pipeline's
    steps), or None when none ran offline."""
    offline = offline_runs(run_dirs)
    return f"wandb sync {' '.join(str(p) for p in offline)}" if offline else None


def write_sync_script(root: Path, script: Path) -> int:
    """Write ``script``: one ``wandb sync`` of every offline W&B run under ``root`` (a sweep: all its
    trials' steps, shared ones once); returns how many (0: no script written, an old one removed)."""
    offline = offline_runs(sorted({p.parent for p in Path(root).rglob("wandb") if p.is_dir()}))
    if not offline:
        script.unlink(missing_ok=True)
        return 0
    lines = ["#!/bin/sh", f"# the {len(offline)} offline W&B run(s) under {root}, uploaded in one command",
             "exec wandb sync \\", *[f"  '{p}' \\" for p in offline[:-1]], f"  '{offline[-1]}'"]
    script.write_text("\n".join(lines) + "\n")
    script.chmod(0o755)
    return len(offline)


def finish_wandb() -> None:
    """End this process's active W&B run, if any. A pipeline runs its steps in one process, and
    Lightning's WandbLogger adopts a run that is still active: without this, every later step
    would log into the first step's W&B run instead of its own (its ``wandb_id``)."""
    import sys

    wandb = sys.modules.get("wandb")  # never import it just to find that nothing runs
    if wandb is not None and getattr(wandb, "run", None) is not None:
        wandb.finish()


def log_metrics(loggers: list, metrics: dict[str, float], step: int) -> None:
    """Log ``metrics`` at ``step`` to each logger outside a Lightning loop (decompose's sweeps)."""
    for lg in loggers:
        lg.log_metrics(metrics, step=step)


def end_loggers(loggers: list, summary: dict[str, float], model_dir: Path | None = None) -> None:
    """Give W&B ``summary`` as its run summary and end its run (training stages, evaluate and decompose
    alike); with ``logger.log_model=true``, ``model_dir`` (the model the step saved) becomes a W&B
    artifact of type ``model`` first. The CSV log is written out (a no-op after a Lightning loop)."""
    for lg in loggers:
        if type(lg).__name__ == "WandbLogger":
            if summary:
                lg.experiment.summary.update(summary)
            if getattr(lg, "tdlight_log_model", False) and model_dir is not None and Path(model_dir).is_dir():
                log_model_artifact(lg.experiment, Path(model_dir), summary)
        lg.finalize("success")


def artifact_name(run) -> str:
    """The model artifact's name: the run's name with what W&B refuses in one (``/``) made ``-``."""
    return "".join(c if c.isalnum() or c in "-_." else "-" for c in str(run.name))


def log_model_artifact(run, model_dir: Path, summary: dict) -> None:
    """``model_dir`` as a W&B artifact of type ``model`` (its summary as metadata), logged to ``run``;
    offline it waits in the run's directory for ``wandb sync``."""
    import wandb

    art = wandb.Artifact(artifact_name(run), type="model", metadata={k: v for k, v in summary.items()
                                                                      if isinstance(v, (int, float, str))})
    art.add_dir(str(model_dir))
    run.log_artifact(art)
    log.info("W&B: model %s logged as artifact %s", model_dir, art.name)
