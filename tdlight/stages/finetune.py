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

import lightning as L
import torch
from omegaconf import DictConfig
from rich.console import Console

from tdlight.errors import TdlightError
from tdlight.stages.classifier import (
    GlueModule, datamodule, is_constant, model_summary, require_task, results_table, training_steps, warn_if_constant,
)
from tdlight.stages.common import EpochTimer, build_trainer, last_checkpoint, teacher_pooling, teacher_source, write_json

log = logging.getLogger("tdlight.finetune")

def run(cfg: DictConfig, run_dir: Path, extra_callbacks: list | None = None) -> dict:
    """Fine-tune; ``extra_callbacks`` are added to the Trainer (programmatic use, tests)."""
    from tdlight.model.teacher import load_classifier

    task = require_task(cfg)
    if not task.splits.get("train"):
        raise TdlightError(f"task {task.name!r} has no training data (it is a test-only diagnostic set)")
    st, tc = cfg.stage, cfg.task
    lr = st.lr if st.lr is not None else tc.lr
    epochs = st.epochs if st.epochs is not None else tc.epochs
    batch_size = st.batch_size if st.batch_size is not None else tc.batch_size
    max_length = st.max_length if st.max_length is not None else tc.max_length
    ckpt = last_checkpoint(run_dir) if cfg.get("resume") else None  # before any work

    L.seed_everything(cfg.seed, workers=True, verbose=False)
    source = teacher_source(cfg)
    model, tokenizer = load_classifier(source, task.num_labels, pooling=teacher_pooling(cfg))
    dm = datamodule(cfg, task, tokenizer, max_length=max_length, batch_size=batch_size,
                    eval_batch_size=st.eval_batch_size, limit_train=st.limit_train, limit_eval=st.limit_eval,
                    num_workers=st.num_workers)
    dm.prepare_data()  # a missing or malformed data file fails here, before training starts
    dm.setup("fit")
    module = GlueModule(model, task, lr=lr, weight_decay=st.weight_decay, warmup_ratio=st.warmup_ratio)
    summary = {"task": task.name, "teacher": source, **model_summary(model)}
    timer = EpochTimer()
    trainer = build_trainer(cfg, run_dir, max_epochs=epochs, monitor="val/score", summary=summary,
                            extra_callbacks=[timer, *(extra_callbacks or [])])
    module.total_steps = training_steps(trainer, len(dm.datasets["train"]), batch_size)
    log.info("fine-tuning %s on %s: lr %g, %d epochs, batch %d, max length %d%s", source, task.name, lr,
             trainer.max_epochs, batch_size, max_length, f", resuming from {ckpt}" if ckpt else "")
    trainer.fit(module, datamodule=dm, ckpt_path=str(ckpt) if ckpt else None)

    best_path = run_dir / "checkpoints" / "best.ckpt"
    if best_path.is_file():
        state = torch.load(best_path, map_location="cpu", weights_only=True)["state_dict"]
        module.load_state_dict(state)
    results = trainer.validate(module, datamodule=dm, verbose=False) and module.results
    if trainer.is_global_zero:
        from tdlight.model.io import save_model

        save_model(module.model, tokenizer, run_dir / "model", extra={"teacher": source, "task": task.name})
    out = {
        "stage": "finetune", "task": task.name, "teacher": source, "dev": results, "score": results["score"],
        "lr": lr, "epochs": trainer.max_epochs, "batch_size": batch_size, "max_length": max_length,
        "epoch_seconds": timer.seconds, "global_step": trainer.global_step, **summary,
    }
    out["constant_predictions"] = is_constant(results)
    if trainer.is_global_zero:
        warn_if_constant(results, "the fine-tuned teacher")
        write_json(run_dir / "metrics.json", out)
        Console().print(results_table(f"tdlight finetune: {task.name} — best of {trainer.max_epochs} epochs", out))
    for lg in trainer.loggers:
        if hasattr(lg, "experiment") and type(lg).__name__ == "WandbLogger":
            lg.experiment.summary.update({f"best/{k}": v for k, v in results.items()})
            lg.finalize("success")
    return out
