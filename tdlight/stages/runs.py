"""Run directories, as the stages read them: a run's saved config, its checkpoint to resume, the
artifact a finished run leaves for the next stage, and the teacher (or student) a stage is given.

A run directory (``outputs/<stage>/<run id>/``) holds ``.hydra/`` (the composed config),
``tdlight.log``, ``checkpoints/`` (``last.ckpt`` to resume, ``best.ckpt``), ``csv/version_N/``
(Lightning's CSV logger; one version per start or resume), ``wandb/`` and ``wandb_id`` (so a resume
continues the same W&B run), and the artifact the next stage reads (``model/``) plus ``metrics.json``.
(Making the directory is the CLI's: :mod:`tdlight.run_dirs`.)
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from tdlight.data.glue import task_text
from tdlight.errors import RunError, TdlightError
from tdlight.files import atomic_write_text
from tdlight.model.families import max_tokens
from tdlight.stages.trainer import CHECKPOINTS, LAST, RunIdentity

log = logging.getLogger("tdlight.runs")

TASK_TEXT = "task"  # decompose's calibration_files=task, pretrain's train_files=task: the task's own training text


def saved_config(run_dir: str | os.PathLike) -> DictConfig:
    """The composed config a run was started with (``.hydra/config.yaml``)."""
    p = Path(run_dir)
    if not p.is_dir():
        raise RunError(f"run directory {str(p)!r} does not exist")
    f = p / ".hydra" / "config.yaml"
    if not f.is_file():
        raise RunError(f"{str(p)!r} is not a tdlight run directory: it has no .hydra/config.yaml")
    return OmegaConf.load(f)


def last_checkpoint(run_dir: str | os.PathLike) -> Path:
    """``checkpoints/last.ckpt`` of a run; an error (never a silent restart) if there is none."""
    ckpt = Path(run_dir) / CHECKPOINTS / LAST
    if not ckpt.is_file():
        raise RunError(
            f"cannot resume {str(run_dir)!r}: it has no checkpoint ({CHECKPOINTS}/{LAST}). A run can be resumed "
            "once it has saved one (at the end of each epoch, or every trainer.checkpoint_every_n_steps); "
            "start a new run instead"
        )
    import zipfile

    try:  # torch checkpoints are zip archives: a truncated or overwritten one fails its CRCs here
        with zipfile.ZipFile(ckpt) as z:
            bad = z.testzip()
    except (zipfile.BadZipFile, OSError) as e:
        bad = f"{type(e).__name__}: {e}"
    restart = ("start a new run instead (the same command without resume=; in a pipeline, delete the step's "
               f"{CHECKPOINTS}/ folder and run the pipeline again)")
    if bad is not None:
        raise RunError(f"cannot resume {str(run_dir)!r}: {CHECKPOINTS}/{LAST} is corrupt ({bad}); valid: the checkpoint "
                       f"as the run wrote it — {restart}")
    try:  # memory-mapped: only what is read below leaves the disk
        state = torch.load(ckpt, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # a zip of something else, or a pickle torch refuses to load
        state, why = None, f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"
    else:
        why = "it holds no Lightning training state (state_dict, loops, callbacks)"
    if not isinstance(state, dict) or not {"state_dict", "loops", "callbacks"} <= state.keys():
        raise RunError(f"cannot resume {str(run_dir)!r}: {CHECKPOINTS}/{LAST} is not a Lightning checkpoint of a "
                       f"tdlight run ({why}); valid: the checkpoint the run wrote — {restart}")
    owner = (state["callbacks"].get(RunIdentity.__name__) or {}).get("run")
    if owner is not None and owner != Path(run_dir).resolve().name:  # (checkpoints before 2026-12-05 carry none)
        raise RunError(f"cannot resume {str(run_dir)!r}: {CHECKPOINTS}/{LAST} was written by another run ({owner!r}); "
                       f"valid: the run's own checkpoint (a run directory renamed after it started: rename it back "
                       f"to {owner!r}) — or {restart}")
    return ckpt


def stage_artifact(run_dir: str | os.PathLike, stages: tuple[str, ...], what: str = "model") -> Path:
    """``<run_dir>/<what>`` of a finished run of one of ``stages``, checked."""
    cfg = saved_config(run_dir)
    stage = cfg.get("stage", {}).get("name")
    if stage not in stages:
        raise RunError(f"run directory {str(run_dir)!r} is a {stage!r} run; expected one of {list(stages)}")
    art = Path(run_dir) / what
    if not art.exists():
        raise RunError(f"run directory {str(run_dir)!r} has no {what}/: the run did not finish; resume it first")
    return art


def check_positions(model, **lengths: int | None) -> None:
    """Each sequence length (``key=value``, ``key`` the setting as the user writes it) fits the model's
    position table; else one error naming the limit (a longer batch would fail deep in the embeddings)."""
    limit = max_tokens(getattr(model, "config", None))
    if not limit:
        return
    for key, value in lengths.items():
        if value is not None and value > limit:
            raise TdlightError(f"{key}={value} is longer than the model's position table; valid: at most {limit} "
                               "tokens")


def teacher_source(cfg: DictConfig) -> str:
    """The teacher to load: the fine-tuned model of ``teacher.run_dir`` if set, else ``teacher.path``."""
    if cfg.teacher.get("run_dir"):
        return str(stage_artifact(cfg.teacher.run_dir, ("finetune",)))
    return cfg.teacher.path


def check_teacher_task(cfg: DictConfig, what: str = "this run distills") -> Path:
    """``teacher.run_dir`` is a finished fine-tune of the run's own task: its head is the task's teacher, and
    a teacher fine-tuned on another task with as many labels would otherwise be read as this task's (an MRPC
    head scoring RTE's pairs), silently. Returns its model directory."""
    run_dir = cfg.teacher.run_dir
    model = stage_artifact(run_dir, ("finetune",))
    saved = saved_config(run_dir).get("task") or {}
    if cfg.get("task") is not None and saved.get("name") != cfg.task.name:
        raise TdlightError(f"teacher.run_dir={str(run_dir)!r} is a teacher fine-tuned on task={saved.get('name')}; "
                           f"{what} task={cfg.task.name}; valid: a finetune run of {cfg.task.name} "
                           f"(tdlight stage=finetune task={cfg.task.name})")
    return model


def check_teacher_weights(cfg: DictConfig, weights, where: str = "stage") -> None:
    """``<where>.teacher_weights`` (which teacher a stage makes its student from: ``pretrained`` or
    ``finetuned``, a :class:`~tdlight.stages.schemas.TeacherWeights`) against the teacher given: the
    fine-tuned one needs ``teacher.run_dir`` (a pipeline wires it from its finetune step)."""
    if weights == "finetuned" and not cfg.teacher.get("run_dir"):
        raise TdlightError(f"{where}.teacher_weights=finetuned needs the fine-tuned teacher: "
                           "teacher.run_dir=<finetune run>")


def write_json(path: Path, data: dict) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, default=float))


STUDENT_STAGES = ("decompose", "cut", "pretrain", "distill")  # the runs whose model/ is a student


def student_source(cfg: DictConfig) -> str:
    """The student a stage trains: the model of a decompose, cut, pretrain or distill run, or a model
    directory tdlight wrote — compressed (``tdlight.json``) or dense (a teacher cut to fewer layers)."""
    src = cfg.stage.student
    if not src:
        raise TdlightError(f"stage={cfg.stage.name} needs a student: stage.student=<decompose, cut or pretrain run "
                           "directory>")
    p = Path(src)
    if (p / ".hydra" / "config.yaml").is_file():
        return str(stage_artifact(p, STUDENT_STAGES))
    if not ((p / "tdlight.json").is_file() or (p / "config.json").is_file()):
        raise TdlightError(f"stage.student={src!r} is neither a {'/'.join(STUDENT_STAGES)} run directory nor a model "
                           "directory (with tdlight.json, or a dense model's config.json)")
    return src


def task_text_file(cfg: DictConfig) -> Path:
    """The task's training text (one example a line, a pair's sentences joined) as a corpus file,
    ``<cache_dir>/calibration/<task>-<hash of the text>.txt`` — what ``TASK_TEXT`` names in a stage's
    text setting; written once, an existing file of the same text reused."""
    task = cfg.task.name
    lines = task_text(task, "train", data_dir=Path(cfg.paths.data_dir) / "glue", source=cfg.task.source)
    text = "\n".join(lines) + "\n"
    path = Path(cfg.paths.cache_dir) / "calibration" / f"{task}-{hashlib.sha1(text.encode()).hexdigest()[:12]}.txt"
    if not path.is_file():
        atomic_write_text(path, text)
    log.info("the task's text: the %d training examples of %s (%s)", len(lines), task, path)
    return path
