"""``stage=evaluate``: a dense or compressed classifier on a task's dev set.

``stage.model`` is a run directory (its ``model/``) or a model directory; empty means
the teacher (``teacher.run_dir``'s fine-tuned model, else ``teacher.path``). Writes
``metrics.json`` (task metrics, GLUE score, encoder parameters, compression ratio,
examples/second) and prints the same as a table.
"""

from __future__ import annotations

import logging
from pathlib import Path

import lightning as L
from omegaconf import DictConfig
from rich.console import Console

from tdlight.errors import TdlightError
from tdlight.model.teacher import load_classifier
from tdlight.stages.classifier import (
    GlueModule, datamodule, is_constant, model_summary, require_task, results_table, warn_if_constant,
)
from tdlight.stages.common import build_trainer, stage_artifact, teacher_pooling, teacher_source, write_json
from tdlight.stages.registry import MODEL_STAGES

log = logging.getLogger("tdlight.evaluate")


def model_source(cfg: DictConfig) -> str:
    src = cfg.stage.model or teacher_source(cfg)
    p = Path(src)
    if (p / ".hydra" / "config.yaml").is_file():  # a run directory: its artifact
        return str(stage_artifact(p, MODEL_STAGES))
    if not p.exists() and (src.startswith(("/", ".", "~")) or src.count("/") > 1):
        raise TdlightError(f"stage.model={src!r} does not exist; valid: a run directory, a model directory, "
                           "a hub name, or empty for the teacher")
    return src


def run(cfg: DictConfig, run_dir: Path) -> dict:
    task = require_task(cfg)
    if not task.validation_splits:
        raise TdlightError(f"task {task.name!r} has no labelled dev set to evaluate on")
    st = cfg.stage
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    source = model_source(cfg)
    model, tokenizer = load_classifier(source, task.num_labels, pooling=teacher_pooling(cfg))
    head = getattr(getattr(model, "config", None), "num_labels", task.num_labels)
    if head != task.num_labels:
        raise TdlightError(f"model {source!r} has {head} output(s) but task {task.name!r} needs {task.num_labels}")
    dm = datamodule(cfg, task, tokenizer, max_length=st.max_length or cfg.task.max_length, batch_size=st.batch_size,
                    eval_batch_size=st.batch_size, limit_train=None, limit_eval=st.limit_eval,
                    num_workers=st.num_workers, train=False)
    dm.prepare_data()
    dm.setup("validate")
    module = GlueModule(model, task)
    summary = {"task": task.name, "model": source, **model_summary(model)}
    trainer = build_trainer(cfg, run_dir, max_epochs=1, monitor=None, summary=summary)
    trainer.validate(module, datamodule=dm, verbose=False)
    out = {"stage": "evaluate", **summary, "dev": module.results, "score": module.results["score"],
           "examples": module.eval_examples,
           "examples_per_second": module.eval_examples / module.eval_seconds if module.eval_seconds else None,
           "device": str(module.device)}
    out["constant_predictions"] = is_constant(module.results)
    if trainer.is_global_zero:
        warn_if_constant(module.results, f"model {source}")
        write_json(run_dir / "metrics.json", out)
        Console().print(results_table(f"tdlight evaluate: {Path(source).name or source} on {task.name}", out))
    return out
