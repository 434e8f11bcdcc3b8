"""stage=pipeline: all stages chained through run directories in one command; unchanged steps are reused."""

from __future__ import annotations

import csv
import json
import shutil

import pytest
from omegaconf import OmegaConf, open_dict

from tdlight.config import ROOT
from tdlight.model.execution import UNIT_MODES
from tdlight.stages.registry import STAGES
from tests.conftest import cli, runs


def test_every_step_is_checked_before_the_first_runs(teacher_dir, tmp_path):
    """A bad decompose or distill setting is refused before the fine-tune step trains, naming the key
    as written (was: after the fine-tune, as `stage.fit`)."""
    base = ["stage=pipeline", "task=mrpc", f"teacher.path={teacher_dir}", "trainer=cpu", "logger=csv"]
    for bad, message in ((["stage.decompose.fit=bogus"], "stage.decompose.fit='bogus'; valid: weights, outputs"),
                         (["stage.decompose.teacher_weights=bogus"],
                          "stage.decompose.teacher_weights='bogus'; valid: pretrained, finetuned"),
                         (["stage.distill.intermediate_epochs=0", "stage.distill.prediction_epochs=0"],
                          "stage.distill.intermediate_epochs + stage.distill.prediction_epochs must be ≥ 1"),
                         (["stage.decompose.fit=outputs", "stage.decompose.calibration_files=/no/such/file"],
                          "stage.decompose.calibration_files: '/no/such/file' does not exist"),
                         (["stage.steps=[finetune,decompose,distill,evaluate]", "stage.evaluate.max_length=0"],
                          "stage.evaluate.max_length=0")):
        r = cli(tmp_path, *base, *bad)
        assert r.returncode == 2, (bad, r.stderr[-2000:])
        assert message in r.stderr and "Traceback" not in r.stderr, (bad, r.stderr[-2000:])
        assert list(tmp_path.iterdir()) == [], bad  # no step ran, nothing left


def test_a_refusal_only_a_run_can_find_names_the_steps_key_as_the_pipeline_spells_it(teacher_dir, tmp_path):
    """CoLA's first 8 training sentences are all acceptable: balanced class weights are refused when the
    fine-tune step has read them (the settings check cannot know), naming stage.finetune.class_weights — the key
    the user set — not the step's own stage.class_weights; nothing after the step runs."""
    r = cli(tmp_path, "stage=pipeline", "task=cola", f"teacher.path={teacher_dir}", "trainer=cpu", "logger=csv",
            "stage.finetune.class_weights=balanced", "stage.limit_train=8", "stage.limit_eval=8",
            "stage.finetune.max_length=32")
    assert r.returncode == 2, r.stderr[-2000:]
    assert "stage.finetune.class_weights=balanced: the training examples have no ['0'] example (of 8)" in r.stderr, \
        r.stderr[-2000:]
    assert "stage.class_weights" not in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "decompose").exists()


def test_pipeline_keys_spells_a_steps_keys_as_the_pipeline_sets_them():
    from tdlight.stages.pipeline import pipeline_keys

    assert pipeline_keys("stage.augment_mlm='x' has another vocabulary; valid: stage.augment=false", "distill") == \
        "stage.distill.augment_mlm='x' has another vocabulary; valid: stage.distill.augment=false"
    kept = "stage.distill.lr=1; stage=pipeline; see outputs/stage.x and teacher.run_dir"
    assert pipeline_keys(kept, "distill") == kept


def test_a_step_seed_at_null_keeps_the_keys_of_steps_computed_before_it_existed(tmp_path):
    """stage.<step>.seed (null: the run's seed) came after steps were cached: while null it stays out of
    the step's key, so an upgrade does not retrain a teacher; set, it joins the key (another student)."""
    from tdlight.stages.pipeline import step_key
    from tests.conftest import compose_cfg

    cfg = compose_cfg(tmp_path, "stage=distill", "task=mrpc")
    unset = step_key("distill", cfg.stage, cfg, {})
    without = OmegaConf.create({k: v for k, v in OmegaConf.to_container(cfg.stage).items() if k != "seed"})
    assert step_key("distill", without, cfg, {}) == unset
    cfg.stage.seed = 0
    assert step_key("distill", cfg.stage, cfg, {}) != unset
    # so does distill's extra_text (none: as before it existed); its sources' files join the key's inputs
    cfg.stage.seed = None
    without = OmegaConf.create({k: v for k, v in OmegaConf.to_container(cfg.stage).items()
                                if k not in ("extra_text", "extra_limit", "head_epochs", "head_lr")})
    assert step_key("distill", without, cfg, {}) == unset
    cfg.stage.head_lr = 1e-3  # (head_epochs and head_lr likewise: keyed only when set)
    assert step_key("distill", cfg.stage, cfg, {}) != unset
    cfg.stage.head_lr = None
    cfg.stage.extra_text = ["rte:test"]
    from tdlight.stages.pipeline import step_inputs
    assert step_key("distill", cfg.stage, cfg, {}) != unset
    assert any("/RTE/test" in s.get("file", "") for s in step_inputs("distill", cfg.stage, cfg))


@pytest.mark.parametrize("step, node, key, value, grouping", [
    # compression.group_banks came after decompositions were cached (set: another decomposition, also
    # against the same grouping without it)
    ("decompose", "compression", "group_banks", {"attention": 24}, "type"),
    # stage.finetune.class_weights came after teachers were cached (balanced: another teacher)
    ("finetune", "stage.finetune", "class_weights", "balanced", None),
])
def test_a_setting_at_null_keeps_the_keys_of_steps_computed_before_it_existed(tmp_path, step, node, key, value,
                                                                               grouping):
    """Unset, a step keeps the key it had before the setting existed (an upgrade does not compute it again);
    set, it is another step."""
    from tdlight.stages.pipeline import step_key
    from tests.conftest import compose_cfg

    cfg = compose_cfg(tmp_path, "stage=pipeline", "task=cola", "experiment=cpu_7")
    unset = step_key(step, cfg.stage[step], cfg, {})
    before = compose_cfg(tmp_path, "stage=pipeline", "task=cola", "experiment=cpu_7")
    with open_dict(OmegaConf.select(before, node)):
        del OmegaConf.select(before, node)[key]
    assert step_key(step, before.stage[step], before, {}) == unset
    if grouping:
        cfg.compression.grouping = grouping
    without = step_key(step, cfg.stage[step], cfg, {})
    OmegaConf.select(cfg, node)[key] = value
    assert step_key(step, cfg.stage[step], cfg, {}) not in (unset, without)


def test_tiny_pipeline_end_to_end_and_reuse(pretrain_inputs, teacher_dir, tmp_path):
    _, _, files = pretrain_inputs
    args = ["stage=pipeline", "task=mrpc", f"teacher.path={teacher_dir}", "compression.rank=8", "compression.bank=12",
            "trainer=cpu", "trainer.enable_progress_bar=false", "logger=wandb",
            "stage.finetune.epochs=1", "stage.finetune.limit_train=48", "stage.finetune.limit_eval=32",
            "stage.finetune.batch_size=16", "stage.finetune.max_length=32",
            *[f.replace("stage.", "stage.pretrain.") for f in files],
            "stage.pretrain.max_steps=4", "stage.pretrain.val_every_n_steps=2", "stage.pretrain.max_length=16",
            "stage.pretrain.batch_size=4", "stage.pretrain.max_heldout_sequences=8",
            "stage.distill.intermediate_epochs=1", "stage.distill.prediction_epochs=1",
            "stage.distill.limit_train=48", "stage.distill.limit_eval=32", "stage.distill.batch_size=16",
            "stage.distill.max_length=32", "stage.evaluate.limit_eval=32", "stage.evaluate.max_length=32",
            "stage.speed_reps=2", "stage.speed_batch_size=8"]
    r = cli(tmp_path, *args)
    assert r.returncode == 0, r.stderr[-4000:]
    for step in ("finetune", "decompose", "pretrain", "distill", "evaluate"):
        (d,) = runs(tmp_path, step)
        assert d.name.startswith("pipeline-"), d
    (p,) = runs(tmp_path, "pipeline")
    summary = json.loads((p / "pipeline.json").read_text())
    assert summary["ratio"] > 1 and summary["speedup"] > 0 and summary["pretrain_tokens"] == 4 * 4 * 16
    # the student was timed with the execution plan timed on this machine (stage.execution=timed)
    assert set(summary["student_execution"]) == {"qkv", "attn_out", "ffn_in", "ffn_out"}
    assert set(summary["student_execution"].values()) <= set(UNIT_MODES) and "student units" in r.stdout
    ev = json.loads((runs(tmp_path, "evaluate")[0] / "metrics.json").read_text())
    assert summary["student_score"] == ev["score"]
    assert "measured speed-up" in r.stdout and "dev GLUE score" in r.stdout
    # what the user takes home, beside the paper's encoder ratio: whole-model parameters and bytes on disk
    assert summary["model_ratio"] > 1 and summary["student_bytes"] < summary["teacher_bytes"]
    assert summary["student_dir"] == str(runs(tmp_path, "distill")[0] / "model")
    assert "whole-model ratio" in r.stdout and "bytes on disk (student fp32)" in r.stdout
    # each step is its own W&B run (its wandb_id), grouped by the pipeline — decompose too, which trains
    # nothing: its HOOI sweeps' errors are its history (here in its CSV log) and its result its summary
    ids = {}
    for step in ("finetune", "decompose", "pretrain", "distill", "evaluate"):
        (d,) = runs(tmp_path, step)
        ids[step] = (d / "wandb_id").read_text().strip()
        assert len(list((d / "wandb").glob(f"offline-run-*-{ids[step]}"))) == 1  # logged there, not elsewhere
        assert OmegaConf.load(d / ".hydra" / "config.yaml").logger.group == f"pipeline-{p.name}"
    assert len(set(ids.values())) == 5
    (d,) = runs(tmp_path, "decompose")
    with open(d / "csv" / "version_0" / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    errors = [float(r[k]) for r in rows for k in r if k.startswith("hooi/") and k.endswith("/rel_error") and r[k]]
    assert errors and all(0 <= e < 1.5 for e in errors) and "hooi/sweep" in rows[0]

    # the same command again reuses every step; a changed distill setting reruns only distill + evaluate
    r = cli(tmp_path, *args)
    assert r.returncode == 0, r.stderr[-4000:]
    assert r.stdout.count("pipeline step:") == 0
    assert all(len(runs(tmp_path, s)) == 1 for s in ("finetune", "decompose", "pretrain", "distill", "evaluate"))
    r = cli(tmp_path, *args, "stage.distill.temperature=2")
    assert r.returncode == 0, r.stderr[-4000:]
    assert r.stdout.count("pipeline step:") == 2
    assert [len(runs(tmp_path, s)) for s in ("finetune", "decompose", "pretrain", "distill", "evaluate")] == [1, 1, 1, 2, 2]

    # the same command on other data (a copy of the task's files elsewhere) reuses nothing that read it
    data = tmp_path / "data"
    shutil.copytree(ROOT.parent / "shared" / "data" / "glue" / "MRPC", data / "glue" / "MRPC")
    r = cli(tmp_path, *args, "stage.distill.temperature=2", f"paths.data_dir={data}")
    assert r.returncode == 0, r.stderr[-4000:]
    assert "finetune: reusing" not in r.stderr + r.stdout
    counts = [len(runs(tmp_path, s)) for s in ("finetune", "decompose", "pretrain", "distill", "evaluate")]
    # (decompose and pretrain rerun too: their settings name files under paths.data_dir, read or not)
    assert counts[0] == 2 and counts[3:] == [3, 3]


def test_pipeline_decomposes_the_finetuned_teacher_fitted_on_the_tasks_own_text(pretrain_inputs, teacher_dir,
                                                                             tmp_path):
    """stage.decompose.teacher_weights=finetuned + calibration_files=task: the decomposition reads the
    pipeline's fine-tuned teacher and the task's training text (cached once, named by its hash), and
    both join its step key — another task never reuses it. Reconstruction pretraining then
    reconstructs that same fine-tuned teacher."""
    _, _, files = pretrain_inputs

    def args(task):
        return ["stage=pipeline", f"task={task}", f"teacher.path={teacher_dir}", "compression.rank=8",
                "compression.bank=12", "trainer=cpu", "trainer.enable_progress_bar=false", "logger=none",
                "stage.steps=[finetune,decompose,pretrain,distill]", "stage.finetune.epochs=1", "stage.finetune.limit_train=32",
                "stage.finetune.limit_eval=16", "stage.finetune.batch_size=16", "stage.finetune.max_length=16",
                "stage.decompose.teacher_weights=finetuned", "stage.decompose.fit=outputs",
                "stage.decompose.calibration_files=task", "stage.decompose.calibration_sequences=16",
                "stage.decompose.calibration_max_length=16", "stage.decompose.fit_iters=1",
                "stage.decompose.batch_size=4", "stage.decompose.heldout_batches=1",
                "stage.distill.intermediate_epochs=0", "stage.distill.prediction_epochs=1",
                "stage.distill.limit_train=32", "stage.distill.limit_eval=16", "stage.distill.batch_size=16",
                "stage.distill.max_length=16", *[f.replace("stage.", "stage.pretrain.") for f in files],
                "stage.pretrain.max_steps=2", "stage.pretrain.val_every_n_steps=2", "stage.pretrain.max_length=16",
                "stage.pretrain.batch_size=4", "stage.pretrain.max_heldout_sequences=8"]

    r = cli(tmp_path, *args("rte"))
    assert r.returncode == 0, r.stderr[-4000:]
    (ft,), (dec,), (pt,) = runs(tmp_path, "finetune"), runs(tmp_path, "decompose"), runs(tmp_path, "pretrain")
    saved = OmegaConf.load(dec / ".hydra" / "config.yaml")
    assert saved.teacher.run_dir == str(ft)  # the fine-tuned teacher, not teacher.path
    saved = OmegaConf.load(pt / ".hydra" / "config.yaml")
    assert saved.teacher.run_dir == str(ft) and saved.stage.student == str(dec)
    (text,) = (tmp_path / "cache" / "calibration").glob("rte-*.txt")
    fit = json.loads((dec / "metrics.json").read_text())["fit"]
    assert fit["calibration_files"] == str(text) and fit["calibration_sequences"] == 16
    lines = text.read_text().splitlines()
    assert len(lines) == 2490 and all(lines)  # RTE's training pairs, one line each (both sentences)
    r = cli(tmp_path, *args("mrpc"))
    assert r.returncode == 0, r.stderr[-4000:]
    assert len(runs(tmp_path, "decompose")) == 2 and len(list((tmp_path / "cache" / "calibration").glob("*.txt"))) == 2


def test_a_decomposition_is_keyed_by_the_task_only_when_its_fit_reads_the_tasks_text():
    decompose = STAGES["decompose"]
    assert "task" in decompose.keyed_nodes(OmegaConf.create({"fit": "outputs", "calibration_files": "task"}))
    # HOOI on the weights reads no text, whatever calibration_files says; a corpus fit reads no task
    assert "task" not in decompose.keyed_nodes(OmegaConf.create({"fit": "weights", "calibration_files": "task"}))
    assert "task" not in decompose.keyed_nodes(OmegaConf.create({"fit": "outputs", "calibration_files": None}))
    assert "task" in STAGES["distill"].keyed_nodes(OmegaConf.create({}))
    # pretraining reads the task only when it reconstructs on the task's text
    assert "task" in STAGES["pretrain"].keyed_nodes(OmegaConf.create({"train_files": "task"}))
    assert "task" not in STAGES["pretrain"].keyed_nodes(OmegaConf.create({"train_files": "wiki.txt.gz"}))


def test_a_sweep_trial_tags_its_own_steps_and_tags_the_shared_teacher_shared(tmp_path, teacher_dir):
    """`tdlight sweep` passes the trial's tags as logger.trial_tags: the steps from the student on are
    the trial's own and carry them; the fine-tuned teacher, shared by every trial, is tagged `shared`
    (was: trial-0's tags on the teacher every later trial reused)."""
    from tdlight.stages.pipeline import _plan, _step_config
    from tests.conftest import compose_cfg

    cfg = compose_cfg(tmp_path, "stage=pipeline", "task=mrpc", f"teacher.path={teacher_dir}", "logger=wandb",
                      "logger.group=tiny", "logger.tags=[mine]", "logger.trial_tags=['trial-3','ratio=7.1']")
    tags = {}
    for step, stage_cfg, d, wiring in _plan(cfg):
        lg = _step_config(cfg, step, stage_cfg, d, wiring, "pipeline-x").logger
        tags[step] = [*lg.tags, *lg.trial_tags]
    assert tags["finetune"] == ["mine", "pipeline-x", "shared"]
    for step in ("decompose", "pretrain", "distill", "evaluate"):
        assert tags[step] == ["mine", "pipeline-x", "trial-3", "ratio=7.1"], (step, tags[step])
    # a run outside a sweep has no trial tags and no `shared`
    cfg = compose_cfg(tmp_path, "stage=pipeline", "task=mrpc", f"teacher.path={teacher_dir}", "logger=wandb")
    step, stage_cfg, d, wiring = _plan(cfg)[0]
    lg = _step_config(cfg, step, stage_cfg, d, wiring, "pipeline-x").logger
    assert list(lg.tags) == [] and lg.group == "pipeline-x" and list(lg.trial_tags) == []


def test_a_pipeline_without_a_finetune_step_distills_the_teacher_named_by_teacher_run_dir(teacher_dir, tmp_path):
    """A teacher fine-tuned before (stage=finetune: a longer schedule, a GPU) is compressed as it is when
    stage.steps has no finetune step: the later steps read teacher.run_dir's model, pipeline.json names it,
    its weights key the steps (the same command reuses them). Refused, before anything runs and naming the
    value: no finetune step and no teacher.run_dir; a teacher fine-tuned on another task (an MRPC head would
    read RTE's pairs, silently) — through the pipeline, and stage=distill or stage=evaluate alone; a student
    made from a pretrained teacher.path other than the one the given teacher was fine-tuned from."""
    tiny = [f"teacher.path={teacher_dir}", "trainer=cpu", "trainer.enable_progress_bar=false", "logger=none"]
    for task in ("mrpc", "rte"):
        r = cli(tmp_path, "stage=finetune", f"task={task}", *tiny, "stage.epochs=1", "stage.limit_train=32",
                "stage.limit_eval=16", "stage.batch_size=16", "stage.max_length=16")
        assert r.returncode == 0, r.stderr[-3000:]
    mrpc, rte = runs(tmp_path, "finetune")
    assert OmegaConf.load(rte / ".hydra" / "config.yaml").task.name == "rte"
    out = tmp_path / "p"
    args = ["stage=pipeline", "task=rte", *tiny, "compression.rank=8", "compression.bank=12",
            "stage.steps=[decompose,distill,evaluate]", "stage.distill.intermediate_epochs=0",
            "stage.distill.prediction_epochs=1", "stage.distill.limit_train=32", "stage.distill.limit_eval=16",
            "stage.distill.batch_size=16", "stage.distill.max_length=16", "stage.evaluate.limit_eval=16",
            "stage.evaluate.max_length=16", "stage.speed_reps=2", "stage.speed_batch_size=8"]

    for bad, message in (([], "stage.steps=['decompose', 'distill', 'evaluate'] has no finetune step: name the "
                              "fine-tuned teacher the later steps read, teacher.run_dir="),
                         ([f"teacher.run_dir={mrpc}"], f"teacher.run_dir='{mrpc}' is a teacher fine-tuned on "
                                                       "task=mrpc; this pipeline distills task=rte; valid: a finetune run of rte")):
        r = cli(out, *args, *bad)
        assert r.returncode == 2 and message in r.stderr and "Traceback" not in r.stderr, (bad, r.stderr[-2000:])
        assert not out.exists() or list(out.iterdir()) == [], bad
    # the student made from the pretrained teacher (decompose's default) must be made from the one fine-tuned
    r = cli(out, *[a if not a.startswith("teacher.path=") else "teacher.path=minilm" for a in args],
            f"teacher.run_dir={rte}")
    assert r.returncode == 2, r.stderr[-2000:]
    assert (f"teacher.path='minilm' is not the checkpoint teacher.run_dir='{rte}' was fine-tuned from ('{teacher_dir}')"
            in r.stderr and "valid: teacher.path=" in r.stderr), r.stderr[-2000:]
    assert not out.exists() or list(out.iterdir()) == []
    r = cli(tmp_path / "d", "stage=distill", "task=rte", *tiny, f"teacher.run_dir={mrpc}",
            f"stage.student={teacher_dir}")
    assert r.returncode == 2, r.stderr[-2000:]
    assert "is a teacher fine-tuned on task=mrpc; this run distills task=rte" in r.stderr
    r = cli(tmp_path / "e", "stage=evaluate", "task=rte", *tiny, f"teacher.run_dir={mrpc}")
    assert r.returncode == 2 and "is a teacher fine-tuned on task=mrpc; this run evaluates task=rte" in r.stderr, \
        r.stderr[-2000:]

    r = cli(out, *args, f"teacher.run_dir={rte}")
    assert r.returncode == 0, r.stderr[-4000:]
    assert not (out / "finetune").exists()  # no teacher trained here
    assert "the later steps read the fine-tuned teacher of teacher.run_dir" in r.stderr + r.stdout
    (dist,), (p,) = runs(out, "distill"), runs(out, "pipeline")
    assert OmegaConf.load(dist / ".hydra" / "config.yaml").teacher.run_dir == str(rte)
    summary = json.loads((p / "pipeline.json").read_text())
    assert summary["steps"]["finetune"] == str(rte)
    assert summary["teacher_score"] == json.loads((rte / "metrics.json").read_text())["score"]
    r = cli(out, *args, f"teacher.run_dir={rte}")  # the same teacher again: every step reused
    assert r.returncode == 0 and r.stdout.count("pipeline step:") == 0, r.stderr[-2000:]
    # another teacher of the same task (other weights): nothing reused
    r = cli(tmp_path, "stage=finetune", "task=rte", *tiny, "stage.epochs=1", "stage.limit_train=32",
            "stage.limit_eval=16", "stage.batch_size=16", "stage.max_length=16", "stage.lr=1e-3")
    assert r.returncode == 0, r.stderr[-3000:]
    other = runs(tmp_path, "finetune")[-1]
    r = cli(out, *args, f"teacher.run_dir={other}")
    assert r.returncode == 0 and r.stdout.count("pipeline step:") == 3, r.stderr[-2000:]
