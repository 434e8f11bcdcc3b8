"""Each stage's settings: one schema per stage (the option ``stage=<name>``, stored by
:func:`tdlight.stages.registry.register`; no YAML file), every default and every range written once,
here, beside the stages that read them. A ``ranged`` field's range is checked before any work
(:func:`tdlight.config.check_ranges`); a stage's ``check`` adds what one field cannot say alone.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Optional

from tdlight.config import Execution, Precision, ranged
from tdlight.model.calibration import REFIT_MODES


class Fit(str, Enum):  # stage.fit: what the factors fit
    weights = "weights"  # HOOI on the weights (the paper)
    outputs = "outputs"  # each block's outputs on calibration text (function-preserving, DESIGN §6)


class TeacherWeights(str, Enum):  # stage.teacher_weights: which teacher the pipeline decomposes
    pretrained = "pretrained"  # teacher.path, as in the paper
    finetuned = "finetuned"  # the pipeline's finetune step (alone: teacher.run_dir)


# stage.fit_refit: how a refit pass refits the factors (tdlight.model.calibration.refit_outputs)
RefitMode = Enum("RefitMode", {m: m for m in REFIT_MODES}, type=str, module=__name__)


class Select(str, Enum):  # stage.select: which of the teacher's layers a cut keeps (tdlight.model.surgery.layer_choice)
    first = "first"  # the first L
    even = "even"  # evenly spaced, the first and the last among them


class SelectBy(str, Enum):  # stage.select_by: the dev number that picks the epoch kept (best.ckpt) and early stopping
    score = "score"  # the task's GLUE score
    # the mean class recall: no credit for leaning on a skewed dev set's majority (MRPC's F1 rewards predicting its
    # 68% positive class); a regression task (STS-B) has none and is selected by its score
    balanced_accuracy = "balanced_accuracy"


class StudentHead(str, Enum):
    teacher = "teacher"  # pooler + classifier copied from the fine-tuned teacher
    student = "student"  # the student's own: new (random) when it has none for this task's labels


class AugmentMethod(str, Enum):
    neighbours = "neighbours"  # nearest tokens in the teacher's input-embedding space (any teacher)
    mlm = "mlm"  # a masked LM's in-context predictions (TinyBERT; needs a checkpoint with an MLM head)


@dataclass
class DecomposeStage:
    name: str = "decompose"
    # which teacher's weights the pipeline decomposes: pretrained (teacher.path, as in the paper) or
    # finetuned (the pipeline's finetune step). Alone, stage=decompose decomposes the teacher it is given
    # (teacher.run_dir, else teacher.path); finetuned there needs teacher.run_dir.
    teacher_weights: TeacherWeights = TeacherWeights.pretrained
    save_model: bool = True
    cache: bool = True  # reuse ${paths.cache_dir}/decompose/<hash of teacher weights + resolved spec>
    # activation-aware refinement (beyond the paper): train the factors on calibration text so that
    # each compressed layer's outputs match the teacher's (layer by layer, teacher inputs), and report
    # the layer-output error before and after; 0 steps = off
    refine_steps: int = ranged("an integer ≥ 0", 0)
    refine_lr: float = ranged("> 0", 1e-3)
    refine_max_length: int = ranged("an integer ≥ 3", 128)
    refine_files: Any = "${paths.data_dir}/pretrain_corpus/enwiki_2015_wikiextractor_AA.txt.gz"
    # held-out text, read by the refinement and by the output fit alike: heldout_batches batches of
    # batch_size sequences (batch_size is also the refinement's training batch)
    batch_size: int = ranged("an integer ≥ 1", 16)
    heldout_files: Any = "${paths.data_dir}/pretrain_corpus/wikitext103_heldout/wiki.valid.tokens.gz"
    heldout_batches: int = ranged("an integer ≥ 1", 4)
    # how the factors are fitted: weights (HOOI on the weights, the paper) or outputs (function-
    # preserving, DESIGN §6: start from HOOI and refit the factors so that every block's outputs on
    # calibration text match the teacher's, whitened by each block's input Gram, every block weighted
    # by its relative error; reports the held-out output error per layer and of the last hidden state,
    # on heldout_files, batch_size x heldout_batches sequences, for HOOI and the fit)
    fit: Fit = Fit.weights
    # calibration text: corpus files, or `task`: the task's own training text (task=<name>; one line per
    # example, a pair's two sentences on one line) — STS-B's student keeps 2.6x more of its teacher (RESULTS §7c)
    calibration_files: Any = "${paths.data_dir}/pretrain_corpus/enwiki_2015_wikiextractor_AA.txt.gz"
    calibration_sequences: int = ranged("an integer ≥ 1", 256)
    calibration_max_length: int = ranged("an integer ≥ 3", 128)
    # Gram damping, a fraction of its mean diagonal (at 1e6 and above the fit is the damping, not the data)
    calibration_damp: float = ranged("in [0, 1e6)", 1e-2)
    fit_iters: int = ranged("an integer ≥ 0", 10)  # sweeps of the alternation after the closed-form start
    # fit=outputs, then refit on the compressed model's own inputs (errors do not compound):
    # passes (0 = off; a pass is kept only if the held-out last-hidden-state error improves),
    # how (layerwise: every linear in forward order, shared factors fixed | global: every
    # factor at once | both), and whether the biases are refit in closed form
    fit_passes: int = ranged("an integer ≥ 0", 1)
    fit_refit: RefitMode = RefitMode.layerwise
    fit_bias: bool = True


@dataclass
class CutStage:
    """The teacher cut to fewer of its own layers (DistilBERT-style), dense: the peer at equal size of
    the student that ``compression`` would give, for pretrain and distill to train with the same budget.
    ``layers`` null: the depth whose dense encoder is nearest to that student's encoder parameters."""

    name: str = "cut"
    # which teacher is cut: pretrained (teacher.path) or finetuned (the pipeline's finetune step; alone:
    # teacher.run_dir); null: alone, the teacher given (teacher.run_dir, else teacher.path); in a pipeline,
    # stage.decompose.teacher_weights — so a preset with cut in place of decompose cuts the teacher its
    # student is decomposed from, and pretrain reconstructs that same teacher
    teacher_weights: Optional[TeacherWeights] = None
    layers: Optional[int] = ranged("an integer ≥ 0", None)  # null: nearest to the compressed student's size
    select: Select = Select.first  # first L, or evenly spaced from the first to the last


@dataclass
class FinetuneStage:
    """Fine-tune the teacher on ``task``; unset values come from the task's defaults."""

    name: str = "finetune"
    lr: Optional[float] = ranged("> 0", None)
    epochs: Optional[int] = ranged("an integer ≥ 1", None)
    batch_size: Optional[int] = ranged("an integer ≥ 1", None)
    max_length: Optional[int] = ranged("an integer ≥ 3", None)
    weight_decay: float = ranged("≥ 0", 0.01)
    warmup_ratio: Optional[float] = ranged("in [0, 1)", None)
    patience: Optional[int] = ranged("an integer ≥ 1", None)  # stop after N epochs without a better dev score
    # the training loss's class weights: null/none (plain cross-entropy), balanced (n / (classes × count) over the
    # training examples: each class weighs the same), or one positive number per class; checked at the stage
    class_weights: Any = None
    seed: Optional[int] = ranged("an integer ≥ 0", None)  # this step's draws (head, order, dropout); null: the run's seed
    eval_batch_size: int = ranged("an integer ≥ 1", 64)
    limit_train: Optional[int] = ranged("an integer ≥ 1", None)  # first N training examples (smoke runs, tests)
    limit_eval: Optional[int] = ranged("an integer ≥ 1", None)
    num_workers: int = ranged("an integer ≥ 0", 0)


@dataclass
class PretrainStage:
    """Reconstruction pretraining: the compressed ``student`` mimics the uncompressed teacher on text.

    Hidden-state and attention-score MSE (+ embedding-output MSE if weighted) on the mapped
    layers over packed corpus sequences; ``max_steps`` optimizer steps; held-out loss every
    ``val_every_n_steps``.
    """

    name: str = "pretrain"
    student: str = ""  # a decompose run directory or a compressed model directory
    # files, globs or a list; "task": the task's own training text (one example a line, packed like a corpus)
    train_files: Any = "${paths.data_dir}/pretrain_corpus/enwiki_2015_wikiextractor_AA.txt.gz"
    heldout_files: Any = "${paths.data_dir}/pretrain_corpus/wikitext103_heldout/wiki.valid.tokens.gz"
    max_length: int = ranged("an integer ≥ 3", 128)
    batch_size: int = ranged("an integer ≥ 1", 32)
    max_steps: int = ranged("an integer ≥ 1", 1000)  # optimizer steps (tokens seen = max_steps x batch_size x max_length)
    lr: float = ranged("> 0", 1e-4)
    weight_decay: float = ranged("≥ 0", 0.01)
    warmup_ratio: float = ranged("in [0, 1)", 0.05)
    layer_map: Any = "all"
    hidden_weight: float = ranged("≥ 0", 1.0)
    attention_weight: float = ranged("≥ 0", 1.0)
    embedding_weight: float = ranged("≥ 0", 0.0)
    train_embeddings: bool = False
    dropout: Optional[float] = ranged("in [0, 1)", 0.0)  # the student's dropout while pretraining; None keeps the model's; 0 matches the
    #                                 teacher's eval-mode target exactly
    val_every_n_steps: int = ranged("an integer ≥ 1", 200)
    max_heldout_sequences: Optional[int] = ranged("an integer ≥ 1", 256)
    shuffle_buffer: int = ranged("an integer ≥ 0", 10000)
    num_workers: int = ranged("an integer ≥ 0", 0)


@dataclass
class DistillStage:
    """Task distillation: fine-tuned teacher (``teacher.run_dir``) -> compressed ``student`` on ``task``.

    Phase 1 (``intermediate_epochs``): hidden-state and attention-score MSE on the mapped
    layers (+ embedding-output MSE if its weight > 0). Phase 2 (``prediction_epochs``):
    soft targets at ``temperature`` (MSE for STS-B), mixed with the gold-label loss by
    ``gold_weight``. Each phase has its own linear warm-up and decay.
    """

    name: str = "distill"
    student: str = ""  # a decompose/pretrain run directory or a compressed model directory
    intermediate_epochs: int = ranged("an integer ≥ 0", 1)
    prediction_epochs: int = ranged("an integer ≥ 0", 3)
    # not the task's lr (the teacher's recipe, up to 1e-4): the shared factors move every block at once and
    # 1e-4 overshoots after ~60 steps (docs/RESULTS.md §7a); 3e-5 is what every preset measured
    lr: float = ranged("> 0", 3e-5)
    intermediate_lr: Optional[float] = ranged("> 0", None)  # None: lr
    batch_size: Optional[int] = ranged("an integer ≥ 1", None)
    max_length: Optional[int] = ranged("an integer ≥ 3", None)
    weight_decay: float = ranged("≥ 0", 0.01)
    warmup_ratio: float = ranged("in [0, 1)", 0.1)
    layer_map: Any = "all"  # last | all | uniform | [[student, teacher], ...]
    hidden_weight: float = ranged("≥ 0", 1.0)
    attention_weight: float = ranged("≥ 0", 1.0)
    embedding_weight: float = ranged("≥ 0", 0.0)
    relative_losses: bool = False  # phase 1: each term is ‖student − teacher‖² / ‖teacher‖² (scale-free)
    temperature: float = ranged("> 0", 1.0)
    gold_weight: float = ranged("in [0, 1]", 0.0)  # 0: soft targets only; 1: plain gold-label fine-tuning
    select_by: SelectBy = SelectBy.score  # the dev number that picks the phase-2 epoch kept (best.ckpt)
    # the student's draws (order, dropout, augmentation, a new head); null: the run's seed. Another value
    # retrains only this step of a pipeline: the spread of a student over seeds with its teacher fixed
    seed: Optional[int] = ranged("an integer ≥ 0", None)
    head: StudentHead = StudentHead.student  # where the student's task head starts (docs/RESULTS.md §7: teacher fails lossy students)
    # the first head_epochs prediction epochs train the task head alone on the frozen student (linear probing),
    # the rest the whole student (LP-FT): a new head learns what the student's features say before they move
    head_epochs: int = ranged("an integer ≥ 0", 0)
    # the task head's rate in phase 2 (null: lr): a new head on a lossy student may want a larger one than the body
    head_lr: Optional[float] = ranged("> 0", None)
    train_embeddings: bool = False  # the embedding matrices stay frozen by default
    augment: bool = False  # TinyBERT-style word replacement: augment_copies copies of each train example, cached to disk
    augment_method: AugmentMethod = AugmentMethod.neighbours
    augment_mlm: str = ""  # the masked LM for augment_method=mlm; empty: the fine-tuned teacher's base model
    augment_copies: int = ranged("an integer ≥ 1", 4)  # augmented copies per training example
    augment_prob: float = ranged("in (0, 1]", 0.4)  # probability of replacing each replaceable word
    augment_neighbours: int = ranged("an integer ≥ 1", 10)  # candidates per word (nearest embeddings, or the masked LM's top predictions)
    # inputs without labels for the teacher to score, added to the training split: "<split>" of the run's task
    # (its unlabelled "test") or "<task>:<split>" of another task with as many text columns ("qnli:validation");
    # soft targets only (gold_weight=0); each source's first extra_limit examples (null: all)
    extra_text: list[str] = field(default_factory=list)
    extra_limit: Optional[int] = ranged("an integer ≥ 1", None)
    eval_batch_size: int = ranged("an integer ≥ 1", 64)
    limit_train: Optional[int] = ranged("an integer ≥ 1", None)
    limit_eval: Optional[int] = ranged("an integer ≥ 1", None)
    num_workers: int = ranged("an integer ≥ 0", 0)


@dataclass
class EvaluateStage:
    """Evaluate ``model`` (a run directory or a model path; empty: the teacher) on ``task``."""

    name: str = "evaluate"
    model: str = ""
    batch_size: int = ranged("an integer ≥ 1", 64)
    max_length: Optional[int] = ranged("an integer ≥ 3", None)
    limit_eval: Optional[int] = ranged("an integer ≥ 1", None)
    num_workers: int = ranged("an integer ≥ 0", 0)
    # the precision the model ships at: other than fp32, the model is stored at it in the run's model/
    # and scored as loaded back from there, with the fp32 score beside it
    precision: Precision = Precision.fp32


@dataclass
class PipelineStage:
    """finetune -> decompose -> pretrain -> distill -> evaluate in one command.

    ``steps`` picks which run (finetune and distill are required, and exactly one of decompose and
    cut — the compressed student, or the teacher cut to its size; pretrain and evaluate optional). Each step's settings are its stage's defaults with the overrides
    under ``<step>`` here (e.g. ``stage.pretrain.max_steps=200``); ``compression.*``,
    ``task``, ``teacher.*`` and ``trainer.*`` come from the top-level config. Every step
    runs in ``outputs/<step>/<hash of its inputs>``: a step whose inputs are unchanged
    reuses that finished run instead of recomputing it, and an unfinished one resumes.
    """

    name: str = "pipeline"
    # without finetune: the teacher fine-tuned before, named by teacher.run_dir (tdlight.stages.pipeline.given_teacher)
    steps: list = field(default_factory=lambda: ["finetune", "decompose", "pretrain", "distill", "evaluate"])
    finetune: FinetuneStage = field(default_factory=FinetuneStage)
    decompose: DecomposeStage = field(default_factory=DecomposeStage)
    cut: CutStage = field(default_factory=CutStage)
    pretrain: PretrainStage = field(default_factory=PretrainStage)
    distill: DistillStage = field(default_factory=DistillStage)
    evaluate: EvaluateStage = field(default_factory=EvaluateStage)
    # every step that reads the task (finetune, distill, evaluate): its first N training / dev examples,
    # unless the step sets its own (stage.finetune.limit_train=...); null: all of them
    limit_train: Optional[int] = ranged("an integer ≥ 1", None)
    limit_eval: Optional[int] = ranged("an integer ≥ 1", None)
    speed_batch_size: int = ranged("an integer ≥ 1", 32)  # the measured speed-up: teacher vs student forward on dev batches of this size
    speed_reps: int = ranged("an integer ≥ 1", 10)  # paired repetitions (median)
    execution: Execution = Execution.timed  # the student's execution plan for the measured speed-up
