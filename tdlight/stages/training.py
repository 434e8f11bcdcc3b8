"""The skeleton every Lightning stage shares — what finetune, pretrain, distill and evaluate write
around their own LightningModule and datamodule:

1. :func:`begin` — the checkpoint a resumed run continues from (an error before any work when it
   has none), then the seed;
2. :func:`fit` — the Trainer (:func:`~tdlight.stages.trainer.build_trainer`, with an epoch timer),
   a stage's last preparation that needs the Trainer's device (``before_fit``), ``trainer.fit``
   (resuming), then the best checkpoint's weights and one final validation when the stage keeps
   the best epoch (``monitor``);
   (evaluate: :func:`validate` after :func:`begin` — the same Trainer, one validation, no training);
3. :func:`finish` — on rank 0: the model directory (``model/``, when the stage makes one),
   ``metrics.json``, the constant-predictor warning and the console table; on every logger: W&B's
   run summary and its end.

Lightning runs the loop, checkpoints and resumes; this module only fixes the order of the steps
around it, which the three stages had each written out (and let drift apart: only finetune ended
its W&B run).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import lightning as L
import torch
from lightning.pytorch.callbacks import EarlyStopping
from omegaconf import DictConfig
from rich.console import Console
from rich.table import Table

from tdlight.errors import TdlightError
from tdlight.model.io import save_model
from tdlight.stages.classifier import is_constant, warn_if_constant
from tdlight.stages.loggers import end_loggers
from tdlight.stages.runs import CHECKPOINTS, last_checkpoint, write_json
from tdlight.stages.trainer import EpochTimer, build_trainer

log = logging.getLogger("tdlight.training")

BEST = "best.ckpt"


def begin(cfg: DictConfig, run_dir: Path, seed: int | None = None) -> Path | None:
    """The checkpoint to resume from (``resume=<run>``; an error now when there is none), then seed
    every RNG from ``seed`` (the stage's own; None: ``cfg.seed``). Call it after the stage's own
    config checks, before loading models."""
    ckpt = last_checkpoint(run_dir) if cfg.get("resume") else None
    L.seed_everything(cfg.seed if seed is None else seed, workers=True, verbose=False)
    return ckpt


@dataclass
class Fitted:
    trainer: L.Trainer
    results: dict[str, float] = field(default_factory=dict)  # the final validation (empty without monitor)
    epoch_seconds: list[float] = field(default_factory=list)


def fit(cfg: DictConfig, run_dir: Path, module: L.LightningModule, datamodule: L.LightningDataModule, *,
        ckpt: Path | None, max_epochs: int, monitor: str | None, summary: dict,
        extra_callbacks: list | None = None, before_fit: Callable[[L.Trainer], None] | None = None,
        patience: int | None = None) -> Fitted:
    """Train ``module`` on ``datamodule`` under ``cfg.trainer``; with ``monitor`` (mode max), load
    the best epoch's weights (``checkpoints/best.ckpt``) and validate them once more: ``module.results``
    then holds the scores of the model that will be saved. ``before_fit(trainer)`` runs once the
    Trainer exists (the device is known) and before the loop starts. ``patience``: stop after that
    many epochs without a better ``monitor`` value (:func:`~tdlight.stages.trainer.build_trainer`)."""
    if ckpt is not None and max_epochs not in (None, -1):  # (Lightning's own refusal is a traceback)
        done = torch.load(ckpt, map_location="cpu", weights_only=True, mmap=True).get("epoch", 0)
        if done > max_epochs:
            raise TdlightError(f"cannot resume {str(run_dir)!r} with {max_epochs} epoch(s): its checkpoint is past "
                               f"epoch {done}; valid: at least {done} epochs (stage.epochs; for distill "
                               "stage.intermediate_epochs + stage.prediction_epochs)")
    timer = EpochTimer()
    trainer = build_trainer(cfg, run_dir, max_epochs=max_epochs, monitor=monitor, summary=summary,
                            extra_callbacks=[timer, *(extra_callbacks or [])], patience=patience)
    if before_fit is not None:
        before_fit(trainer)
    trainer.fit(module, datamodule=datamodule, ckpt_path=str(ckpt) if ckpt else None)
    # an early stop is said once, in tdlight's words (Lightning's EarlyStopping is silent unless verbose,
    # and verbose also logs every improvement); reaching max_epochs is the plan and says nothing
    stopper = next((c for c in trainer.callbacks if isinstance(c, EarlyStopping)), None)
    if stopper is not None and stopper.stopping_reason_message:
        log.info("stopped early after epoch %d of %d: %s had not improved for %d epoch(s) (best %.4f)",
                 trainer.current_epoch, max_epochs, stopper.monitor, stopper.wait_count, float(stopper.best_score))
    results: dict[str, float] = {}
    if monitor:
        best = run_dir / CHECKPOINTS / BEST
        if best.is_file():
            module.load_state_dict(torch.load(best, map_location="cpu", weights_only=True)["state_dict"])
        trainer.validate(module, datamodule=datamodule, verbose=False)
        results = dict(getattr(module, "results", {}))
    return Fitted(trainer, results, timer.seconds)


def validate(cfg: DictConfig, run_dir: Path, module: L.LightningModule, datamodule: L.LightningDataModule, *,
             summary: dict) -> Fitted:
    """Evaluate ``module`` once on ``datamodule``'s validation data with the Trainer every stage
    builds (its loggers, device and precision from ``cfg.trainer``); call :func:`begin` first, before
    the model is built (it seeds). ``Fitted.results`` holds ``module.results``; the Trainer can
    validate another module (a model loaded back at its shipped precision) on the same data."""
    trainer = build_trainer(cfg, run_dir, max_epochs=1, monitor=None, summary=summary)
    trainer.validate(module, datamodule=datamodule, verbose=False)
    return Fitted(trainer, dict(getattr(module, "results", {})))


def finish(run_dir: Path, fitted: Fitted, out: dict, *, model: torch.nn.Module | None, tokenizer=None,
           model_extra: dict | None = None, table: Table | Callable[[dict], Table], who: str | None = None,
           summary_prefix: str = "best") -> dict:
    """Save ``model`` (with ``tokenizer`` and ``model_extra`` in its metadata; None: the stage makes
    no model) to ``run_dir/model`` and ``out`` to ``metrics.json`` on rank 0, warn loudly when ``who``
    (a classifier with dev results in ``out["dev"]``) predicts a constant, print ``table`` (or
    ``table(out)``), and give W&B ``fitted.results`` (under ``summary_prefix/``) as its run summary
    before ending its run. Returns ``out``."""
    trainer = fitted.trainer
    if "dev" in out:
        out["constant_predictions"] = is_constant(out["dev"])
    if trainer.is_global_zero:
        if model is not None:
            save_model(model, tokenizer, run_dir / "model", extra=model_extra)
        if who is not None and "dev" in out:
            warn_if_constant(out["dev"], who)
        write_json(run_dir / "metrics.json", out)
        Console().print(table(out) if callable(table) else table)
    end_loggers(trainer.loggers, {f"{summary_prefix}/{k}": v for k, v in fitted.results.items()
                                  if isinstance(v, (int, float))}, model_dir=run_dir / "model")
    return out
