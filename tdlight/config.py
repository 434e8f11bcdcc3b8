"""Structured config schema, registered in Hydra's ConfigStore.

``conf/config.yaml`` puts ``tdlight_schema`` first in its defaults list, so every group
file and every command-line override is validated against these dataclasses: a
misspelled key or a wrong type is rejected before any work starts.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field, fields, make_dataclass
from enum import Enum
from pathlib import Path
from typing import Any, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf, open_dict

from tdlight.errors import TdlightError
from tdlight.tensor.spec import CompressionSpec



def task_options() -> list[str]:
    """The values ``task=<name>`` accepts: the task configs in ``conf/task/`` (the GLUE registry also
    knows AX, a test-only diagnostic set with no config)."""
    return sorted(p.stem for p in (ROOT / "conf" / "task").glob("*.yaml"))
ROOT = Path(__file__).resolve().parents[1]


class Pooling(str, Enum):
    auto = "auto"  # the pooling saved with the model, else the checkpoint's own (mean for sentence-transformers)
    cls = "cls"  # [CLS] + pooler (BERT)
    mean = "mean"  # masked mean of the last hidden states (sentence encoders such as all-MiniLM-L6-v2)


class Precision(str, Enum):  # tdlight.tensor.precision.PRECISIONS: how a shipped model's weights are stored
    fp32 = "fp32"
    fp16 = "fp16"
    bf16 = "bf16"
    int8 = "int8"  # weight-only, one scale per row of every matrix; computed in fp32 after loading


@dataclass
class TeacherConfig:
    name: str = "minilm"
    path: str = "minilm"  # an embedded name, an HF model directory, or a hub name
    run_dir: Optional[str] = None  # a finetune run directory: use its fine-tuned teacher instead of path
    pooling: Pooling = Pooling.auto  # what the task head reads (teacher, student and evaluation alike)


def _schema_of(spec: type, schema_name: str, **first) -> type:
    """A config schema with the fields (names, types, defaults) of the dataclass ``spec`` after
    ``first``: the spec stays the one place its keys are written. OmegaConf 2.3 reads ``Optional[X]``
    but not ``X | None``, so the hints are rewritten."""
    import types
    import typing

    def hint(t):
        if isinstance(t, types.UnionType) and type(None) in t.__args__:
            (inner,) = [a for a in t.__args__ if a is not type(None)]
            return Optional[inner]
        return t

    hints = typing.get_type_hints(spec)
    own = [(k, type(v), field(default=v)) for k, v in first.items()]
    return make_dataclass(schema_name, own + [(f.name, hint(hints[f.name]), field(default=f.default)) for f in fields(spec)])


# compression.*: the keys of tdlight.tensor.spec.CompressionSpec (documented there), plus the preset's name
CompressionConfig = _schema_of(CompressionSpec, "CompressionConfig", name="tucker")


class DataSource(str, Enum):
    auto = "auto"  # the local GLUE directory when the file is there, else the hub
    local = "local"
    hub = "hub"


class StudentHead(str, Enum):
    teacher = "teacher"  # pooler + classifier copied from the fine-tuned teacher
    student = "student"  # the student's own: new (random) when it has none for this task's labels


class AugmentMethod(str, Enum):
    neighbours = "neighbours"  # nearest tokens in the teacher's input-embedding space (any teacher)
    mlm = "mlm"  # a masked LM's in-context predictions (TinyBERT; needs a checkpoint with an MLM head)


class Execution(str, Enum):  # tdlight.model.io.EXECUTIONS: how the student's units run (tdlight.model.execution)
    auto = "auto"  # the plan saved with the model for this device type, else the MAC accounting's
    timed = "timed"  # time every mode of each unit kind on this machine, keep the fastest
    macs = "macs"  # the fewest multiply-adds per unit kind
    size = "size"  # the fewest stored parameters (factorized units share the bank): ONNX export's default
    factorized = "factorized"  # as trained; only the shared factors in memory
    folded = "folded"  # cores multiplied into V (or U) at load time: two GEMMs per unit
    dense = "dense"


class WandbMode(str, Enum):
    auto = "auto"  # online only when W&B credentials are configured
    offline = "offline"
    online = "online"


@dataclass
class DecomposeStage:
    name: str = "decompose"
    # which teacher's weights the pipeline decomposes: pretrained (teacher.path, as in the paper) or
    # finetuned (the pipeline's finetune step). Alone, stage=decompose decomposes the teacher it is given
    # (teacher.run_dir, else teacher.path); finetuned there needs teacher.run_dir.
    teacher_weights: str = "pretrained"
    save_model: bool = True
    cache: bool = True  # reuse ${paths.cache_dir}/decompose/<hash of teacher weights + resolved spec>
    # activation-aware refinement (beyond the paper): train the factors on calibration text so that
    # each compressed layer's outputs match the teacher's (layer by layer, teacher inputs), and report
    # the layer-output error before and after; 0 steps = off
    refine_steps: int = 0
    refine_lr: float = 1e-3
    refine_batch_size: int = 16
    refine_max_length: int = 128
    refine_files: Any = "${paths.data_dir}/pretrain_corpus/enwiki_2015_wikiextractor_AA.txt.gz"
    refine_heldout_files: Any = "${paths.data_dir}/pretrain_corpus/wikitext103_heldout/wiki.valid.tokens.gz"
    refine_heldout_batches: int = 4
    # how the factors are fitted: weights (HOOI on the weights, the paper) or outputs (function-
    # preserving, DESIGN §6: start from HOOI and refit the factors so that every block's outputs on
    # calibration text match the teacher's, whitened by each block's input Gram, every block weighted
    # by its relative error; reports the held-out output error per layer and of the last hidden state,
    # on refine_heldout_files, refine_batch_size x refine_heldout_batches sequences, for HOOI and the fit)
    fit: str = "weights"
    # calibration text: corpus files, or `task`: the task's own training text (task=<name>; one line per
    # example, a pair's two sentences on one line) — STS-B's student keeps 2.6x more of its teacher (RESULTS §7c)
    calibration_files: Any = "${paths.data_dir}/pretrain_corpus/enwiki_2015_wikiextractor_AA.txt.gz"
    calibration_sequences: int = 256
    calibration_max_length: int = 128
    calibration_damp: float = 1e-2  # Gram damping, a fraction of its mean diagonal
    fit_iters: int = 10  # sweeps of the alternation after the closed-form start
    # fit=outputs, then refit on the compressed model's own inputs (errors do not compound):
    # passes (0 = off; a pass is kept only if the held-out last-hidden-state error improves),
    # how (layerwise: every linear in forward order, shared factors fixed | global: every
    # factor at once | both), and whether the biases are refit in closed form
    fit_passes: int = 1
    fit_refit: str = "layerwise"
    fit_bias: bool = True


@dataclass
class FinetuneStage:
    """Fine-tune the teacher on ``task``; unset values come from the task's defaults."""

    name: str = "finetune"
    lr: Optional[float] = None
    epochs: Optional[int] = None
    batch_size: Optional[int] = None
    max_length: Optional[int] = None
    weight_decay: float = 0.01
    warmup_ratio: float = 0.1
    eval_batch_size: int = 64
    limit_train: Optional[int] = None  # first N training examples (smoke runs, tests)
    limit_eval: Optional[int] = None
    num_workers: int = 0


@dataclass
class PretrainStage:
    """Reconstruction pretraining: the compressed ``student`` mimics the uncompressed teacher on text.

    Hidden-state and attention-score MSE (+ embedding-output MSE if weighted) on the mapped
    layers over packed corpus sequences; ``max_steps`` optimizer steps; held-out loss every
    ``val_every_n_steps``.
    """

    name: str = "pretrain"
    student: str = ""  # a decompose run directory or a compressed model directory
    train_files: Any = "${paths.data_dir}/pretrain_corpus/enwiki_2015_wikiextractor_AA.txt.gz"
    heldout_files: Any = "${paths.data_dir}/pretrain_corpus/wikitext103_heldout/wiki.valid.tokens.gz"
    max_length: int = 128
    batch_size: int = 32
    max_steps: int = 1000  # optimizer steps (tokens seen = max_steps x batch_size x max_length)
    lr: float = 1e-4
    weight_decay: float = 0.01
    warmup_ratio: float = 0.05
    layer_map: Any = "all"
    hidden_weight: float = 1.0
    attention_weight: float = 1.0
    embedding_weight: float = 0.0
    train_embeddings: bool = False
    dropout: Optional[float] = 0.0  # the student's dropout while pretraining; None keeps the model's; 0 matches the
    #                                 teacher's eval-mode target exactly
    val_every_n_steps: int = 200
    max_heldout_sequences: Optional[int] = 256
    shuffle_buffer: int = 10000
    num_workers: int = 0


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
    intermediate_epochs: int = 1
    prediction_epochs: int = 3
    lr: Optional[float] = None  # None: the task's lr
    intermediate_lr: Optional[float] = None  # None: lr
    batch_size: Optional[int] = None
    max_length: Optional[int] = None
    weight_decay: float = 0.01
    warmup_ratio: float = 0.1
    layer_map: Any = "all"  # last | all | uniform | [[student, teacher], ...]
    hidden_weight: float = 1.0
    attention_weight: float = 1.0
    embedding_weight: float = 0.0
    relative_losses: bool = False  # phase 1: each term is ‖student − teacher‖² / ‖teacher‖² (scale-free)
    temperature: float = 1.0
    gold_weight: float = 0.0  # 0: soft targets only; 1: plain gold-label fine-tuning
    head: StudentHead = StudentHead.student  # where the student's task head starts (docs/RESULTS.md §7: teacher fails lossy students)
    train_embeddings: bool = False  # the embedding matrices stay frozen by default
    augment: bool = False  # TinyBERT-style word replacement: augment_copies copies of each train example, cached to disk
    augment_method: AugmentMethod = AugmentMethod.neighbours
    augment_mlm: str = ""  # the masked LM for augment_method=mlm; empty: the fine-tuned teacher's base model
    augment_copies: int = 4  # augmented copies per training example
    augment_prob: float = 0.4  # probability of replacing each replaceable word
    augment_neighbours: int = 10  # candidates per word (nearest embeddings, or the masked LM's top predictions)
    eval_batch_size: int = 64
    limit_train: Optional[int] = None
    limit_eval: Optional[int] = None
    num_workers: int = 0


@dataclass
class EvaluateStage:
    """Evaluate ``model`` (a run directory or a model path; empty: the teacher) on ``task``."""

    name: str = "evaluate"
    model: str = ""
    batch_size: int = 64
    max_length: Optional[int] = None
    limit_eval: Optional[int] = None
    num_workers: int = 0
    # the precision the model ships at: other than fp32, the model is stored at it in the run's model/
    # and scored as loaded back from there, with the fp32 score beside it
    precision: Precision = Precision.fp32


@dataclass
class PipelineStage:
    """finetune -> decompose -> pretrain -> distill -> evaluate in one command.

    ``steps`` picks which run (finetune, decompose and distill are required; pretrain and
    evaluate optional). Each step's settings are its stage's defaults with the overrides
    under ``<step>`` here (e.g. ``stage.pretrain.max_steps=200``); ``compression.*``,
    ``task``, ``teacher.*`` and ``trainer.*`` come from the top-level config. Every step
    runs in ``outputs/<step>/<hash of its inputs>``: a step whose inputs are unchanged
    reuses that finished run instead of recomputing it, and an unfinished one resumes.
    """

    name: str = "pipeline"
    steps: list = field(default_factory=lambda: ["finetune", "decompose", "pretrain", "distill", "evaluate"])
    finetune: FinetuneStage = field(default_factory=FinetuneStage)
    decompose: DecomposeStage = field(default_factory=DecomposeStage)
    pretrain: PretrainStage = field(default_factory=PretrainStage)
    distill: DistillStage = field(default_factory=DistillStage)
    evaluate: EvaluateStage = field(default_factory=EvaluateStage)
    speed_batch_size: int = 32  # the measured speed-up: teacher vs student forward on dev batches of this size
    speed_reps: int = 10  # paired repetitions (median)
    execution: Execution = Execution.timed  # the student's execution plan for the measured speed-up


@dataclass
class TaskConfig:
    """A GLUE task and its fine-tuning defaults (``conf/task/*.yaml``)."""

    name: str = "cola"
    epochs: int = 3
    lr: float = 5e-5
    batch_size: int = 32
    max_length: int = 128
    source: DataSource = DataSource.auto  # auto: ${paths.data_dir}/glue when the file is there, else the hub nyu-mll/glue


@dataclass
class TrainerConfig:
    """The subset of ``lightning.Trainer`` arguments tdlight exposes (``conf/trainer/*.yaml``)."""

    name: str = "default"
    accelerator: str = "auto"
    devices: Any = 1
    strategy: str = "auto"
    num_nodes: int = 1
    precision: str = "32-true"
    max_steps: int = -1  # a cap on optimizer steps (smoke runs); the stage's own settings say how long it trains
    gradient_clip_val: Optional[float] = 1.0
    accumulate_grad_batches: int = 1
    val_check_interval: Any = None  # a fraction of an epoch (float) or a number of steps (int)
    check_val_every_n_epoch: Optional[int] = 1  # None: validate by val_check_interval steps across epochs
    limit_train_batches: Optional[float] = None
    limit_val_batches: Optional[float] = None
    log_every_n_steps: int = 10
    num_sanity_val_steps: int = 0
    checkpoint_every_n_steps: Optional[int] = None  # also save last.ckpt every N steps (mid-epoch resume)
    deterministic: bool = False
    enable_progress_bar: bool = True


@dataclass
class LoggerConfig:
    """Experiment loggers (``conf/logger/*.yaml``): a CSV logger unless ``none``, W&B if ``wandb``."""

    name: str = "wandb"
    wandb: bool = True
    csv: bool = True
    project: str = "tdlight"
    entity: Optional[str] = None
    group: Optional[str] = None
    tags: list = field(default_factory=list)
    mode: WandbMode = WandbMode.auto


@dataclass
class PathsConfig:
    output_dir: str = "outputs"  # run directories, relative to where tdlight is launched
    # GLUE and the pretraining corpus: the project's ../shared/data unless TDLIGHT_DATA_DIR is set
    data_dir: str = "${oc.env:TDLIGHT_DATA_DIR,${tdlight_root:}/../shared/data}"
    cache_dir: str = "${paths.output_dir}/cache"  # tokenized datasets, by task, split, tokenizer and max length


@dataclass
class Config:
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    compression: CompressionConfig = field(default_factory=CompressionConfig)
    stage: Any = MISSING  # one of the stage schemas above, chosen by the stage/ group
    task: Optional[TaskConfig] = None
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    paths: PathsConfig = field(default_factory=PathsConfig)
    experiment: Optional[Any] = None
    resume: Optional[str] = None  # a run directory: reload its config and continue from its last checkpoint
    seed: int = 0
    dry_run: bool = False  # run every check that comes before work, print the resolved settings, run nothing


# Range of every numeric hyperparameter, by field name (a name means the same in every schema):
# the rule's text (what the error says is valid) -> its test. The schema checks types; these are
# the values a run can use. A negative learning rate, for one, trains "fine" (the loss explodes)
# and would otherwise give a finite, ranked score.
_RULES = {
    "> 0": lambda v: v > 0,
    "≥ 0": lambda v: v >= 0,
    "in [0, 1)": lambda v: 0 <= v < 1,
    "in [0, 1]": lambda v: 0 <= v <= 1,
    "an integer ≥ 1": lambda v: isinstance(v, int) and v >= 1,
    "an integer ≥ 3": lambda v: isinstance(v, int) and v >= 3,
    "an integer ≥ 0": lambda v: isinstance(v, int) and v >= 0,
}
RANGES: dict[str, str] = {
    **dict.fromkeys(("lr", "refine_lr", "intermediate_lr", "temperature", "tol"), "> 0"),
    **dict.fromkeys(("weight_decay", "hidden_weight", "attention_weight", "embedding_weight", "calibration_damp",
                     "gradient_clip_val"), "≥ 0"),
    **dict.fromkeys(("warmup_ratio", "dropout"), "in [0, 1)"),
    "gold_weight": "in [0, 1]",
    **dict.fromkeys(("batch_size", "eval_batch_size", "refine_batch_size", "speed_batch_size", "speed_reps",
                     "accumulate_grad_batches", "log_every_n_steps", "val_every_n_steps", "max_iter", "num_nodes",
                     "limit_train", "limit_eval", "max_heldout_sequences", "refine_heldout_batches",
                     "check_val_every_n_epoch", "checkpoint_every_n_steps", "epochs", "embedding_rank"),
                    "an integer ≥ 1"),
    **dict.fromkeys(("max_length", "refine_max_length"), "an integer ≥ 3"),
    **dict.fromkeys(("intermediate_epochs", "prediction_epochs", "refine_steps", "fit_iters", "fit_passes",
                     "num_workers", "shuffle_buffer"), "an integer ≥ 0"),
}


def check_ranges(cfg, path: str = "") -> None:
    """Raise :class:`~tdlight.errors.TdlightError` naming the first numeric hyperparameter outside
    its range (:data:`RANGES`) anywhere in ``cfg`` (the stage, the pipeline's per-step stages, the
    task, the trainer); ``None`` (a default to be filled in) is always valid."""
    for key in cfg:
        try:
            v = cfg[key]
        except Exception:  # an unresolvable interpolation is reported by whoever reads it
            continue
        where = f"{path}.{key}" if path else str(key)
        if OmegaConf.is_dict(v):
            check_ranges(v, where)
            continue
        rule = RANGES.get(str(key))
        if rule is None or v is None or isinstance(v, bool) or not isinstance(v, (int, float)):
            continue
        if (isinstance(v, float) and not math.isfinite(v)) or not _RULES[rule](v):
            raise TdlightError(f"{where}={v!r}; valid: {rule}")


@dataclass(frozen=True)
class Renamed:
    """A key that was renamed: the old spelling is refused by a message that names the new one (a
    command line, a sweep file), and a saved config of an older run is read with the new names
    (resume)."""

    old: str
    valid: str  # what the refusal names instead
    stage: Optional[str] = None  # the stage it applies to (None: any)
    moves_to: Optional[str] = None  # where a saved value goes (None: dropped, the new default applies)


RENAMED: tuple[Renamed, ...] = (
    Renamed("device", "trainer.accelerator (auto | cpu | gpu; trainer.devices=[N] picks GPU N)"),
    Renamed("trainer.max_epochs", "the stage's epochs: stage.epochs (finetune), stage.intermediate_epochs / "
            "stage.prediction_epochs (distill), stage.<step>.… in the pipeline"),
    # (the pipeline's stage.steps is its list of steps)
    Renamed("stage.steps", "stage.max_steps", stage="pretrain", moves_to="stage.max_steps"),
    Renamed("stage.pretrain.steps", "stage.pretrain.max_steps", moves_to="stage.pretrain.max_steps"),  # the pipeline's
)


def _renamed(key: str, stage: Optional[str]) -> Optional[Renamed]:
    return next((r for r in RENAMED if r.old == key and r.stage in (None, stage)), None)


def refuse_renamed(overrides: list[str], stage: Optional[str]) -> None:
    """Raise :class:`~tdlight.errors.TdlightError` for the first override in ``overrides`` that sets a
    renamed key (:data:`RENAMED`) of ``stage`` (the ``stage=`` being run)."""
    for o in overrides:
        key = o.lstrip("+~").split("=", 1)[0]
        r = _renamed(key, stage)
        if r:
            raise TdlightError(f"{key!r} was renamed (override {o!r}); valid: {r.valid}")


def migrate_saved(cfg: DictConfig) -> DictConfig:
    """A run's saved config with the keys renamed since it was written moved to their new names
    (:data:`RENAMED`), so that an older run still resumes."""
    cfg = cfg.copy()
    stage = OmegaConf.select(cfg, "stage.name")
    for r in RENAMED:
        parent, _, leaf = r.old.rpartition(".")
        node = OmegaConf.select(cfg, parent) if parent else cfg
        if not OmegaConf.is_dict(node) or leaf not in node or r.stage not in (None, stage):
            continue
        value = node[leaf]
        with open_dict(node):
            del node[leaf]
        if r.moves_to is not None:
            OmegaConf.update(cfg, r.moves_to, value, force_add=True)
    return cfg


def compression_spec(cfg) -> CompressionSpec:
    """The tensor-level spec from the ``compression`` config node (``name`` dropped)."""
    d = OmegaConf.to_container(cfg, resolve=True) if not isinstance(cfg, dict) else dict(cfg)
    keys = {f.name for f in fields(CompressionSpec)}
    return CompressionSpec(**{k: v for k, v in d.items() if k in keys})


# One id per process: default run directories are <time>_<id>, so two runs started in the same
# second (two terminals, two sweep hosts on a shared disk) never share a directory.
RUN_ID = os.urandom(3).hex()


def register() -> None:
    if not OmegaConf.has_resolver("tdlight_root"):
        OmegaConf.register_new_resolver("tdlight_root", lambda: str(ROOT))
    if not OmegaConf.has_resolver("tdlight_run_id"):
        OmegaConf.register_new_resolver("tdlight_run_id", lambda: RUN_ID)
    cs = ConfigStore.instance()
    cs.store(name="tdlight_schema", node=Config)
    from tdlight.stages.registry import STAGES  # the registry reads the schemas above: imported here, not at the top

    for name, record in STAGES.items():  # `stage=<name>`: the stage's schema is the group option itself
        cs.store(group="stage", name=name, node=record.schema)
