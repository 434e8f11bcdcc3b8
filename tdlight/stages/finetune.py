"""``stage=finetune``: fine-tune the teacher on a GLUE task.

AdamW (no weight decay on biases and LayerNorms), linear warm-up then linear decay,
gradient clipping and mixed precision from the trainer config, validation every epoch,
the best epoch by the task's GLUE score kept in ``checkpoints/best.ckpt``. At the end the
best weights are saved as an HF model directory in ``model/`` (the input of the later
stages: ``teacher.run_dir=<this run>``) and ``metrics.json`` records the dev scores.
The LightningModule and the rest of the training kit are in :mod:`tdlight.stages.classifier`.
"""

from __future__ import annotations

import logging
from pathlib import Path

from omegaconf import DictConfig

from tdlight.errors import TdlightError
from tdlight.model.teacher import load_classifier, resolve_teacher
from tdlight.stages import training
from tdlight.stages.classifier import (
    GlueModule, check_class_weights, check_lengths, check_task_data, class_weights, datamodule, model_summary,
    pair_reading, require_task, results_table, task_settings, training_steps,
)
from tdlight.stages.registry import settings
from tdlight.stages.runs import teacher_source

log = logging.getLogger("tdlight.finetune")


def check(cfg: DictConfig, where: str = "stage", wired: tuple[str, ...] = ()) -> None:
    """The settings checks that load no model (:mod:`tdlight.stages.registry`): a task with training
    data on disk (or the hub), and the teacher given."""
    task = require_task(cfg)
    if not task.splits.get("train"):
        raise TdlightError(f"task {task.name!r} has no training data (it is a test-only diagnostic set)")
    check_task_data(cfg, task, train=True)
    check_class_weights(settings(cfg).class_weights, task, f"{where}.class_weights")
    if "teacher.run_dir" not in wired:
        resolve_teacher(teacher_source(cfg))


def run(cfg: DictConfig, run_dir: Path, extra_callbacks: list | None = None) -> dict:
    """Fine-tune; ``extra_callbacks`` are added to the Trainer (programmatic use, tests)."""
    check(cfg)
    task = require_task(cfg)
    st = settings(cfg)
    lr, epochs, batch_size, max_length, warmup, patience = task_settings(
        st, cfg, "lr", "epochs", "batch_size", "max_length", "warmup_ratio", "patience")
    ckpt = training.begin(cfg, run_dir, st.seed)

    source = teacher_source(cfg)
    model, tokenizer = load_classifier(source, task.num_labels, pooling=cfg.teacher.pooling.value,
                                       **pair_reading(cfg, task))
    check_lengths(model, cfg, max_length)
    dm = datamodule(cfg, task, tokenizer, max_length=max_length, batch_size=batch_size,
                    eval_batch_size=st.eval_batch_size, limit_train=st.limit_train, limit_eval=st.limit_eval,
                    num_workers=st.num_workers, seed=st.seed)
    dm.prepare_data()  # a missing or malformed data file fails here, before training starts
    dm.setup("fit")
    weights = class_weights(st.class_weights, task, dm.datasets["train"]["labels"])
    module = GlueModule(model, task, lr=lr, weight_decay=st.weight_decay, warmup_ratio=warmup, class_weights=weights)
    summary = {"task": task.name, "teacher": source, **model_summary(model)}

    def schedule(trainer) -> None:
        module.total_steps = training_steps(trainer, len(dm.datasets["train"]), batch_size)
        log.info("fine-tuning %s on %s: lr %g, %d epochs%s, batch %d, max length %d, warm-up %g%s, keeping the epoch "
                 "of the best %s%s", source, task.name, lr, trainer.max_epochs,
                 f" (stopping after {patience} without a better dev score)" if patience else "", batch_size,
                 max_length, warmup, "" if weights is None else f", class weights {[round(float(w), 4) for w in weights]}",
                 watched, f", resuming from {ckpt}" if ckpt else "")

    watched = "val/score"  # the teacher keeps its GLUE score's best epoch (distill has stage.select_by)
    fitted = training.fit(cfg, run_dir, module, dm, ckpt=ckpt, max_epochs=epochs, monitor=watched,
                          summary=summary, extra_callbacks=extra_callbacks, before_fit=schedule, patience=patience)
    trainer, results = fitted.trainer, fitted.results
    out = {
        "stage": "finetune", "task": task.name, "teacher": source, "dev": results, "score": results["score"],
        "lr": lr, "epochs": trainer.max_epochs, "epochs_run": trainer.current_epoch, "warmup_ratio": warmup,
        "patience": patience, "class_weights": None if weights is None else [float(w) for w in weights],
        "selected_by": watched, "batch_size": batch_size, "max_length": max_length,
        "epoch_seconds": fitted.epoch_seconds, "global_step": trainer.global_step, **summary,
    }
    return training.finish(run_dir, fitted, out, model=module.model, tokenizer=tokenizer,
                           model_extra={"teacher": source, "task": task.name}, who="the fine-tuned teacher",
                           table=results_table(f"tdlight finetune: {task.name} — best of {trainer.max_epochs} epochs", out))
