"""``stage=pipeline``: finetune -> decompose -> pretrain -> distill -> evaluate in one command.

``cut`` in place of ``decompose`` makes the student the teacher cut to fewer of its own layers, the
peer at equal size of the compressed student (:mod:`tdlight.stages.cut`), trained by the same later
steps; the table then says so. A cut to no layer has nothing to reconstruct: its pretrain step is
skipped (logged, and listed in ``pipeline.json`` under ``skipped``). Without ``finetune`` in
``stage.steps``, ``teacher.run_dir`` names the fine-tuned teacher the later steps read, as it is
(:func:`given_teacher`; a finetune run of the same task, checked before any step runs).

Each step runs as its own stage in ``outputs/<step>/<key>``, where ``key`` hashes the
step's inputs: its stage settings, the top-level settings it reads (teacher, task,
compression, seed, trainer) and the keys of the steps it consumes. A step whose directory
already holds its finished artifact is reused instead of recomputed; one that holds only
a checkpoint resumes. At the end one table compares the fine-tuned teacher and the
distilled student: dev GLUE score, encoder parameters, ratio, and the measured speed-up
of a forward pass on dev batches (paired timing, :mod:`tdlight.model.speed`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from pathlib import Path

from filelock import FileLock
from omegaconf import DictConfig, OmegaConf
from rich.console import Console
from rich.table import Table

from tdlight.data.glue import extra_text_source, get_task, resolve_source
from tdlight.errors import TdlightError
from tdlight.files import file_stamp
from tdlight.files import directory_bytes
from tdlight.model.execution import current as current_plan
from tdlight.model.speed import paired_speedup
from tdlight.model.surgery import encoder_shape
from tdlight.model.teacher import load_classifier, resolve_teacher
from tdlight.stages.classifier import datamodule, is_constant, model_summary, require_task
from tdlight.stages.runs import CHECKPOINTS, LAST, check_teacher_task, saved_config, write_json
from tdlight.stages.loggers import finish_wandb, sync_command
from tdlight.stages.registry import STAGES, finetuned_teacher, settings, typed

log = logging.getLogger("tdlight.pipeline")

ORDER = ("finetune", "decompose", "cut", "pretrain", "distill", "evaluate")
REQUIRED = ("distill",)  # and finetune, unless teacher.run_dir names the fine-tuned teacher (given_teacher)
STUDENT_STEPS = ("decompose", "cut")  # what makes the student: exactly one of them
# A step's cache key: its own stage settings, the keys of the steps it consumes, the top-level
# config nodes its stage record reads (tdlight.stages.registry), and the stamps (path, size,
# SHA-256) of the files it reads (step_inputs).
NEVER_KEYED = ("enable_progress_bar", "log_every_n_steps", "name")
# settings whose value here means "as before the setting existed" (a step's own seed: null is the run's seed,
# keyed on its own; task.pair_encoding: cross; distill's extra_text: none, head_epochs: 0, head_lr: null;
# compression.group_banks: null; finetune's class_weights: null): left out of the key at that value, so steps computed before keep their keys
KEYED_UNLESS = {"seed": None, "pair_encoding": "cross", "extra_text": [], "extra_limit": None,
                "head_epochs": 0, "head_lr": None, "group_banks": None, "class_weights": None}


def _clean(node) -> object:
    """A config node as plain data without settings that cannot change a result."""
    data = OmegaConf.to_container(node, resolve=True) if OmegaConf.is_config(node) else node
    if isinstance(data, dict):
        return {k: _clean(v) for k, v in sorted(data.items())
                if k not in NEVER_KEYED and not (k in KEYED_UNLESS and getattr(v, "value", v) == KEYED_UNLESS[k])}
    return data


def step_inputs(step: str, stage_cfg, cfg: DictConfig) -> list:
    """The files a step reads, each as its :func:`~tdlight.files.file_stamp`: the task's data files
    (finetune, distill, evaluate), and every existing file, directory (its files) or glob named by
    a string in the step's config or under ``teacher`` — so that changing ``paths.data_dir`` or
    editing a corpus never reuses a step computed from other data."""
    import glob as globlib

    stamps: list = []
    if STAGES[step].reads_task(stage_cfg) and cfg.get("task") is not None:
        task = get_task(cfg.task.name)
        sources = [(task, split) for split in task.splits]
        for text in stage_cfg.get("extra_text") or ():  # distill's extra inputs, from other tasks' files too
            try:
                sources.append(extra_text_source(text, task))
            except TdlightError:  # a bad entry: the stage's error to report, not the key's
                continue
        for t, split in sources:
            try:
                kind, path = resolve_source(t, split, Path(cfg.paths.data_dir) / "glue", cfg.task.source)
            except TdlightError:  # a split that is not there: likewise
                continue
            stamps.append(file_stamp(path) if kind == "local" else {"hub": f"{t.name}/{split}"})

    def strings(node):
        data = OmegaConf.to_container(node, resolve=True) if OmegaConf.is_config(node) else node
        if isinstance(data, dict):
            for v in data.values():
                yield from strings(v)
        elif isinstance(data, list):
            for v in data:
                yield from strings(v)
        elif isinstance(data, str) and ("/" in data or "*" in data):
            yield data

    for text in [*strings(stage_cfg), *strings(cfg.get("teacher"))]:
        for name in sorted(globlib.glob(os.path.expanduser(text))):
            stamps.extend(_stamps(Path(name)))
    return stamps


def _stamps(p: Path) -> list[dict]:
    """The :func:`~tdlight.files.file_stamp` of a file, or of each file directly in a directory."""
    files = sorted(f for f in p.iterdir() if f.is_file()) if p.is_dir() else [p]
    return [file_stamp(f) for f in files if f.is_file()]


def _hash(payload) -> str:
    return hashlib.sha1(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:12]


def step_key(step: str, stage_cfg, cfg: DictConfig, upstream: dict[str, str]) -> str:
    payload = {"step": step, "stage": _clean(stage_cfg), "upstream": upstream,
               **{k: _clean(cfg.get(k)) for k in STAGES[step].keyed_nodes(stage_cfg)}, "inputs": step_inputs(step, stage_cfg, cfg)}
    return _hash(payload)


def _step_config(cfg: DictConfig, step: str, stage_cfg, run_dir: Path, wiring: dict,
                 pipeline_id: str = "pipeline") -> DictConfig:
    sub = OmegaConf.to_container(cfg, resolve=False)
    sub["stage"] = OmegaConf.to_container(stage_cfg, resolve=False)
    sub["stage"]["name"] = step
    for dotted, value in wiring.items():
        node = sub
        *parents, leaf = dotted.split(".")
        for p in parents:
            node = node[p]
        node[leaf] = value
    # W&B: the steps of one pipeline are grouped (a sweep's trials are grouped by the sweep, which
    # sets logger.group; the pipeline is then a tag)
    lg = sub.get("logger") or {}
    if lg.get("wandb"):
        if lg.get("group"):
            lg["tags"] = [*(lg.get("tags") or []), pipeline_id]
        else:
            lg["group"] = pipeline_id
    if lg.get("trial_tags") and ORDER.index(step) < min(ORDER.index(s) for s in STUDENT_STEPS):
        # a step before the student is made (the teacher's fine-tune) never reads the compression: the
        # sweep's trials share it, and the trial that happens to run it first must not tag it as its own
        lg["trial_tags"] = []
        lg["tags"] = [*(lg.get("tags") or []), "shared"]
    out = typed(sub)  # the step's stage under its own schema, as `stage=<step>` would compose it
    out.resume = str(run_dir) if (run_dir / CHECKPOINTS / LAST).is_file() else None
    return out


def _plan(cfg: DictConfig) -> list[tuple[str, DictConfig, Path, dict]]:
    """The steps to run, in order: (step, its stage settings, its directory, its wiring — the
    settings it takes from the steps before it). Computed from the config alone, before any step
    runs: a step's directory is named by its key, which hashes its inputs and its upstream keys."""
    st = cfg.stage
    steps = [s for s in ORDER if s in st.steps]
    out_root = Path(cfg.paths.output_dir)
    keys: dict[str, str] = {}
    dirs: dict[str, Path] = {}
    given = given_teacher(cfg)
    if given is not None:  # no finetune step: the later steps read this teacher, keyed by its weights' bytes
        dirs["finetune"] = given
        keys["finetune"] = _hash(_stamps(given / "model"))
    plan = []
    for step in steps:
        if step == "pretrain" and _cut_depth(cfg, plan) == 0:
            log.info("pretrain: skipped — the cut student has no encoder layer to reconstruct (its embeddings are "
                     "the teacher's own)")
            continue
        # as in the paper: the *pretrained* teacher is decomposed (and pretrained against) and the
        # fine-tuned one only teaches the task in distill — unless stage.decompose.teacher_weights=finetuned
        # (each stage's record says what it consumes: tdlight.stages.registry.Input)
        upstream, wiring = {}, {}
        for inp in STAGES[step].consumes:
            if inp.when is not None and not inp.when(st):
                continue
            source = next((s for s in inp.stages if s in dirs), None)
            if source is None:  # (REQUIRED makes this unreachable for the stages the pipeline runs)
                raise TdlightError(f"pipeline step {step} reads {inp.key} from {' or '.join(inp.stages)}, "
                                   f"which stage.steps={list(st.steps)} does not run")
            upstream[inp.name or source] = keys[source]
            wiring[inp.key] = str(dirs[source])
        stage_cfg = _with_pipeline_limits(st, step)
        key = step_key(step, stage_cfg, cfg, upstream)
        keys[step], dirs[step] = key, out_root / step / f"pipeline-{key}"
        plan.append((step, stage_cfg, dirs[step], wiring))
    return plan


def given_teacher(cfg: DictConfig) -> Path | None:
    """The finetune run named by ``teacher.run_dir`` when ``stage.steps`` has no finetune step (a teacher
    fine-tuned before: by ``stage=finetune``, on a GPU, with a longer schedule, or another pipeline's step),
    else None — the pipeline then fine-tunes its own."""
    if "finetune" in cfg.stage.steps or not cfg.teacher.get("run_dir"):
        return None
    return Path(cfg.teacher.run_dir)


def _check_pretrained_teacher(cfg: DictConfig, where: str) -> None:
    """With a given teacher (:func:`given_teacher`) and a student made from the *pretrained* teacher
    (``teacher_weights=pretrained``, ``cpu_48``'s), ``teacher.path`` must be the checkpoint that teacher was
    fine-tuned from: else the student would be another model compressed, taught by this one."""
    if finetuned_teacher(cfg.stage):
        return
    # the key the user sets: cut's own teacher_weights when the pipeline cuts and sets it, else decompose's
    key = "cut" if "cut" in cfg.stage.steps and cfg.stage.cut.get("teacher_weights") else "decompose"
    started = (saved_config(cfg.teacher.run_dir).get("teacher") or {}).get("path")

    def same(a, b) -> bool:
        try:
            return os.path.realpath(resolve_teacher(a)) == os.path.realpath(resolve_teacher(b))
        except TdlightError:
            return a == b

    if started is not None and not same(started, cfg.teacher.path):
        raise TdlightError(f"teacher.path={cfg.teacher.path!r} is not the checkpoint teacher.run_dir="
                           f"{str(cfg.teacher.run_dir)!r} was fine-tuned from ({started!r}), and "
                           f"{where}.{key}.teacher_weights=pretrained makes the student from teacher.path; valid: "
                           f"teacher.path={started}, or {where}.{key}.teacher_weights=finetuned")


def _cut_depth(cfg: DictConfig, plan: list) -> int | None:
    """The depth of the cut student the plan makes (None: it decomposes), from the config alone."""
    from tdlight.stages.cut import planned_depth

    for step, stage_cfg, d, wiring in plan:
        if step == "cut":
            return planned_depth(_step_config(cfg, step, stage_cfg, d, wiring), where="stage.cut", wired=tuple(wiring))
    return None


PIPELINE_WIDE = ("limit_train", "limit_eval")  # pipeline keys every step that has the key takes, unless it sets its own


def _with_pipeline_limits(st, step: str):
    """The step's stage settings with the pipeline-wide ``stage.limit_train`` / ``stage.limit_eval``
    filled in where the step has that key and leaves it unset (its own value wins). The step's key
    hashes the result: a limited step never reuses an unlimited run, or the reverse."""
    node = st[step].copy()
    for key in PIPELINE_WIDE:
        if key in node and node[key] is None and st.get(key) is not None:
            node[key] = st[key]
    return node


def check(cfg: DictConfig, where: str = "stage", wired: tuple[str, ...] = ()) -> list:
    """Every step's settings, checked before the first step runs (a bad distill setting must not wait
    for a fine-tune to finish), each error naming the key as the user writes it
    (``stage.decompose.fit``). Returns the plan (:func:`_plan`)."""
    st = cfg.stage
    unknown = [s for s in st.steps if s not in ORDER]
    if unknown:
        raise TdlightError(f"unknown pipeline step(s) {unknown} in {where}.steps; valid: {list(ORDER)}")
    missing = [s for s in REQUIRED if s not in st.steps]
    if missing:
        raise TdlightError(f"{where}.steps must include {list(REQUIRED)}; missing {missing}")
    if "finetune" not in st.steps and not cfg.teacher.get("run_dir"):
        raise TdlightError(f"{where}.steps={list(st.steps)} has no finetune step: name the fine-tuned teacher the "
                           f"later steps read, teacher.run_dir=<a finetune run of the task>, or add finetune to "
                           f"{where}.steps")
    makers = [s for s in STUDENT_STEPS if s in st.steps]
    if len(makers) != 1:
        raise TdlightError(f"{where}.steps={list(st.steps)} must make the student with exactly one of "
                           f"{list(STUDENT_STEPS)} (decompose: the compressed student; cut: the teacher cut to its "
                           f"size, its peer); {'both are' if makers else 'neither is'} there")
    if cfg.get("task") is None:
        raise TdlightError("stage=pipeline needs a task: add task=<name>")
    if "finetune" not in st.steps:
        check_teacher_task(cfg, "this pipeline distills")
        _check_pretrained_teacher(cfg, where)
    plan = _plan(cfg)
    for step, stage_cfg, d, wiring in plan:
        STAGES[step].check(_step_config(cfg, step, stage_cfg, d, wiring), where=f"{where}.{step}", wired=tuple(wiring))
    if _cut_depth(cfg, plan) == 0 and st.distill.intermediate_epochs:
        raise TdlightError(f"{where}.distill.intermediate_epochs={st.distill.intermediate_epochs}: the cut student has "
                           f"no encoder layer (stage.cut.layers resolves to 0), so phase 1 has no hidden state or "
                           f"attention score to match; valid: {where}.distill.intermediate_epochs=0, or "
                           f"{where}.cut.layers ≥ 1")
    return plan


def run(cfg: DictConfig, run_dir: Path) -> dict:
    plan = check(cfg)
    dirs: dict[str, Path] = {}
    results: dict[str, dict] = {}
    given = given_teacher(cfg)
    if given is not None:
        log.info("finetune: not a step; the later steps read the fine-tuned teacher of teacher.run_dir=%s", given)
        dirs["finetune"] = given
        results["finetune"] = json.loads((given / STAGES["finetune"].result).read_text())
    elif cfg.teacher.get("run_dir"):
        log.info("finetune: starts from the fine-tuned model of teacher.run_dir=%s and fine-tunes it on %s (to "
                 "distill from that teacher as it is, leave finetune out of stage.steps)", cfg.teacher.run_dir,
                 cfg.task.name)
    for step, stage_cfg, d, wiring in plan:
        dirs[step] = d
        d.parent.mkdir(parents=True, exist_ok=True)
        # concurrent pipelines (sweep trials) share step directories: the first computes a step,
        # the others wait for it and reuse it
        with FileLock(str(d) + ".lock"):
            results[step] = _run_step(cfg, step, stage_cfg, d, wiring, f"pipeline-{run_dir.name}")

    summary = _summary(cfg, dirs, results)
    skipped = [s for s in ORDER if s in cfg.stage.steps and s not in dirs]  # (a cut to no layer: pretrain)
    write_json(run_dir / "pipeline.json", {"steps": {s: str(p) for s, p in dirs.items()}, "skipped": skipped,
                                           **summary})
    Console().print(_table(summary))
    sync = sync_command(list(dirs.values()))
    if sync:  # one command for every step's offline W&B run
        log.info("upload the steps' W&B runs with `%s`", sync)
    return summary


def _run_step(cfg: DictConfig, step: str, stage_cfg, d: Path, wiring: dict, pipeline_id: str) -> dict:
    record = STAGES[step]
    if record.finished(d):
        log.info("%s: reusing %s (same inputs)", step, d)
        return json.loads((d / record.result).read_text())
    sub = _step_config(cfg, step, stage_cfg, d, wiring, pipeline_id)
    d.mkdir(parents=True, exist_ok=True)
    (d / ".hydra").mkdir(exist_ok=True)
    OmegaConf.save(sub, d / ".hydra" / "config.yaml")
    log.info("%s: running in %s%s", step, d, " (resuming)" if sub.resume else "")
    Console().rule(f"[bold]pipeline step: {step}")
    try:
        return record.run(sub, d)
    except TdlightError as e:
        raise type(e)(pipeline_keys(str(e), step)) from e
    finally:
        finish_wandb()  # each step is its own W&B run


def pipeline_keys(message: str, step: str) -> str:
    """``message``, raised by a step that runs with its own settings as ``stage`` (:func:`_step_config`), with
    those keys spelt as the pipeline's command line sets them: ``stage.class_weights`` → ``stage.finetune.class_weights``
    (the settings checks already do this through their ``where``; this covers what only a run can find)."""
    return re.sub(rf"(?<![\w./-])stage\.(?!{step}\.)(?=[a-z_])", f"stage.{step}.", message)


def _summary(cfg: DictConfig, dirs: dict[str, Path], results: dict[str, dict]) -> dict:
    task = require_task(cfg)
    st = settings(cfg)
    teacher, tokenizer = load_classifier(str(dirs["finetune"] / "model"), task.num_labels)
    student, _ = load_classifier(str(dirs["distill"] / "model"), task.num_labels, execution=st.execution.value)
    max_length = st.distill.max_length or cfg.task.max_length  # what the student was trained on
    dm = datamodule(cfg, task, tokenizer, max_length=max_length, batch_size=st.speed_batch_size,
                    eval_batch_size=st.speed_batch_size, limit_train=None,
                    limit_eval=st.speed_batch_size, num_workers=0, train=False)
    dm.setup("validate")
    loader = dm.val_dataloader()
    batch = next(iter(loader[0] if isinstance(loader, list) else loader))
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "token_type_ids") if k in batch}
    speed = paired_speedup(teacher, student, inputs, reps=st.speed_reps)
    t_sum, s_sum = model_summary(teacher), model_summary(student)
    dense = t_sum["encoder_params"]
    cut = results.get("cut")  # the student is the teacher cut to fewer layers, dense: a peer, not compressed
    final = results.get("evaluate") or results["distill"]
    t_dev, s_dev = results["finetune"]["dev"], final["dev"]
    shipped = Path(final.get("shipped") or dirs["distill"] / "model")  # the student at its shipped precision
    t_bytes, s_bytes = directory_bytes(dirs["finetune"] / "model"), directory_bytes(shipped)
    return {
        "task": task.name,
        "teacher_score": results["finetune"]["score"],
        "student_score": (results.get("evaluate") or results["distill"])["score"],
        "majority_score": t_dev.get("majority_score"),
        "majority_share": t_dev.get("majority_share"),
        "teacher_top_share": t_dev.get("top_share"),
        "student_top_share": s_dev.get("top_share"),
        "teacher_balanced_accuracy": t_dev.get("balanced_accuracy"),
        "student_balanced_accuracy": s_dev.get("balanced_accuracy"),
        "student_constant": is_constant(s_dev),
        "teacher_encoder_params": dense,
        "student_encoder_params": s_sum["encoder_params"],
        # dense teacher encoder / student encoder (a cut to no layer has none: None)
        "ratio": dense / s_sum["encoder_params"] if s_sum["encoder_params"] else None,
        "student_kind": "cut" if cut else "compressed",
        "teacher_layers": encoder_shape(teacher).num_layers,
        "student_layers": encoder_shape(student).num_layers,
        "cut_kept": cut["kept"] if cut else None,  # the teacher's layers the cut kept (0-based)
        "teacher_model_params": t_sum["model_params"],
        "student_model_params": s_sum["model_params"],
        "model_ratio": t_sum["model_params"] / s_sum["model_params"],
        "teacher_bytes": t_bytes,
        "student_bytes": s_bytes,
        "bytes_ratio": t_bytes / s_bytes,
        "student_dir": str(shipped),
        "student_precision": final.get("precision", "fp32"),
        "student_score_fp32": final.get("score_fp32"),
        "speedup": speed["speedup"],
        "teacher_ms": speed["baseline_ms"],
        "student_ms": speed["candidate_ms"],
        "pretrain_tokens": results.get("pretrain", {}).get("tokens"),
        "student_execution": (current_plan(student) or {}).get("modes"),
    }


def _table(r: dict) -> Table:
    cut = r.get("student_kind") == "cut"
    what = (f" — student: the teacher cut to {r['student_layers']} of its {r['teacher_layers']} layers "
            f"{r['cut_kept']}, not compressed") if cut else ""
    t = Table(title=f"tdlight pipeline: {r['task']}{what}")
    for c in ("", "teacher", "student"):
        t.add_column(c, justify="right" if c else "left")
    t.add_row("dev GLUE score", f"{r['teacher_score']:.4f}", f"{r['student_score']:.4f}")
    if r.get("majority_score") is not None:
        t.add_row("majority-class baseline", f"{r['majority_score']:.4f}", f"{r['majority_score']:.4f}")
    if r.get("student_top_share") is not None:
        flag = "  [bold red](constant)" if r.get("student_constant") else ""
        gold = f" (gold's majority: {r['majority_share']:.3f})" if r.get("majority_share") is not None else ""
        t.add_row(f"top-prediction share{gold}", f"{r['teacher_top_share']:.3f}", f"{r['student_top_share']:.3f}{flag}")
    if r.get("student_balanced_accuracy") is not None:
        t.add_row("balanced accuracy (mean class recall)", f"{r['teacher_balanced_accuracy']:.4f}",
                  f"{r['student_balanced_accuracy']:.4f}")
    if r.get("student_score_fp32") is not None:
        t.add_row(f"dev score at fp32 (student ships {r['student_precision']})", "", f"{r['student_score_fp32']:.4f}")
    t.add_row("encoder parameters", f"{r['teacher_encoder_params']:,}", f"{r['student_encoder_params']:,}")
    ratio = "no encoder layer" if r["ratio"] is None else f"{r['ratio']:.2f}×"
    t.add_row("size ratio (encoder; a layer cut, not compressed)" if cut else "compression ratio (encoder, the paper's)",
              "1.00×", ratio)
    if r.get("student_model_params"):
        t.add_row("whole-model parameters", f"{r['teacher_model_params']:,}", f"{r['student_model_params']:,}")
        t.add_row("whole-model ratio", "1.00×", f"{r['model_ratio']:.2f}×")
        t.add_row(f"bytes on disk (student {r['student_precision']})", f"{r['teacher_bytes'] / 1e6:.1f} MB",
                  f"{r['student_bytes'] / 1e6:.1f} MB ({r['bytes_ratio']:.1f}× smaller)")
    t.add_row("forward ms (dev batch)", f"{r['teacher_ms']:.1f}", f"{r['student_ms']:.1f}")
    t.add_row("measured speed-up", "", f"{r['speedup']:.2f}×")
    if r.get("student_execution"):  # the execution plan the student was timed with (stage.execution)
        t.add_row("student units", "", ", ".join(f"{k} {v}" for k, v in r["student_execution"].items()))
    if r.get("pretrain_tokens"):
        t.add_row("pretraining tokens", "", f"{r['pretrain_tokens']:,}")
    return t
