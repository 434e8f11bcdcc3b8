"""``stage=evaluate``: a dense or compressed classifier on a task's dev set.

``stage.model`` is a run directory (its ``model/``) or a model directory; empty means
the teacher (``teacher.run_dir``'s fine-tuned model, else ``teacher.path``). Writes
``metrics.json`` (task metrics, GLUE score, encoder and whole-model parameters, compression
ratio, bytes on disk, examples/second) and prints the same as a table. ``stage.precision``
other than fp32: the model is stored at that precision in the run's ``model/`` (what ships) and
``score`` is the score of that model as loaded back, ``score_fp32`` the one before.
"""

from __future__ import annotations

import logging
from pathlib import Path

from omegaconf import DictConfig

from tdlight.errors import TdlightError
from tdlight.files import directory_bytes
from tdlight.model.io import save_model
from tdlight.model.teacher import load_classifier
from tdlight.stages import training
from tdlight.stages.classifier import (
    GlueModule, check_lengths, check_task_data, datamodule, model_summary, pair_reading, require_task, results_table,
)
from tdlight.stages.runs import check_teacher_task, stage_artifact, teacher_source
from tdlight.stages.registry import MODEL_STAGES, settings

log = logging.getLogger("tdlight.evaluate")


def model_source(cfg: DictConfig) -> str:
    if not cfg.stage.model and cfg.teacher.get("run_dir"):  # the teacher of this task, not of another
        check_teacher_task(cfg, "this run evaluates")
    src = cfg.stage.model or teacher_source(cfg)
    p = Path(src)
    if (p / ".hydra" / "config.yaml").is_file():  # a run directory: its artifact
        return str(stage_artifact(p, MODEL_STAGES))
    if not p.exists() and (src.startswith(("/", ".", "~")) or src.count("/") > 1):
        raise TdlightError(f"stage.model={src!r} does not exist; valid: a run directory, a model directory, "
                           "a hub name, or empty for the teacher")
    return src


def check(cfg: DictConfig, where: str = "stage", wired: tuple[str, ...] = ()) -> None:
    """The settings checks that load no model (:mod:`tdlight.stages.registry`): a task with a labelled
    dev set on disk (or the hub), and the model given — unless ``wired`` (a pipeline fills it from a
    step that has not run yet)."""
    task = require_task(cfg)
    if not task.validation_splits:
        raise TdlightError(f"task {task.name!r} has no labelled dev set to evaluate on")
    check_task_data(cfg, task, train=False)
    if "stage.model" not in wired:
        model_source(cfg)


def run(cfg: DictConfig, run_dir: Path) -> dict:
    check(cfg)
    task = require_task(cfg)
    st = settings(cfg)
    training.begin(cfg, run_dir)  # the seed, before a new task head (a checkpoint without one) is drawn
    source = model_source(cfg)
    # (task.pair_encoding=bi on a cross-encoder evaluates its encoder as a bi-encoder: its head is not read)
    model, tokenizer = load_classifier(source, task.num_labels, pooling=cfg.teacher.pooling.value,
                                       **pair_reading(cfg, task))
    head = getattr(getattr(model, "config", None), "num_labels", task.num_labels)
    if head != task.num_labels:
        raise TdlightError(f"model {source!r} has {head} output(s) but task {task.name!r} needs {task.num_labels}")
    check_lengths(model, cfg, st.max_length or cfg.task.max_length)
    dm = datamodule(cfg, task, tokenizer, max_length=st.max_length or cfg.task.max_length, batch_size=st.batch_size,
                    eval_batch_size=st.batch_size, limit_train=None, limit_eval=st.limit_eval,
                    num_workers=st.num_workers, train=False)
    dm.prepare_data()
    dm.setup("validate")
    summary = {"task": task.name, "model": source, **model_summary(model)}
    module = GlueModule(model, task)
    fitted = training.validate(cfg, run_dir, module, dm, summary=summary)
    precision = st.precision.value
    out = {"stage": "evaluate", **summary, "precision": precision, "dev": module.results,
           "score": module.results["score"], "examples": module.eval_examples,
           "examples_per_second": module.eval_examples / module.eval_seconds if module.eval_seconds else None,
           "device": str(module.device)}
    if precision != "fp32":  # what the user takes home: the model stored at that precision, loaded back
        shipped = save_model(model, tokenizer, run_dir / "model", precision=precision)
        model, _ = load_classifier(str(shipped), task.num_labels)
        module = GlueModule(model, task)
        fitted.trainer.validate(module, datamodule=dm, verbose=False)
        fitted.results = dict(module.results)
        out.update(dev=module.results, score=module.results["score"], dev_fp32=out["dev"], score_fp32=out["score"],
                   shipped=str(shipped))
    out["model_bytes"] = directory_bytes(out.get("shipped") or source) if Path(out.get("shipped") or source).is_dir() \
        else None
    return training.finish(run_dir, fitted, out, model=None, who=f"model {source}", summary_prefix="dev",
                           table=results_table(f"tdlight evaluate: {Path(source).name or source} on {task.name}", out))
