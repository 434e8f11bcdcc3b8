"""``stage=distill``: task distillation from the fine-tuned teacher into a compressed student (or into the
teacher cut to fewer layers, its peer at equal size: ``stage=cut``).

Phase 1 (the first ``stage.intermediate_epochs`` epochs) matches the student's hidden
states and pre-softmax attention scores to the teacher's on the mapped layers; phase 2
(``stage.prediction_epochs``) matches the predictions (soft targets at a temperature, MSE
for STS-B), optionally mixed with the gold labels; its first ``stage.head_epochs`` train the task head
alone on the frozen student (linear probing, then fine-tuning). ``stage.extra_text`` adds inputs
without labels (the task's test pairs, another task's) for the teacher to score. The phase follows from the epoch, so a
resumed run picks up in the right phase; each phase has its own linear warm-up and decay.
The teacher is frozen, in eval mode, and runs under ``no_grad``; its logits on the training set
are computed once before training (:func:`cache_teacher_logits`) and read by every phase-2
epoch instead of a teacher forward per step. Validation reports the
student's GLUE score every epoch; only phase-2 epochs compete for ``best.ckpt``. The
best student is saved as a compressed model directory in ``model/``.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import torch
from omegaconf import DictConfig
from torch import nn

from tdlight.data.glue import extra_text_source, resolve_source
from tdlight.errors import TdlightError
from tdlight.model.capture import forward_with_scores
from tdlight.model.embedding import train_compressed_embeddings
from tdlight.model.pairs import pair_encoding_of
from tdlight.model.pooling import pooling_of, set_pooling
from tdlight.model.surgery import encoder_shape
from tdlight.model.teacher import body_parameters, copy_head, load_classifier, load_masked_lm
from tdlight.stages import training
from tdlight.stages.classifier import (
    MODEL_INPUTS, GlueModule, check_lengths, check_task_data, datamodule, model_summary, monitor, pair_reading,
    require_task, results_table, steps_per_epoch, task_settings, training_steps,
)
from tdlight.stages.registry import settings
from tdlight.stages.runs import check_teacher_task, saved_config, student_source
from tdlight.stages.schemas import AugmentMethod, StudentHead
from tdlight.stages.trainer import adamw
from tdlight.stages.losses import gold_loss, intermediate_loss, layer_map, prediction_loss

log = logging.getLogger("tdlight.distill")

TEACHER_LOGITS = "teacher_logits"  # the train split's column of cached soft targets (see cache_teacher_logits)


class DistillModule(GlueModule):
    """A :class:`GlueModule` for the student that learns from a frozen ``teacher``."""

    def __init__(self, student: nn.Module, teacher: nn.Module, task, *, intermediate_epochs: int,
                 pairs: list[tuple[int, int]], weights: dict[str, float], temperature: float,
                 gold_weight: float, lr: float, intermediate_lr: float, weight_decay: float, warmup_ratio: float,
                 train_embeddings: bool, relative_losses: bool = False, head_epochs: int = 0,
                 head_lr: float | None = None):
        super().__init__(student, task, lr=lr, weight_decay=weight_decay, warmup_ratio=warmup_ratio)
        # not a submodule: the teacher is neither trained, nor checkpointed, nor moved by optimizers
        object.__setattr__(self, "teacher", teacher.eval().requires_grad_(False))
        self.intermediate_epochs = intermediate_epochs
        self.pairs, self.weights = pairs, weights
        self.temperature, self.gold_weight = temperature, gold_weight
        self.intermediate_lr = intermediate_lr
        self.relative_losses = relative_losses
        self.steps_per_epoch: int | None = None
        if not train_embeddings:
            self.model.base_model.embeddings.requires_grad_(False)
            train_compressed_embeddings(self.model)  # a compressed word-embedding table is trained back
        self.head_epochs, self.head_lr = head_epochs, head_lr
        # what the student trains outside its head: frozen during the head-only epochs (see on_train_epoch_start)
        self._body = [p for p in body_parameters(self.model) if p.requires_grad]

    def head_only(self, epoch: int | None = None) -> bool:
        """Whether ``epoch`` (default: the current one) is one of the first ``head_epochs`` prediction epochs."""
        epoch = self.current_epoch if epoch is None else epoch
        return self.intermediate_epochs <= epoch < self.intermediate_epochs + self.head_epochs

    def phase(self, epoch: int | None = None) -> int:
        epoch = self.current_epoch if epoch is None else epoch
        return 1 if epoch < self.intermediate_epochs else 2

    def on_fit_start(self) -> None:
        super().on_fit_start()
        self.teacher.to(self.device).eval()

    def on_train_epoch_start(self) -> None:
        # linear probing, then fine-tuning: the body is frozen (no gradient, so AdamW neither steps nor decays it)
        # in the head-only epochs; set every epoch, so a resumed run is in the right state
        frozen = self.head_only()
        for p in self._body:
            p.requires_grad_(not frozen)

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        inputs = {k: batch[k] for k in MODEL_INPUTS if k in batch}
        phase = self.phase()
        if phase == 1:
            with torch.no_grad():
                t = forward_with_scores(self.teacher, **inputs)
            loss, parts = intermediate_loss(forward_with_scores(self.model, **inputs), t, self.pairs, self.weights,
                                            relative=self.relative_losses)
        else:
            parts = {}
            logits = self.model(**inputs).logits
            loss = logits.new_zeros(())
            if self.gold_weight < 1:  # gold_weight 1 is plain fine-tuning: the teacher is not needed
                if TEACHER_LOGITS in batch:  # computed once before training
                    t_logits = batch[TEACHER_LOGITS].to(logits.dtype)
                else:
                    with torch.no_grad():
                        t_logits = self.teacher(**inputs).logits
                parts["prediction"] = prediction_loss(logits, t_logits, temperature=self.temperature,
                                                      regression=self.task.is_regression)
                loss = loss + (1 - self.gold_weight) * parts["prediction"]
            if self.gold_weight > 0:
                parts["gold"] = gold_loss(logits, batch["labels"], regression=self.task.is_regression)
                loss = loss + self.gold_weight * parts["gold"]
        n = len(batch["labels"])  # (a bi-encoder's batch holds two sequences per example)
        for k, v in parts.items():
            self.log(f"train/{k}_loss", v, on_step=True, on_epoch=True, batch_size=n)
        self.log("train/loss", loss, prog_bar=True, on_step=True, on_epoch=True, batch_size=n)
        self.log("train/phase", float(phase), on_step=True, on_epoch=False, batch_size=n)
        return loss

    def log_results(self, results: dict[str, float]) -> None:
        if self.trainer.state.fn == "fit" and self.phase() == 1:
            # the head has not been trained yet: phase-1 epochs are logged apart and never win best.ckpt
            for k, v in results.items():
                self.log(f"val/phase1_{k}", v, sync_dist=True)
            self.log("val/score", float("-inf"), prog_bar=True, sync_dist=True)  # same args as phase 2
            if self.monitor != "val/score":  # (what best.ckpt watches: never a phase-1 epoch)
                self.log(self.monitor, float("-inf"), sync_dist=True)
        else:
            super().log_results(results)

    def configure_optimizers(self):
        # the base lr is phase 2's (stage.lr; the head's stage.head_lr): the optimizer, its checkpoints and the
        # logged lr hold the real rate; phase 1 runs at stage.intermediate_lr through the factor lr1 / lr2
        opt = adamw(self.model, self.lr, self.weight_decay, head_lr=self.head_lr)
        per_epoch = self.steps_per_epoch  # set by the stage, as total_steps (see classifier.training_steps)
        p1 = per_epoch * self.intermediate_epochs
        total = self.total_steps
        p2 = max(1, total - p1)
        scale1, warm = self.intermediate_lr / self.lr, self.warmup_ratio

        def factor(step: int) -> float:
            # piecewise: phase 1 warm-up/decay to 0, then phase 2 warm-up/decay to 0 (of the base lr)
            if step < p1:
                w = max(1, int(warm * p1))
                return scale1 * (step / w if step < w else max(0.0, (p1 - step) / max(1, p1 - w)))
            s = step - p1
            w = max(1, int(warm * p2))
            return s / w if s < w else max(0.0, (p2 - s) / max(1, p2 - w))

        sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


@torch.no_grad()
def cache_teacher_logits(teacher: nn.Module, dm, device: torch.device) -> float:
    """Add the frozen teacher's logits on every training example as the train split's
    ``teacher_logits`` column; returns the seconds it took.

    The teacher is in eval mode (no dropout) and its pooling masks padding, so its output on an
    example is the same every epoch: one pass here, at the evaluation batch size and sorted by
    length (little padding), replaces a teacher forward in every training step of every phase-2
    epoch. Under DDP every rank computes the whole column (the split is shared).
    """
    t0 = time.perf_counter()
    ds = dm.datasets["train"]
    lengths = [len(x) for x in ds["input_ids"]]
    order = sorted(range(len(ds)), key=lengths.__getitem__)
    teacher.to(device).eval()
    out = torch.empty(0)
    for start in range(0, len(order), dm.eval_batch_size):
        idx = order[start:start + dm.eval_batch_size]
        rows = ds[idx]  # columns of lists
        batch = dm.collate([dict(zip(rows, values)) for values in zip(*rows.values())])
        logits = teacher(**{k: batch[k].to(device) for k in MODEL_INPUTS if k in batch}).logits.float().cpu()
        if not out.numel():
            out = torch.empty(len(ds), logits.shape[-1])
        out[idx] = logits
    dm.datasets["train"] = ds.add_column(TEACHER_LOGITS, out.tolist())
    return time.perf_counter() - t0


def masked_lm_for(cfg: DictConfig, tokenizer) -> nn.Module:
    """The masked LM of ``stage.augment_method=mlm``: ``stage.augment_mlm``, else the pretrained
    model the fine-tuned teacher started from (its run's ``teacher.path``). Its vocabulary must
    be the teacher's, since its predictions replace the teacher tokenizer's words."""
    name = settings(cfg).augment_mlm or saved_config(cfg.teacher.run_dir).teacher.path
    mlm, mlm_tokenizer = load_masked_lm(name)
    if mlm_tokenizer is None or mlm_tokenizer.get_vocab() != tokenizer.get_vocab():
        raise TdlightError(f"stage.augment_mlm={name!r} has another vocabulary than the teacher's tokenizer: "
                           "its predictions would be other words; use a masked LM with the teacher's vocabulary")
    return mlm


def extra_sources(cfg: DictConfig, task, where: str = "stage") -> list[tuple]:
    """``stage.extra_text`` as ``(task, split)`` pairs, each checked (a clear error per bad entry) and its
    data file found (or the hub an option)."""
    out = []
    for text in settings(cfg).extra_text:
        source, split = extra_text_source(text, task, f"{where}.extra_text")  # (DataError: a TdlightError, reported as one)
        resolve_source(source, split, Path(cfg.paths.data_dir) / "glue", cfg.task.source)
        out.append((source, split))
    return out


def check(cfg: DictConfig, where: str = "stage", wired: tuple[str, ...] = ()) -> None:
    """The settings checks that load no model (:mod:`tdlight.stages.registry`): the task and its data,
    the two phases and their losses, augmentation, and the teacher and student given — unless
    ``wired`` (a pipeline fills them from steps that have not run yet)."""
    task = require_task(cfg)
    st = settings(cfg)
    if not cfg.teacher.get("run_dir"):
        raise TdlightError(f"stage={st.name} needs the fine-tuned teacher: teacher.run_dir=<finetune run directory>")
    if st.intermediate_epochs + st.prediction_epochs == 0:
        raise TdlightError(f"{where}.intermediate_epochs + {where}.prediction_epochs must be ≥ 1")
    if st.intermediate_epochs and not (st.hidden_weight or st.attention_weight or st.embedding_weight):
        raise TdlightError(f"phase 1 ({where}.intermediate_epochs > 0) needs a hidden, attention or embedding "
                           "weight > 0")
    if st.head_epochs > st.prediction_epochs:
        raise TdlightError(f"{where}.head_epochs={st.head_epochs} is more than {where}.prediction_epochs="
                           f"{st.prediction_epochs}: the head-only epochs are the first prediction epochs; valid: "
                           f"0..{st.prediction_epochs}")
    if (st.head_epochs or st.head_lr is not None) and pair_reading(cfg, task)["pair_encoding"] == "bi":
        name, value, valid = (("head_epochs", st.head_epochs, "0") if st.head_epochs else ("head_lr", st.head_lr, "null"))
        raise TdlightError(f"{where}.{name}={value} is for the task head, and a bi-encoder's head has no weight "
                           f"(task.pair_encoding=bi: the cosine of two embeddings); valid: {name}={valid}")
    if st.augment and st.gold_weight > 0:
        raise TdlightError(f"{where}.augment=true makes examples without a trustworthy gold label: "
                           f"use {where}.gold_weight=0 (soft targets only) with augmentation, or {where}.augment=false "
                           "for gold labels (a preset turns augmentation on for some tasks: conf/experiment_task)")
    if st.extra_text and st.gold_weight > 0:
        raise TdlightError(f"{where}.extra_text={list(st.extra_text)} adds examples without gold labels: "
                           f"use {where}.gold_weight=0 (soft targets only) with extra text")
    extra_sources(cfg, task, where)
    check_task_data(cfg, task, train=True)
    if "teacher.run_dir" not in wired:
        check_teacher_task(cfg)
    if "stage.student" not in wired:
        student_source(cfg)


def run(cfg: DictConfig, run_dir: Path, extra_callbacks: list | None = None) -> dict:
    check(cfg)
    task = require_task(cfg)
    st = settings(cfg)
    teacher_dir = check_teacher_task(cfg)
    student_dir = student_source(cfg)
    batch_size, max_length = task_settings(st, cfg, "batch_size", "max_length")
    seed = cfg.seed if st.seed is None else st.seed  # the student's own draws (stage.seed), else the run's
    ckpt = training.begin(cfg, run_dir, seed)

    teacher, tokenizer = load_classifier(str(teacher_dir), task.num_labels)
    pair = pair_reading(cfg, task)
    if pair_encoding_of(teacher) != pair["pair_encoding"]:  # its head would be replaced: not the teacher trained
        raise TdlightError(f"the teacher in {teacher_dir} was fine-tuned with task.pair_encoding="
                           f"{pair_encoding_of(teacher)}, this run reads pairs with task.pair_encoding="
                           f"{pair['pair_encoding']}; valid: the teacher's, or a teacher fine-tuned with this one")
    # compressed, or a dense cut of the teacher; its head is trained here, so it reads pairs as the run says
    student, _ = load_classifier(student_dir, task.num_labels, **pair)
    check_lengths(student, cfg, max_length)
    pooling = set_pooling(student, pooling_of(teacher)) and pooling_of(teacher)  # the head reads what the teacher's read
    head = st.head.value
    if st.head is StudentHead.teacher and ckpt is None:  # a resumed run restores its own head from the checkpoint
        copied = copy_head(student, teacher)
        log.info("student head: the teacher's (%s)", ", ".join(copied))
    ls, lt = encoder_shape(student).num_layers, encoder_shape(teacher).num_layers
    pairs = layer_map(st.layer_map, ls, lt) if st.intermediate_epochs else []  # (phase 1 reads them)
    augment = None
    if st.augment:
        augment = {"copies": st.augment_copies, "prob": st.augment_prob, "neighbours": st.augment_neighbours}
        if st.augment_method is AugmentMethod.mlm:
            augment["mlm"] = masked_lm_for(cfg, tokenizer)
        else:
            augment["embeddings"] = teacher.get_input_embeddings().weight.detach()
    dm = datamodule(cfg, task, tokenizer, max_length=max_length, batch_size=batch_size,
                    eval_batch_size=st.eval_batch_size, limit_train=st.limit_train, limit_eval=st.limit_eval,
                    num_workers=st.num_workers, augment=augment, seed=seed, extra=extra_sources(cfg, task),
                    limit_extra=st.extra_limit)
    dm.prepare_data()
    dm.setup("fit")
    module = DistillModule(
        student, teacher, task, intermediate_epochs=st.intermediate_epochs, pairs=pairs,
        weights={"hidden": st.hidden_weight, "attention": st.attention_weight, "embedding": st.embedding_weight},
        temperature=st.temperature, gold_weight=st.gold_weight, lr=st.lr,
        intermediate_lr=st.intermediate_lr if st.intermediate_lr is not None else st.lr,
        weight_decay=st.weight_decay, warmup_ratio=st.warmup_ratio, train_embeddings=st.train_embeddings,
        relative_losses=st.relative_losses, head_epochs=st.head_epochs, head_lr=st.head_lr,
    )
    module.monitor = monitor(task, st.select_by)
    if not any(p.requires_grad for p in module.model.parameters()):  # (else: autograd's error at the first step)
        raise TdlightError(f"the student {student_dir} has nothing to train: no encoder layer, its embeddings frozen "
                           f"(train_embeddings=false) and a head without weights (task.pair_encoding="
                           f"{pair['pair_encoding']}); valid: train_embeddings=true (stage.distill.train_embeddings "
                           "in a pipeline), or a student with layers; scored as it is: stage=evaluate")

    summary = {"task": task.name, "teacher": str(teacher_dir), "student": student_dir, "head": head, "pooling": pooling,
               **model_summary(student)}
    n = len(dm.datasets["train"])

    def prepare(trainer) -> None:
        if st.prediction_epochs and st.gold_weight < 1:
            secs = cache_teacher_logits(teacher, dm, trainer.strategy.root_device)
            log.info("cached the teacher's logits on %d training examples in %.1f s", n, secs)
        module.total_steps = training_steps(trainer, n, batch_size)
        module.steps_per_epoch = steps_per_epoch(trainer, n, batch_size)
        log.info("distilling %s -> %s on %s: %d intermediate + %d prediction epochs (the first %d of them the head "
                 "alone), layer map %s", teacher_dir, student_dir, task.name, st.intermediate_epochs,
                 st.prediction_epochs, st.head_epochs, pairs)

    fitted = training.fit(cfg, run_dir, module, dm, ckpt=ckpt, max_epochs=st.intermediate_epochs + st.prediction_epochs,
                          monitor=module.monitor, summary=summary, extra_callbacks=extra_callbacks,
                          before_fit=prepare)
    results = fitted.results
    out = {"stage": "distill", **summary, "dev": results, "score": results["score"], "pairs": pairs,
           "intermediate_epochs": st.intermediate_epochs, "prediction_epochs": st.prediction_epochs,
           "lr": st.lr, "gold_weight": st.gold_weight, "temperature": st.temperature,
           "train_embeddings": st.train_embeddings, "head_epochs": st.head_epochs, "head_lr": st.head_lr,
           "seed": seed,
           "extra_text": list(st.extra_text), "extra_examples": dm.extra_examples,
           "selected_by": module.monitor, "epoch_seconds": fitted.epoch_seconds, "global_step": fitted.trainer.global_step, "train_examples": n}
    return training.finish(run_dir, fitted, out, model=module.model, tokenizer=tokenizer,
                           model_extra={"teacher": str(teacher_dir), "student": student_dir, "task": task.name},
                           who="the distilled student", table=results_table(f"tdlight distill: {task.name} — student", out))
