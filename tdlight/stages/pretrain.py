"""``stage=pretrain``: reconstruction pretraining of a compressed student on unlabeled text.

The student (a ``stage=decompose`` run, or a ``stage=cut`` run: the teacher cut to fewer layers, dense,
mapped onto the teacher's depth by ``layer_map``) learns to reproduce the uncompressed teacher's
hidden states and pre-softmax attention scores on packed corpus sequences
(:class:`tdlight.data.corpus.datamodule.CorpusDataModule`), for ``stage.max_steps`` optimizer steps with
linear warm-up and decay. The teacher is frozen, in eval mode, under ``no_grad``; the
student's factors, biases and LayerNorms train (embeddings only with
``stage.train_embeddings``). The held-out loss (WikiText-103 valid by default) is logged
every ``stage.val_every_n_steps``; the result is a compressed model directory in ``model/``
for ``stage=distill stage.student=<this run>``.
"""

from __future__ import annotations

import logging
from pathlib import Path

import lightning as L
import torch
from omegaconf import DictConfig, OmegaConf
from rich.table import Table
from torch import nn

from tdlight.config import task_options
from tdlight.data.corpus.datamodule import CorpusDataModule
from tdlight.data.corpus.files import resolve_corpus_files
from tdlight.errors import TdlightError
from tdlight.model.capture import forward_with_scores
from tdlight.model.embedding import train_compressed_embeddings
from tdlight.model.io import load_tokenizer
from tdlight.model.surgery import encoder_shape, set_dropout
from tdlight.model.teacher import load_model, load_teacher, resolve_teacher
from tdlight.stages import training
from tdlight.stages.classifier import MODEL_INPUTS, model_summary
from tdlight.stages.registry import settings
from tdlight.stages.runs import TASK_TEXT, check_positions, student_source, task_text_file, teacher_source
from tdlight.stages.trainer import adamw
from tdlight.stages.losses import intermediate_loss, layer_map

log = logging.getLogger("tdlight.pretrain")


class PretrainModule(L.LightningModule):
    def __init__(self, student: nn.Module, teacher: nn.Module, *, pairs: list[tuple[int, int]],
                 weights: dict[str, float], lr: float, weight_decay: float, warmup_ratio: float,
                 train_embeddings: bool, total_steps: int):
        super().__init__()
        self.model = student
        object.__setattr__(self, "teacher", teacher.eval().requires_grad_(False))  # not a submodule
        self.pairs, self.weights = pairs, weights
        self.lr, self.weight_decay, self.warmup_ratio = lr, weight_decay, warmup_ratio
        self.total_steps = total_steps
        if not train_embeddings:
            self.model.base_model.embeddings.requires_grad_(False)
            train_compressed_embeddings(self.model)  # a compressed word-embedding table is trained back
        self.val_loss: float | None = None
        self._val = []

    def on_fit_start(self) -> None:
        self.model.train()
        self.teacher.to(self.device).eval()

    def _loss(self, batch):
        inputs = {k: batch[k] for k in MODEL_INPUTS if k in batch}
        with torch.no_grad():
            t = forward_with_scores(self.teacher, **inputs)
        return intermediate_loss(forward_with_scores(self.model, **inputs), t, self.pairs, self.weights)

    def training_step(self, batch, batch_idx):
        loss, parts = self._loss(batch)
        n = len(batch["input_ids"])
        for k, v in parts.items():
            self.log(f"train/{k}_loss", v, on_step=True, batch_size=n)
        self.log("train/loss", loss, prog_bar=True, on_step=True, batch_size=n)
        return loss

    def on_validation_epoch_start(self) -> None:
        self._val = []

    def validation_step(self, batch, batch_idx):
        loss, parts = self._loss(batch)
        self._val.append(loss.detach())
        self.log("val/loss", loss, prog_bar=True, batch_size=len(batch["input_ids"]), sync_dist=True)

    def on_validation_epoch_end(self) -> None:
        if self._val:
            self.val_loss = float(torch.stack(self._val).mean())

    def configure_optimizers(self):
        from transformers import get_linear_schedule_with_warmup

        opt = adamw(self.model, self.lr, self.weight_decay)
        sched = get_linear_schedule_with_warmup(opt, int(self.warmup_ratio * self.total_steps), self.total_steps)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def check(cfg: DictConfig, where: str = "stage", wired: tuple[str, ...] = ()) -> None:
    """The settings checks that load no model (:mod:`tdlight.stages.registry`): the step budget, the
    corpus files, and the student and teacher given — unless ``wired`` (a pipeline fills them from
    steps that have not run yet)."""
    st = settings(cfg)
    if st.train_files == TASK_TEXT and cfg.get("task") is None:
        raise TdlightError(f"{where}.train_files={TASK_TEXT} reconstructs the teacher on the task's training text: add "
                           f"task=<name>; valid: {task_options()}")
    for name in ("train_files", "heldout_files"):
        if getattr(st, name) and not (name == "train_files" and st.train_files == TASK_TEXT):
            resolve_corpus_files(getattr(st, name), what=f"{where}.{name}")
    if "stage.student" not in wired:
        student_source(cfg)
    if "teacher.run_dir" not in wired:
        resolve_teacher(teacher_source(cfg))


def run(cfg: DictConfig, run_dir: Path, extra_callbacks: list | None = None) -> dict:
    check(cfg)
    st = settings(cfg)
    student_dir = student_source(cfg)
    ckpt = training.begin(cfg, run_dir)
    source = teacher_source(cfg)
    teacher, tokenizer = load_teacher(source)
    student = load_model(student_dir)  # compressed (factorized, as it trains) or a dense cut of the teacher
    if st.dropout is not None:
        set_dropout(student, st.dropout)
    tokenizer = tokenizer or load_tokenizer(student_dir)
    if tokenizer is None:
        raise TdlightError("neither the teacher nor the student directory has tokenizer files")
    if encoder_shape(student).hidden != encoder_shape(teacher).hidden:
        raise TdlightError(f"student hidden size {encoder_shape(student).hidden} != teacher's "
                           f"{encoder_shape(teacher).hidden}: pretrain the student of this teacher")
    ls, lt = encoder_shape(student).num_layers, encoder_shape(teacher).num_layers
    if ls == 0:  # (a pipeline skips the step for such a cut)
        raise TdlightError(f"student {student_dir!r} has no encoder layer (a teacher cut to 0 layers): reconstruction "
                           "pretraining has no hidden state or attention score to match, and its embeddings are the "
                           "teacher's own; valid: a student with at least one layer (stage=distill trains this one)")
    pairs = layer_map(st.layer_map, ls, lt)
    check_positions(student, **{"stage.max_length": st.max_length})
    # train_files=task: the task's training text, one example a line (pairs joined), packed like any corpus
    train_files = str(task_text_file(cfg)) if st.train_files == TASK_TEXT else st.train_files
    dm = CorpusDataModule(tokenizer, train_files=train_files, heldout_files=st.heldout_files or None,
                          max_length=st.max_length, batch_size=st.batch_size, seed=cfg.seed,
                          num_workers=st.num_workers, shuffle_buffer=st.shuffle_buffer,
                          max_heldout_sequences=st.max_heldout_sequences)
    module = PretrainModule(student, teacher, pairs=pairs,
                            weights={"hidden": st.hidden_weight, "attention": st.attention_weight,
                                     "embedding": st.embedding_weight},
                            lr=st.lr, weight_decay=st.weight_decay, warmup_ratio=st.warmup_ratio,
                            train_embeddings=st.train_embeddings, total_steps=st.max_steps)
    summary = {"teacher": source, "student": student_dir, **model_summary(student)}
    # step-based: validate and write last.ckpt every val_every_n_steps (a corpus epoch can be very long)
    every = cfg.trainer.checkpoint_every_n_steps or st.val_every_n_steps
    cfg_t = OmegaConf.merge(cfg, {"trainer": {"max_steps": st.max_steps, "check_val_every_n_epoch": None,
                                              "val_check_interval": st.val_every_n_steps,
                                              "checkpoint_every_n_steps": every}})
    fitted = training.fit(cfg_t, run_dir, module, dm, ckpt=ckpt, max_epochs=-1, monitor=None, summary=summary,
                          extra_callbacks=extra_callbacks)
    trainer = fitted.trainer
    tokens = trainer.global_step * trainer.accumulate_grad_batches * st.batch_size * st.max_length * trainer.world_size
    out = {"stage": "pretrain", **summary, "steps": trainer.global_step, "tokens": tokens, "train_files": train_files,
           "heldout_loss": module.val_loss, "pairs": pairs}
    return training.finish(run_dir, fitted, out, model=module.model, tokenizer=tokenizer,
                           model_extra={"teacher": source, "student": student_dir}, table=results_table)


def results_table(out: dict) -> Table:
    t = Table(title="tdlight pretrain")
    t.add_column("")
    t.add_column("value", justify="right")
    for k in ("steps", "tokens", "heldout_loss", "encoder_params", "ratio"):
        v = out[k]
        t.add_row(k.replace("_", " "), "-" if v is None else (f"{v:,}" if isinstance(v, int) else f"{v:.4f}"))
    return t
