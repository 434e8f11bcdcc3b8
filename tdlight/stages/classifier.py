"""The classifier kit: what every stage that trains or evaluates a GLUE sequence classifier
shares — :class:`GlueModule` (the LightningModule), the task's datamodule, step counts for the
LR schedule, the model summary (encoder parameters, ratio) and the constant-predictor report.
finetune, distill, evaluate, pretrain, refine and the pipeline build on it; it knows no stage.
"""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path

import lightning as L
import torch
from omegaconf import DictConfig, OmegaConf
from rich.console import Console
from rich.table import Table
from torch import nn

from tdlight.config import task_options
from tdlight.data.datamodule import GlueDataModule
from tdlight.data.glue import get_task, resolve_source
from tdlight.data.metrics import CONSTANT_SHARE, GlueMetric
from tdlight.console import FILE_ONLY
from tdlight.errors import TdlightError
from tdlight.model.surgery import count_parameters, encoder_shape, get_encoder, is_compressed, nonfinite_tensors
from tdlight.stages.losses import gold_loss
from tdlight.stages.runs import check_positions
from tdlight.stages.trainer import adamw
from tdlight.tensor.accounting import dense_counts

log = logging.getLogger("tdlight")

MODEL_INPUTS = ("input_ids", "attention_mask", "token_type_ids")


class GlueModule(L.LightningModule):
    """A sequence classifier (any HF ``*ForSequenceClassification``, dense or compressed) on a task.

    Logs ``train/loss``, ``val/<split>/<metric>``, ``val/score`` (the task's GLUE score;
    MNLI: the mean over matched and mismatched) and ``val/loss`` (the gold-label loss on dev, the
    training loss's counterpart: cross-entropy, MSE for regression), and counts evaluation throughput.
    """

    def __init__(self, model: nn.Module, task, *, lr: float | None = None, weight_decay: float | None = None,
                 warmup_ratio: float | None = None, class_weights: torch.Tensor | None = None):
        """``lr``, ``weight_decay``, ``warmup_ratio``: the stage's settings (their defaults are the
        schema's, :mod:`tdlight.stages.schemas`, never restated here); None for a module that only
        evaluates. ``class_weights``: one per class, weighting the training loss (:func:`class_weights`);
        the dev loss stays the plain gold-label loss, comparable across runs."""
        super().__init__()

        self.model = model
        self.task = task
        self.lr, self.weight_decay, self.warmup_ratio = lr, weight_decay, warmup_ratio
        self.register_buffer("class_weights", class_weights, persistent=False)
        self.val_metrics = nn.ModuleList([GlueMetric(task) for _ in task.validation_splits])
        self.total_steps: int | None = None  # set by the stage (see training_steps)
        self.results: dict[str, float] = {}
        self.monitor = "val/score"  # the logged value best.ckpt keeps (the stage sets it: see monitor())
        self.eval_examples = 0
        self.eval_seconds = 0.0

    def on_fit_start(self) -> None:
        # HF's from_pretrained returns the model in eval mode and Lightning keeps each
        # submodule's mode as it finds it: without this, training would run without dropout.
        self.model.train()

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.model(**{k: batch[k] for k in MODEL_INPUTS if k in batch}).logits

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        if self.class_weights is None:  # the model's own loss (HF's: cross-entropy, MSE for regression)
            loss = self.model(**{k: batch[k] for k in MODEL_INPUTS + ("labels",) if k in batch}).loss
        else:
            loss = gold_loss(self(batch), batch["labels"], weight=self.class_weights)
        self.log("train/loss", loss, prog_bar=True, on_step=True, on_epoch=True, batch_size=len(batch["labels"]))
        return loss

    def on_validation_epoch_start(self) -> None:
        self._t0 = time.perf_counter()
        self._n = 0
        self._loss = [[0.0, 0] for _ in self.task.validation_splits]  # per split: summed loss, examples

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int, dataloader_idx: int = 0) -> None:
        logits = self(batch)
        if not torch.isfinite(logits).all():  # a score of NaN logits would still be a finite number
            raise TdlightError(f"the model's outputs are not finite (first non-finite parameter: "
                               f"{next(iter(nonfinite_tensors(self.model)), 'none')}); its score would be meaningless")
        self.val_metrics[dataloader_idx].update(logits, batch["labels"])
        n = len(batch["labels"])
        self._n += n
        self._loss[dataloader_idx][0] += float(gold_loss(logits, batch["labels"], regression=self.task.is_regression)) * n
        self._loss[dataloader_idx][1] += n

    def on_validation_epoch_end(self) -> None:
        self.eval_seconds = time.perf_counter() - self._t0
        # examples over all processes (under DDP each rank saw its share)
        self.eval_examples = int(self.trainer.strategy.reduce(torch.tensor(self._n, device=self.device),
                                                               reduce_op="sum"))
        results: dict[str, float] = {}
        scores = []
        for split, metric, loss in zip(self.task.validation_splits, self.val_metrics, self._loss):
            values = {k: float(v) for k, v in metric.compute().items()}
            metric.reset()
            total, count = (float(x) for x in self.trainer.strategy.reduce(
                torch.tensor(loss, dtype=torch.float64, device=self.device), reduce_op="sum"))
            if count:
                values["loss"] = total / count
            prefix = split if len(self.task.validation_splits) > 1 else ""
            for k, v in values.items():
                results[f"{prefix}/{k}".lstrip("/")] = v
            scores.append(values["score"])
        results["score"] = sum(scores) / len(scores)
        if len(scores) > 1 and not self.task.is_regression:  # (MNLI: one balanced accuracy, as one score)
            splits = [results[f"{split}/balanced_accuracy"] for split in self.task.validation_splits]
            results["balanced_accuracy"] = sum(splits) / len(splits)
        self.results = results
        self.log_results(results)

    def log_results(self, results: dict[str, float]) -> None:
        for k, v in results.items():
            # identical on every rank (GlueMetric syncs its states); sync_dist keeps Lightning's checks quiet
            self.log(f"val/{k}", v, prog_bar=k == "score", sync_dist=True)

    def configure_optimizers(self):
        from transformers import get_linear_schedule_with_warmup

        if self.lr is None or self.weight_decay is None or self.warmup_ratio is None:
            raise ValueError("GlueModule: training needs lr, weight_decay and warmup_ratio (the stage's settings)")
        opt = adamw(self.model, self.lr, self.weight_decay)
        total = self.total_steps or int(self.trainer.estimated_stepping_batches)
        sched = get_linear_schedule_with_warmup(opt, int(self.warmup_ratio * total), total)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def steps_per_epoch(trainer: L.Trainer, num_examples: int, batch_size: int) -> int:
    """Optimizer steps in one epoch of ``num_examples`` (per rank under DDP)."""
    per_rank = math.ceil(num_examples / trainer.world_size)
    batches = math.ceil(per_rank / batch_size)
    limit = trainer.limit_train_batches
    if isinstance(limit, int):
        batches = min(batches, limit)
    elif limit is not None:
        batches = int(batches * limit)
    return math.ceil(batches / trainer.accumulate_grad_batches)


def training_steps(trainer: L.Trainer, num_examples: int, batch_size: int) -> int:
    """Optimizer steps of the whole run, for the LR schedule.

    ``trainer.estimated_stepping_batches`` would give the same number, but it builds the
    train dataloader before a checkpoint's loop state is restored, which stops Lightning
    from restoring the loader's position — so a resumed run would replay the epoch.
    """
    per_epoch = steps_per_epoch(trainer, num_examples, batch_size)
    by_epochs = per_epoch * trainer.max_epochs if trainer.max_epochs and trainer.max_epochs > 0 else None
    if trainer.max_steps and trainer.max_steps > 0:
        return trainer.max_steps if by_epochs is None else min(trainer.max_steps, by_epochs)
    return by_epochs or per_epoch


def require_task(cfg: DictConfig):
    """The run's task (``task=<name>``), its pair encoding checked against it (:func:`pair_reading`)."""
    if cfg.get("task") is None:
        raise TdlightError(f"stage={cfg.stage.name} needs a task: add task=<name>; valid: {task_options()}")
    task = get_task(cfg.task.name)
    pair_reading(cfg, task)
    return task


def check_task_data(cfg: DictConfig, task, *, train: bool) -> None:
    """The task's data files are there (or the hub is an option): its training split when ``train``,
    and its labelled dev split(s) — the error :func:`tdlight.data.glue.resolve_source` gives, before
    any model is loaded."""
    for split in (("train",) if train else ()) + tuple(task.validation_splits):
        resolve_source(task, split, Path(cfg.paths.data_dir) / "glue", cfg.task.source)


def check_lengths(model, cfg: DictConfig, max_length: int) -> None:
    """The GLUE ``max_length`` in force fits the model's position table, named as the user set it."""
    key = "stage.max_length" if cfg.stage.get("max_length") is not None else "task.max_length"
    check_positions(model, **{key: max_length})


def monitor(task, select_by) -> str:
    """The logged dev value that picks the epoch a stage keeps (``best.ckpt``) and that early stopping
    watches: ``val/score`` (the GLUE score) or, with ``select_by=balanced_accuracy``, ``val/balanced_accuracy``
    — except for a regression task, which has no classes and is selected by its score."""
    key = getattr(select_by, "value", select_by)
    return "val/score" if key == "score" or task.is_regression else f"val/{key}"


CLASS_WEIGHTS = ("none", "balanced")


def check_class_weights(value, task, key: str = "stage.class_weights") -> None:
    """``value`` is a valid ``class_weights`` for ``task``: null or ``none`` (plain cross-entropy), ``balanced``,
    or one positive number per class; a regression task takes none. Refused naming the value and what is valid."""
    if value is None or value == "none":
        return
    if task.is_regression:
        raise TdlightError(f"{key}={value!r}: task={task.name} is a regression (MSE on a score), it has no classes "
                           "to weight; valid: null")
    if isinstance(value, str):
        if value not in CLASS_WEIGHTS:
            raise TdlightError(f"{key}={value!r} is not a class weighting; valid: {list(CLASS_WEIGHTS)} or a list of "
                               f"{task.num_labels} positive numbers, one per class {list(task.labels)}")
        return
    items = list(value) if isinstance(value, (list, tuple)) or OmegaConf.is_list(value) else None
    if (items is None or len(items) != task.num_labels
            or not all(isinstance(w, (int, float)) and not isinstance(w, bool) and math.isfinite(w) and w > 0
                       for w in items)):
        shown = OmegaConf.to_container(value) if OmegaConf.is_config(value) else value
        raise TdlightError(f"{key}={shown!r}: valid: {list(CLASS_WEIGHTS)} or a list of {task.num_labels} positive "
                           f"numbers, one per class {list(task.labels)} of task={task.name}")


def class_weights(value, task, labels, key: str = "stage.class_weights") -> torch.Tensor | None:
    """The per-class weights of the training loss that ``value`` names (see :func:`check_class_weights`):
    None for plain cross-entropy; ``balanced``: n / (classes × count of the class) over ``labels`` (the training
    split as trained on), scikit-learn's ``compute_class_weight("balanced")``, so that every class adds the same
    total weight to an epoch; a list: as given."""
    check_class_weights(value, task, key)
    if value is None or value == "none":
        return None
    if value == "balanced":
        import numpy as np
        from sklearn.utils.class_weight import compute_class_weight

        labels = np.asarray(labels)
        absent = [task.labels[c] for c in range(task.num_labels) if not (labels == c).any()]
        if absent:
            raise TdlightError(f"{key}=balanced: the training examples have no {absent} example (of "
                               f"{len(labels)}); balanced weights need every class; valid: none, or a list of "
                               f"{task.num_labels} weights")
        value = compute_class_weight("balanced", classes=np.arange(task.num_labels), y=labels)
    return torch.tensor([float(w) for w in value], dtype=torch.float32)


def task_settings(st, cfg: DictConfig, *keys: str) -> list:
    """The values of ``keys`` (e.g. ``lr``, ``batch_size``) in the stage's settings ``st``, each left
    unset (null) taken from the task's defaults (``conf/task/<name>.yaml``)."""
    return [getattr(st, k) if getattr(st, k) is not None else cfg.task[k] for k in keys]


def pair_reading(cfg: DictConfig, task) -> dict:
    """``load_classifier``'s ``pair_encoding`` and ``pair_scale`` for the run's ``task.pair_encoding``
    (:mod:`tdlight.model.pairs`); ``bi`` on a task that is not a similarity regression is refused."""
    encoding = getattr(cfg.task.pair_encoding, "value", cfg.task.pair_encoding)
    if encoding == "bi" and task.similarity_scale is None:
        raise TdlightError(f"task.pair_encoding=bi predicts a similarity from the cosine of the two sentences' "
                           f"embeddings; task={task.name} is not a similarity task; valid: task.pair_encoding=cross "
                           "(bi: task=stsb)")
    return {"pair_encoding": encoding, "pair_scale": task.similarity_scale if encoding == "bi" else None}


def datamodule(cfg: DictConfig, task, tokenizer, *, max_length: int, batch_size: int, eval_batch_size: int,
               limit_train: int | None, limit_eval: int | None, num_workers: int, train: bool = True,
               augment: dict | None = None, seed: int | None = None, extra: list | tuple = (),
               limit_extra: int | None = None):
    """The task's GlueDataModule; ``seed`` (the stage's own; None: ``cfg.seed``) orders the training
    examples and draws the augmented copies; the pairs are read as ``task.pair_encoding`` says; ``extra``
    ((task, split) pairs) joins the training split without labels (distill's ``extra_text``)."""
    if tokenizer is None:
        raise TdlightError("the model directory has no tokenizer files; GLUE stages need one to tokenize the text")
    return GlueDataModule(
        task.name, tokenizer, data_dir=Path(cfg.paths.data_dir) / "glue", source=cfg.task.source,
        max_length=max_length, batch_size=batch_size, eval_batch_size=eval_batch_size, num_workers=num_workers,
        cache_dir=cfg.paths.cache_dir, seed=cfg.seed if seed is None else seed, limit_train=limit_train, limit_eval=limit_eval, train=train,
        augment=augment, pair_encoding=pair_reading(cfg, task)["pair_encoding"], extra=tuple(extra),
        limit_extra=limit_extra,
    )


def model_summary(model: nn.Module) -> dict[str, float]:
    """Encoder parameters and the paper's (encoder) compression ratio (1.0 for a dense model, also one cut
    to no layer), and the whole model's parameters (embeddings, head and all: what the user takes home)."""
    counts = count_parameters(model)
    encoder = counts["encoder_weights"] + counts["encoder_biases"] + counts["encoder_layernorms"]
    dense = dense_counts(encoder_shape(model))["encoder"] if is_compressed(model) else encoder
    out = {"encoder_params": encoder, "ratio": dense / encoder if encoder else 1.0,
           "model_params": encoder + counts["embeddings"] + counts["other"]}
    if is_compressed(model):
        spec = get_encoder(model).compression
        out.update(rank_in=spec.rank_in, rank_out=spec.rank_out, variant=spec.variant)
    return out


DIAGNOSTIC_LABELS = {"majority_score": "majority-class baseline", "majority_share": "majority class's share (gold)",
                     "top_share": "top-prediction share",
                     "balanced_accuracy": "balanced accuracy (mean class recall)",
                     "spread": "prediction spread (std / label std)",
                     "loss": "loss (gold labels: cross-entropy, MSE for regression)"}


def is_constant(results: dict[str, float]) -> bool:
    """Whether any evaluated split's predictions were (nearly) constant (see ``prediction_stats``)."""
    return any(v for k, v in results.items() if k.split("/")[-1] == "constant")


def warn_if_constant(results: dict[str, float], who: str) -> bool:
    """A loud console warning (and a log line) when ``who`` predicts (nearly) one class; returns the flag."""
    if not is_constant(results):
        return False
    share = {k: v for k, v in results.items() if k.split("/")[-1] in ("top_share", "spread")}
    msg = (f"{who} is a constant predictor ({', '.join(f'{k} {v:.3f}' for k, v in share.items())}; more than "
           f"{CONSTANT_SHARE:.0%} of dev predictions in one class, or no spread): it has learned nothing, "
           "whatever its score")
    Console(stderr=True).print(f"[bold red]WARNING[/]: {msg}")
    log.warning("%s", msg, extra=FILE_ONLY)  # (on the console above)
    return True


def results_table(title: str, r: dict) -> Table:
    t = Table(title=title)
    t.add_column("")
    t.add_column("value", justify="right")
    for k, v in r["dev"].items():
        split, _, name = k.rpartition("/")
        if name == "constant":
            continue
        label = DIAGNOSTIC_LABELS.get(name, f"dev {name}")
        label = "[bold]GLUE score" if k == "score" else f"{split} {label}".strip()
        t.add_row(label, f"{v:.4f}")
    if is_constant(r["dev"]):
        t.add_row("[bold red]constant predictor", "[bold red]yes")
    if r.get("score_fp32") is not None:
        t.add_row(f"GLUE score at fp32 (shipped: {r['precision']})", f"{r['score_fp32']:.4f}")
    t.add_row("encoder parameters", f"{r['encoder_params']:,}")
    # a dense model (a teacher, or one cut to fewer layers) is not compressed: its size against the
    # teacher it was cut from is the pipeline's table (evaluate alone does not know that teacher)
    t.add_row("compression ratio (encoder)", f"{r['ratio']:.2f}×" if r.get("rank_in") else "dense (not compressed)")
    if r.get("model_params"):
        t.add_row("whole-model parameters", f"{r['model_params']:,}")
    if r.get("model_bytes"):
        t.add_row(f"bytes on disk ({r.get('precision', 'fp32')})", f"{r['model_bytes'] / 1e6:.1f} MB")
    if r.get("epoch_seconds"):
        t.add_row("s / epoch (train)", ", ".join(f"{s:.0f}" for s in r["epoch_seconds"]))
    if r.get("examples_per_second"):
        t.add_row("examples / s (eval)", f"{r['examples_per_second']:.1f}")
    return t
