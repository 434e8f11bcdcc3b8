"""Every stage of tdlight, one record each: what the CLI dispatches and validates, what the
pipeline chains, reuses and keys, what a finished run leaves behind.

Adding a stage: its module ``tdlight/stages/<name>.py`` with ``check(cfg, where, wired)`` (its settings
checks, before any work) and ``run(cfg, run_dir)`` (which calls ``check`` first; training stages also
take ``extra_callbacks``),
its schema (a dataclass holding every default and range) in :mod:`tdlight.stages.schemas`, and one line in :data:`STAGES`
(:func:`register` stores that schema as the ``stage=<name>`` option: no YAML file).
The stage modules are imported only when a stage runs, so reading the registry stays cheap.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf

from tdlight.config import Config, check_ranges, register_resolvers
from tdlight.stages.schemas import (
    CutStage, DecomposeStage, DistillStage, EvaluateStage, FinetuneStage, PipelineStage, PretrainStage,
)


@dataclass(frozen=True)
class Input:
    """What a stage reads from an earlier pipeline step: the setting ``key`` is set to the run directory
    of the first of ``stages`` the pipeline ran (``stage.student`` of distill: pretrain, else decompose),
    and that step's key joins this step's cache key under ``name`` (default: the stage's name). ``when``
    (the pipeline's ``stage`` node -> bool) makes the input conditional."""

    key: str
    stages: tuple[str, ...]
    name: Optional[str] = None
    when: Optional[Callable[[object], bool]] = None


def finetuned_teacher(pipeline_stage) -> bool:
    """``stage.decompose.teacher_weights=finetuned`` (or ``stage.cut.teacher_weights`` when the pipeline
    cuts the teacher instead): the student is made from (and pretrained against) the fine-tuned teacher
    instead of the pretrained one. An unset ``stage.cut.teacher_weights`` is decompose's, so that a
    preset with ``cut`` in place of ``decompose`` cuts the teacher its student is decomposed from."""
    weights = pipeline_stage.cut.get("teacher_weights") if "cut" in (pipeline_stage.get("steps") or ()) else None
    return (weights or pipeline_stage.decompose.get("teacher_weights")) == "finetuned"


@dataclass(frozen=True)
class StageRecord:
    name: str
    schema: type  # the structured config of ``stage``, stored as the option ``stage=<name>``
    artifact: str = "model"  # what a finished run leaves for the next stage (a directory or a file)
    result: str = "metrics.json"  # its scores or report (every stage but the pipeline: metrics.json)
    # the top-level config nodes that change what the stage computes: with its own stage settings,
    # its upstream steps and the files it reads, they key a pipeline step for reuse
    reads: tuple[str, ...] = ()
    reads_task_data: bool = False  # reads the task's GLUE files (their stamps join the key)
    # with stage settings for which this is true, the stage also reads the task (its node and its GLUE files)
    reads_task_if: Optional[Callable[[object], bool]] = None
    # (stage key, top-level node): the node is read only when that stage setting is truthy; or
    # (a predicate of the stage settings, top-level node)
    reads_if: tuple[tuple[str | Callable[[object], bool], str], ...] = ()
    # a Lightning run whose checkpoints `resume=<run dir>` continues (its run() takes extra_callbacks)
    resumable: bool = True
    # what it reads from earlier steps when the pipeline runs it (the pipeline wires them, in this order)
    consumes: tuple[Input, ...] = ()
    # the module with its check() and run(); None: tdlight.stages.<name> (a stage may live outside the package)
    module: Optional[str] = None

    def run(self, cfg, run_dir: Path, **kwargs):
        return self._module().run(cfg, run_dir, **kwargs)

    def check(self, cfg, where: str = "stage", wired: tuple[str, ...] = ()) -> None:
        """Every check of the stage's settings that loads no model and reads no data beyond a file's
        existence — what ``run`` checks first, what the pipeline checks for every step before the
        first, what ``dry_run=true`` runs. ``where`` spells the stage's keys in messages
        (``stage.decompose`` in a pipeline); ``wired`` lists the keys a pipeline fills from steps that
        have not run yet (their inputs are not checked)."""
        self._module().check(cfg, where=where, wired=wired)

    def _module(self):
        return importlib.import_module(self.module or f"tdlight.stages.{self.name}")

    def reads_task(self, stage_cfg) -> bool:
        """Whether a run with these stage settings reads the task's data."""
        return self.reads_task_data or bool(self.reads_task_if and self.reads_task_if(stage_cfg))

    def keyed_nodes(self, stage_cfg) -> tuple[str, ...]:
        nodes = self.reads + tuple(node for key, node in self.reads_if
                                   if (key(stage_cfg) if callable(key) else stage_cfg.get(key)))
        return nodes + ("task",) if self.reads_task(stage_cfg) and "task" not in nodes else nodes

    def finished(self, run_dir: Path) -> bool:
        return (run_dir / self.artifact).exists() and (run_dir / self.result).is_file()


def _reads_task_text(stage_cfg) -> bool:
    """Reconstruction pretraining on the task's own training text (``train_files=task``)."""
    return stage_cfg.get("train_files") == "task"


def _fits_task_text(stage_cfg) -> bool:
    """A decomposition fitted to the layer outputs on the task's own training text (see
    :func:`tdlight.data.glue.task_text`)."""
    return stage_cfg.get("fit") == "outputs" and stage_cfg.get("calibration_files") == "task"


def _sized_by_compression(stage_cfg) -> bool:
    """A cut whose depth is the one nearest to the student ``compression`` would give (``layers`` unset)."""
    return stage_cfg.get("layers") is None


STAGES: dict[str, StageRecord] = {r.name: r for r in (
    StageRecord("finetune", FinetuneStage, reads=("teacher", "task", "seed", "trainer"), reads_task_data=True),
    # seed: which calibration sequences are read; trainer: only when the decomposition is refined by training
    StageRecord("decompose", DecomposeStage, reads=("compression", "teacher", "seed"),
                reads_if=(("refine_steps", "trainer"),), reads_task_if=_fits_task_text, resumable=False,
                consumes=(Input("teacher.run_dir", ("finetune",), when=finetuned_teacher),)),
    # the peer at equal size: the teacher cut to fewer layers (compression only sizes it, when layers is unset)
    StageRecord("cut", CutStage, reads=("teacher",), reads_if=((_sized_by_compression, "compression"),),
                resumable=False, consumes=(Input("teacher.run_dir", ("finetune",), when=finetuned_teacher),)),
    # (pretrain reconstructs the teacher it was decomposed, or cut, from)
    StageRecord("pretrain", PretrainStage, reads=("teacher", "seed", "trainer"), reads_task_if=_reads_task_text,
                consumes=(Input("stage.student", ("decompose", "cut")),
                          Input("teacher.run_dir", ("finetune",), when=finetuned_teacher))),
    StageRecord("distill", DistillStage, reads=("task", "seed", "trainer"), reads_task_data=True,
                consumes=(Input("teacher.run_dir", ("finetune",)),
                          Input("stage.student", ("pretrain", "decompose", "cut"), name="student"))),
    StageRecord("evaluate", EvaluateStage, artifact="metrics.json", reads=("task", "trainer"), reads_task_data=True,
                resumable=False, consumes=(Input("stage.model", ("distill",)),)),
    StageRecord("pipeline", PipelineStage, artifact="pipeline.json", result="pipeline.json"),
)}

# the stages whose finished run holds a model (a run directory another stage can read a model from)
MODEL_STAGES: tuple[str, ...] = tuple(n for n, r in STAGES.items() if r.artifact == "model")


def register() -> None:
    """Hydra's ConfigStore: the top-level schema (``tdlight_schema``, the first default of
    ``conf/config.yaml``) and each stage's schema as the option ``stage=<name>`` (no YAML file), plus
    the config's resolvers. Every entry point calls it before composing a config."""
    register_resolvers()
    cs = ConfigStore.instance()
    cs.store(name="tdlight_schema", node=Config)
    for name, record in STAGES.items():
        cs.store(group="stage", name=name, node=record.schema)


def typed(cfg) -> DictConfig:
    """``cfg`` (a saved config, a pipeline step's) under the schemas: the top level's and, for a stage
    of :data:`STAGES`, the stage's own (``Config.stage`` is untyped) — so that its values are checked,
    its ranges known and :func:`settings` gives the stage's object. A value of the wrong type raises
    OmegaConf's ValidationError."""
    out = OmegaConf.merge(OmegaConf.structured(Config), cfg)
    if OmegaConf.select(out, "stage.name") in STAGES:
        out.stage = _typed_stage(out.stage)
    return out


def _typed_stage(node) -> DictConfig:
    """A stage node under its own stage's schema (``Config.stage`` is untyped)."""
    return OmegaConf.merge(OmegaConf.structured(STAGES[node.name].schema), node)


def settings(cfg: DictConfig):
    """The stage's settings as an object of its schema (``OmegaConf.to_object``): choices as their
    enum members, lists as lists, interpolations resolved — what a stage reads, instead of raw
    config. Every entry point types the config (Hydra's composition, :func:`typed`); a stage node
    that is not (a config built by hand) is typed in place first."""
    if OmegaConf.get_type(cfg.stage) is not STAGES[cfg.stage.name].schema:
        cfg.stage = _typed_stage(cfg.stage)
    check_ranges(cfg.stage, "stage")
    return OmegaConf.to_object(cfg.stage)
