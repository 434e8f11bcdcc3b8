"""Every stage of tdlight, one record each: what the CLI dispatches and validates, what the
pipeline chains, reuses and keys, what a finished run leaves behind.

Adding a stage: its module ``tdlight/stages/<name>.py`` with ``check(cfg, where, wired)`` (its settings
checks, before any work) and ``run(cfg, run_dir)`` (which calls ``check`` first; training stages also
take ``extra_callbacks``),
its schema (a dataclass holding every default) in :mod:`tdlight.config`, and one line in :data:`STAGES`
(:func:`tdlight.config.register` stores that schema as the ``stage=<name>`` option: no YAML file).
The stage modules are imported only when a stage runs, so reading the registry stays cheap.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

from tdlight.config import DecomposeStage, DistillStage, EvaluateStage, FinetuneStage, PipelineStage, PretrainStage


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
    # (stage key, top-level node): the node is read only when that stage setting is truthy
    reads_if: tuple[tuple[str, str], ...] = ()
    # a Lightning run whose checkpoints `resume=<run dir>` continues (its run() takes extra_callbacks)
    resumable: bool = True

    def run(self, cfg, run_dir: Path, **kwargs):
        return importlib.import_module(f"tdlight.stages.{self.name}").run(cfg, run_dir, **kwargs)

    def check(self, cfg, where: str = "stage", wired: tuple[str, ...] = ()) -> None:
        """Every check of the stage's settings that loads no model and reads no data beyond a file's
        existence — what ``run`` checks first, what the pipeline checks for every step before the
        first, what ``dry_run=true`` runs. ``where`` spells the stage's keys in messages
        (``stage.decompose`` in a pipeline); ``wired`` lists the keys a pipeline fills from steps that
        have not run yet (their inputs are not checked)."""
        importlib.import_module(f"tdlight.stages.{self.name}").check(cfg, where=where, wired=wired)

    def reads_task(self, stage_cfg) -> bool:
        """Whether a run with these stage settings reads the task's data."""
        return self.reads_task_data or bool(self.reads_task_if and self.reads_task_if(stage_cfg))

    def keyed_nodes(self, stage_cfg) -> tuple[str, ...]:
        nodes = self.reads + tuple(node for key, node in self.reads_if if stage_cfg.get(key))
        return nodes + ("task",) if self.reads_task(stage_cfg) and "task" not in nodes else nodes

    def finished(self, run_dir: Path) -> bool:
        return (run_dir / self.artifact).exists() and (run_dir / self.result).is_file()


def _fits_task_text(stage_cfg) -> bool:
    """A decomposition fitted to the layer outputs on the task's own training text (see
    :func:`tdlight.data.glue.task_text`)."""
    return stage_cfg.get("fit") == "outputs" and stage_cfg.get("calibration_files") == "task"


STAGES: dict[str, StageRecord] = {r.name: r for r in (
    StageRecord("finetune", FinetuneStage, reads=("teacher", "task", "seed", "trainer"), reads_task_data=True),
    # seed: which calibration sequences are read; trainer: only when the decomposition is refined by training
    StageRecord("decompose", DecomposeStage, reads=("compression", "teacher", "seed"),
                reads_if=(("refine_steps", "trainer"),), reads_task_if=_fits_task_text, resumable=False),
    StageRecord("pretrain", PretrainStage, reads=("teacher", "seed", "trainer")),
    StageRecord("distill", DistillStage, reads=("task", "seed", "trainer"), reads_task_data=True),
    StageRecord("evaluate", EvaluateStage, artifact="metrics.json", reads=("task", "trainer"), reads_task_data=True,
                resumable=False),
    StageRecord("pipeline", PipelineStage, artifact="pipeline.json", result="pipeline.json"),
)}

# the stages whose finished run holds a model (a run directory another stage can read a model from)
MODEL_STAGES: tuple[str, ...] = tuple(n for n, r in STAGES.items() if r.artifact == "model")
