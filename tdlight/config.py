"""Structured config schema, registered in Hydra's ConfigStore.

``conf/config.yaml`` puts ``tdlight_schema`` first in its defaults list, so every group
file and every command-line override is validated against these dataclasses: a
misspelled key or a wrong type is rejected before any work starts.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field, fields, is_dataclass, make_dataclass
from enum import Enum
from pathlib import Path
from typing import Any, Optional

from omegaconf import MISSING, DictConfig, OmegaConf, open_dict

from tdlight.errors import TdlightError
from tdlight.model.execution import EXECUTIONS
from tdlight.model.pairs import PAIR_ENCODINGS
from tdlight.tensor.precision import PRECISIONS
from tdlight.tensor.spec import CompressionSpec



def task_options() -> list[str]:
    """The values ``task=<name>`` accepts: the task configs in ``conf/task/`` (the GLUE registry also
    knows AX, a test-only diagnostic set with no config)."""
    return sorted(p.stem for p in (ROOT / "conf" / "task").glob("*.yaml"))
ROOT = Path(__file__).resolve().parents[1]


def ranged(rule: str, default: Any) -> Any:
    """A schema field whose value must satisfy ``rule`` (a key of :data:`_RULES`): its range lives
    with its declaration, and :func:`check_ranges` reads it from there."""
    return field(default=default, metadata={"range": rule})


class Pooling(str, Enum):
    auto = "auto"  # the pooling saved with the model, else the checkpoint's own (mean for sentence-transformers)
    cls = "cls"  # [CLS] + pooler (BERT)
    mean = "mean"  # masked mean of the last hidden states (sentence encoders such as all-MiniLM-L6-v2)


# one vocabulary per choice, defined where it is implemented: the config's enums are built from it
Precision = Enum("Precision", {p: p for p in PRECISIONS}, type=str, module=__name__)  # how a shipped model's weights are stored
Execution = Enum("Execution", {e: e for e in EXECUTIONS}, type=str, module=__name__)  # how the student's units run


@dataclass
class TeacherConfig:
    name: str = "minilm"
    path: str = "minilm"  # an embedded name, an HF model directory, or a hub name
    run_dir: Optional[str] = None  # a finetune run directory: use its fine-tuned teacher instead of path
    pooling: Pooling = Pooling.auto  # what the task head reads (teacher, student and evaluation alike)


def _schema_of(spec: type, schema_name: str, ranges: dict[str, str] | None = None, **first) -> type:
    """A config schema with the fields (names, types, defaults) of the dataclass ``spec`` after
    ``first``: the spec stays the one place its keys are written. OmegaConf 2.3 reads ``Optional[X]``
    but not ``X | None``, so the hints are rewritten (an optional mapping: ``Any``)."""
    import types
    import typing

    def hint(t):
        if isinstance(t, types.UnionType) and type(None) in t.__args__:
            (inner,) = [a for a in t.__args__ if a is not type(None)]
            # A mapping defaulting to None is Any here: OmegaConf 2.3 cannot merge a command-line
            # {attention: 24} into a None Dict node, nor add keys to an empty one under Hydra's struct
            # flag. Its values are checked where the spec is resolved (tdlight.tensor.spec).
            return Any if typing.get_origin(inner) is dict else Optional[inner]
        return t

    hints = typing.get_type_hints(spec)
    own = [(k, type(v), field(default=v)) for k, v in first.items()]
    ranges = ranges or {}
    return make_dataclass(schema_name, own + [(f.name, hint(hints[f.name]),
                                               ranged(ranges[f.name], f.default) if f.name in ranges
                                               else field(default=f.default)) for f in fields(spec)])


# compression.*: the keys of tdlight.tensor.spec.CompressionSpec (documented there), plus the preset's name
CompressionConfig = _schema_of(CompressionSpec, "CompressionConfig", name="tucker",
                               ranges={"tol": "> 0", "max_iter": "an integer ≥ 1", "embedding_rank": "an integer ≥ 1"})


class DataSource(str, Enum):
    auto = "auto"  # the local GLUE directory when the file is there, else the hub
    local = "local"
    hub = "hub"


# task.pair_encoding: how a sentence-pair model reads its pair (tdlight.model.pairs): cross, one sequence with
# both sentences (GLUE's way); bi, each sentence apart, the prediction from their embeddings' cosine (stsb)
PairEncoding = Enum("PairEncoding", {e: e for e in PAIR_ENCODINGS}, type=str, module=__name__)


class WandbMode(str, Enum):
    auto = "auto"  # online only when W&B credentials are configured
    offline = "offline"
    online = "online"


@dataclass
class TaskConfig:
    """A GLUE task and its fine-tuning defaults (``conf/task/*.yaml``)."""

    name: str = "cola"
    epochs: int = ranged("an integer ≥ 1", 3)
    lr: float = ranged("> 0", 5e-5)
    batch_size: int = ranged("an integer ≥ 1", 32)
    max_length: int = ranged("an integer ≥ 3", 128)
    warmup_ratio: float = ranged("in [0, 1)", 0.1)
    patience: Optional[int] = ranged("an integer ≥ 1", None)  # early stopping: epochs without a better dev score
    source: DataSource = DataSource.auto  # auto: ${paths.data_dir}/glue when the file is there, else the hub nyu-mll/glue
    # cross: the pair as one sequence; bi: each sentence encoded apart, the prediction scale × cosine of their
    # embeddings (a bi-encoder; a similarity task only: stsb). Every stage of a run reads its pairs so.
    pair_encoding: PairEncoding = PairEncoding("cross")


@dataclass
class TrainerConfig:
    """The subset of ``lightning.Trainer`` arguments tdlight exposes (``conf/trainer/*.yaml``)."""

    name: str = "default"
    accelerator: str = "auto"
    devices: Any = 1
    strategy: str = "auto"
    num_nodes: int = ranged("an integer ≥ 1", 1)
    precision: str = "32-true"
    max_steps: int = -1  # a cap on optimizer steps (smoke runs); the stage's own settings say how long it trains
    gradient_clip_val: Optional[float] = ranged("≥ 0", 1.0)
    accumulate_grad_batches: int = ranged("an integer ≥ 1", 1)
    val_check_interval: Any = None  # a fraction of an epoch (float) or a number of steps (int)
    check_val_every_n_epoch: Optional[int] = ranged("an integer ≥ 1", 1)  # None: validate by val_check_interval steps across epochs
    limit_train_batches: Optional[float] = None
    limit_val_batches: Optional[float] = None
    log_every_n_steps: int = ranged("an integer ≥ 1", 10)
    num_sanity_val_steps: int = 0
    checkpoint_every_n_steps: Optional[int] = ranged("an integer ≥ 1", None)  # also save last.ckpt every N steps (mid-epoch resume)
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
    # (set by `tdlight sweep`) the trial's own tags (trial-N, ratio, ranks): a pipeline gives them to the
    # steps that are the trial's (the student's and after) and tags a step the trials share `shared`
    trial_tags: list = field(default_factory=list)
    # every step's saved model (its run directory's model/) as a W&B artifact of type "model" (opt-in: bytes)
    log_model: bool = False
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
    stage: Any = MISSING  # a stage's schema (tdlight.stages.schemas), chosen by the stage/ group
    task: Optional[TaskConfig] = None
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    paths: PathsConfig = field(default_factory=PathsConfig)
    experiment: Optional[Any] = None
    resume: Optional[str] = None  # a run directory: reload its config and continue from its last checkpoint
    seed: int = 0
    dry_run: bool = False  # run every check that comes before work, print the resolved settings, run nothing
    print_config: bool = False  # print the resolved settings before the run (they are always in <run>/.hydra/config.yaml)


# Range of a numeric hyperparameter: the rule's text (what the error says is valid) -> its test. The
# schema checks types; its ranged() fields say which values a run can use, and check_ranges reads
# them. A negative learning rate, for one, trains "fine" (the loss explodes) and would otherwise
# give a finite, ranked score.
_RULES = {
    "> 0": lambda v: v > 0,
    "≥ 0": lambda v: v >= 0,
    "in [0, 1)": lambda v: 0 <= v < 1,
    "in [0, 1]": lambda v: 0 <= v <= 1,
    "in (0, 1]": lambda v: 0 < v <= 1,
    "in [0, 1e6)": lambda v: 0 <= v < 1e6,
    "an integer ≥ 1": lambda v: isinstance(v, int) and v >= 1,
    "an integer ≥ 3": lambda v: isinstance(v, int) and v >= 3,
    "an integer ≥ 0": lambda v: isinstance(v, int) and v >= 0,
}


def check_ranges(cfg, path: str = "") -> None:
    """Raise :class:`~tdlight.errors.TdlightError` naming the first numeric hyperparameter outside
    its range anywhere in ``cfg`` (the stage, the pipeline's per-step stages, the task, the trainer,
    the compression): the range of a key is its schema field's (:func:`ranged`); ``None`` (a default
    to be filled in) is always valid."""
    rules = ranges_of(OmegaConf.get_type(cfg)) if OmegaConf.is_dict(cfg) else {}
    for key in cfg:
        try:
            v = cfg[key]
        except Exception:  # an unresolvable interpolation is reported by whoever reads it
            continue
        where = f"{path}.{key}" if path else str(key)
        if OmegaConf.is_dict(v):
            check_ranges(v, where)
            continue
        rule = rules.get(str(key))
        if rule is None or v is None or isinstance(v, bool) or not isinstance(v, (int, float)):
            continue
        if (isinstance(v, float) and not math.isfinite(v)) or not _RULES[rule](v):
            raise TdlightError(f"{where}={v!r}; valid: {rule}")


def ranges_of(schema) -> dict[str, str]:
    """``{field: rule}`` of a schema's :func:`ranged` fields (empty for anything else)."""
    if not (isinstance(schema, type) and is_dataclass(schema)):
        return {}
    return {f.name: f.metadata["range"] for f in fields(schema) if "range" in f.metadata}


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
    # decompose's held-out text and batch serve the output fit as much as the refinement (2026-12-05)
    *(r for old, new in (("refine_heldout_files", "heldout_files"), ("refine_heldout_batches", "heldout_batches"),
                         ("refine_batch_size", "batch_size"))
      for r in (Renamed(f"stage.{old}", f"stage.{new}", stage="decompose", moves_to=f"stage.{new}"),
                Renamed(f"stage.decompose.{old}", f"stage.decompose.{new}", moves_to=f"stage.decompose.{new}"))),
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


def _field_type(schema: type, name: str):
    """The declared type of ``schema``'s field ``name`` (``Optional[X]`` read as ``X``), or None."""
    import typing

    if not (isinstance(schema, type) and is_dataclass(schema)):
        return None
    t = typing.get_type_hints(schema).get(name)
    if typing.get_origin(t) is typing.Union:
        inner = [a for a in typing.get_args(t) if a is not type(None)]
        t = inner[0] if len(inner) == 1 else None
    return t


def check_overrides(overrides: list[str], stage: Optional[str], stage_schemas: dict[str, type]) -> None:
    """Raise :class:`~tdlight.errors.TdlightError` for the first ``key=value`` override that names no key
    of the schemas, or gives a choice key (an enum field: ``stage.fit``, ``teacher.pooling``,
    ``stage.decompose.fit`` in a pipeline) a value it does not have — before Hydra, whose messages say
    the same in five lines of OmegaConf internals and suggest ``+key=value``, which tdlight refuses.
    An unknown key gets the close spellings and, in a pipeline, the steps that have it
    (``stage.limit_train`` -> ``stage.finetune.limit_train``). ``stage``: the ``stage=`` being run (None:
    not known before composition, e.g. set by an ``experiment=`` preset: ``stage.*`` keys are left to
    Hydra); ``stage_schemas``: every stage's schema by name. ``+``/``~`` overrides are checked elsewhere
    (:func:`tdlight.cli.refuse_unknown_added_keys`)."""
    import difflib

    for o in overrides:
        key, sep, value = o.partition("=")
        value = value.strip().strip("'\"")
        if not sep or o.startswith(("+", "~")) or key.startswith("hydra."):
            continue
        if key == "experiment_task":  # a group chosen by the other two (conf/config.yaml), not by hand
            raise TdlightError(f"override {o!r}: experiment_task follows experiment= and task= (the file "
                               "conf/experiment_task/<experiment>_<task>.yaml, where there is one); valid: "
                               "'~experiment_task' to run the preset without it, or override its keys "
                               "(e.g. stage.distill.augment=false)")
        parts = key.split(".")
        schema: Optional[type] = Config
        for i, part in enumerate(parts):
            if schema is Config and part == "stage" and i < len(parts) - 1:
                schema = stage_schemas.get(stage) if stage else None
                if schema is None:
                    break
                continue
            if not (isinstance(schema, type) and is_dataclass(schema)):
                break  # an untyped node (experiment, a list, a dict): Hydra and the stage check it
            names = [f.name for f in fields(schema)]
            if part not in names:
                where = ".".join(parts[:i]) or "the top level"
                where = f"stage={stage}" if where == "stage" else (f"'{where}'" if i else where)
                hint = difflib.get_close_matches(part, names, n=3)
                # a key one level down (a pipeline step's, given at the pipeline's level): where it is
                hint += [f"{'.'.join(parts[:i])}.{f.name}.{part}".lstrip(".") for f in fields(schema)
                         if is_dataclass(sub := _field_type(schema, f.name))
                         and part in {g.name for g in fields(sub)}]
                raise TdlightError(f"override {o!r}: {where} has no key {part!r}"
                                   + (f"; did you mean {' or '.join(hint)}?" if hint else "")
                                   + f" (valid keys: {', '.join(names)})")
            choice = _field_type(schema, part)
            if i == len(parts) - 1 and isinstance(choice, type) and issubclass(choice, Enum) \
                    and value not in ("null", "") and not value.startswith("${") and value not in choice.__members__ \
                    and not any(c in value for c in ",()[]"):  # (a --multirun sweep: Hydra checks each value)
                raise TdlightError(f"{key}={value!r}; valid: {', '.join(m.value for m in choice)}")
            schema = choice


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


def register_resolvers() -> None:
    """The config's own interpolations, ``${tdlight_root:}`` and ``${tdlight_run_id:}``. (The schemas
    go into Hydra's ConfigStore in :func:`tdlight.stages.registry.register`: the registry owns the
    stages' schemas, and this module imports nothing of the stages.)"""
    if not OmegaConf.has_resolver("tdlight_root"):
        OmegaConf.register_new_resolver("tdlight_root", lambda: str(ROOT))
    if not OmegaConf.has_resolver("tdlight_run_id"):
        OmegaConf.register_new_resolver("tdlight_run_id", lambda: RUN_ID)
