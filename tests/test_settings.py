"""A stage's settings: one typed object per stage (tdlight.stages.registry.settings), each choice one
vocabulary, every command-line key checked against the schemas before Hydra, pipeline-wide limits."""

import dataclasses

import pytest
from omegaconf import OmegaConf

from tdlight.config import Execution, Precision, check_overrides
from tdlight.errors import TdlightError
from tdlight.stages.registry import STAGES, settings, typed
from tdlight.stages.schemas import DecomposeStage, DistillStage, Fit, PipelineStage, RefitMode, StudentHead
from tests.conftest import compose_cfg

SCHEMAS = {n: r.schema for n, r in STAGES.items()}


def test_a_stage_reads_one_typed_object(tmp_path):
    cfg = compose_cfg(tmp_path, "stage=decompose", "stage.fit=outputs", "stage.fit_refit=global")
    st = settings(cfg)
    assert isinstance(st, DecomposeStage)
    assert st.fit is Fit.outputs and st.fit_refit is RefitMode["global"]
    assert isinstance(st.refine_files, str) and "${" not in st.refine_files  # interpolations resolved
    st = settings(compose_cfg(tmp_path, "stage=distill", "task=mrpc", "stage.head=teacher", "stage.layer_map=[[1,2]]"))
    assert isinstance(st, DistillStage) and st.head is StudentHead.teacher
    assert st.layer_map == [[1, 2]] and type(st.layer_map) is list  # a plain list, not a ListConfig


def test_settings_type_a_hand_made_stage_node_and_check_its_ranges(tmp_path):
    cfg = compose_cfg(tmp_path, "stage=decompose")
    raw = OmegaConf.to_container(cfg, resolve=False)
    raw["stage"]["fit"] = "outputs"
    untyped = OmegaConf.create(raw)
    assert OmegaConf.get_type(untyped.stage) is dict
    assert settings(untyped).fit is Fit.outputs  # typed in place by the stage's schema
    raw["stage"]["batch_size"] = 0
    with pytest.raises(TdlightError, match=r"stage.batch_size=0; valid: an integer ≥ 1"):
        settings(OmegaConf.create(raw))


def test_typed_puts_a_saved_config_under_the_schemas(tmp_path):
    saved = OmegaConf.to_container(compose_cfg(tmp_path, "stage=pipeline", "task=mrpc"), resolve=False)
    cfg = typed(saved)
    assert OmegaConf.get_type(cfg.stage) is PipelineStage
    assert OmegaConf.get_type(cfg.stage.decompose) is DecomposeStage
    saved["stage"]["decompose"]["fit"] = "bogus"
    with pytest.raises(Exception, match="bogus"):  # OmegaConf's ValidationError: the caller names the run
        typed(saved)


def test_one_vocabulary_per_choice():
    from tdlight.model.calibration import REFIT_MODES
    from tdlight.model.execution import EXECUTIONS
    from tdlight.tensor.precision import PRECISIONS

    assert [e.value for e in Execution] == list(EXECUTIONS)
    assert [p.value for p in Precision] == list(PRECISIONS)
    assert [m.value for m in RefitMode] == list(REFIT_MODES)


def test_hooi_defaults_are_written_once():
    from tdlight.tensor import hooi
    from tdlight.tensor.spec_data import CompressionSpec

    spec = CompressionSpec()
    assert (spec.init, spec.max_iter, spec.tol) == (hooi.INIT, hooi.MAX_ITER, hooi.TOL)


@pytest.mark.parametrize("overrides, stage, message", [
    (["compression.rnak=3"], "decompose", "'compression' has no key 'rnak'; did you mean rank?"),
    (["stage.epochs=2"], "pipeline", "stage=pipeline has no key 'epochs'; did you mean stage.finetune.epochs?"),
    (["stage.limit_trian=2"], "pipeline", "did you mean limit_train or limit_eval?"),
    (["stage.decompose.fitt=outputs"], "pipeline", "'stage.decompose' has no key 'fitt'; did you mean fit or "),
    (["foo=1"], "decompose", "the top level has no key 'foo'"),
    (["rank=8"], "decompose", "the top level has no key 'rank'; did you mean compression.rank?"),  # one level down
    (["stage.decompose.epochs=1"], "pipeline", "'stage.decompose' has no key 'epochs' (valid keys:"),
    (["trainer.max_step=1"], "finetune", "did you mean max_steps?"),
    (["stage.decompose.fit=bogus"], "pipeline", "stage.decompose.fit='bogus'; valid: weights, outputs"),
    (["teacher.pooling=first"], "decompose", "teacher.pooling='first'; valid: auto, cls, mean"),
    (["stage.precision=int4"], "evaluate", "stage.precision='int4'; valid: fp32, fp16, bf16, int8"),
    (["stage.execution=fast"], "pipeline", "stage.execution='fast'; valid: auto, timed, macs, size, factorized"),
    (["task.source=ftp"], "finetune", "task.source='ftp'; valid: auto, local, hub"),
])
def test_a_wrong_key_or_choice_is_refused_before_hydra(overrides, stage, message):
    with pytest.raises(TdlightError) as e:
        check_overrides(overrides, stage, SCHEMAS)
    assert message in str(e.value), str(e.value)


@pytest.mark.parametrize("overrides, stage", [
    (["stage.fit=outputs", "stage.fit_refit=both", "teacher.pooling=cls"], "decompose"),
    (["stage.decompose.fit=weights,outputs"], "pipeline"),  # a --multirun sweep: Hydra checks each value
    (["+stage.foo=1", "~stage.cache", "hydra.run.dir=x", "stage.calibration_files=${paths.data_dir}/x"], "decompose"),
    (["stage.finetune.epochs=2", "stage.limit_train=8", "stage.steps=[finetune,decompose,distill]"], "pipeline"),
    (["stage.anything=1"], None),  # the stage is chosen by a preset: its keys are Hydra's to check
    (["experiment=quickstart", "task=mrpc", "compression=paper_1_7", "teacher.run_dir=null"], None),
])
def test_keys_and_values_the_schemas_have_pass(overrides, stage):
    check_overrides(overrides, stage, SCHEMAS)


def test_a_pipeline_wide_limit_reaches_every_step_that_reads_the_task_unless_the_step_sets_its_own(tmp_path):
    from tdlight.stages.pipeline import _plan

    plain = {s: (sc, d) for s, sc, d, _ in _plan(compose_cfg(tmp_path, "stage=pipeline", "task=mrpc"))}
    limited = {s: (sc, d) for s, sc, d, _ in _plan(compose_cfg(
        tmp_path, "stage=pipeline", "task=mrpc", "stage.limit_train=16", "stage.limit_eval=8",
        "stage.distill.limit_train=5"))}
    assert limited["finetune"][0].limit_train == 16 and limited["finetune"][0].limit_eval == 8
    assert limited["distill"][0].limit_train == 5 and limited["distill"][0].limit_eval == 8  # its own value wins
    assert limited["evaluate"][0].limit_eval == 8
    assert plain["finetune"][0].limit_train is None
    # a limited step never reuses an unlimited one; a step without the keys keeps its directory
    assert limited["finetune"][1] != plain["finetune"][1] and limited["distill"][1] != plain["distill"][1]
    assert limited["decompose"][1] == plain["decompose"][1]
    assert {f.name for f in dataclasses.fields(PipelineStage)} >= {"limit_train", "limit_eval"}


def test_the_debug_preset_composes_and_passes_every_check(tmp_path, teacher_dir):
    from tdlight.stages.pipeline import check

    cfg = compose_cfg(tmp_path, "experiment=debug", "task=mrpc", f"teacher.path={teacher_dir}",
                      "compression.rank=8", "compression.bank=12", "stage.decompose.calibration_max_length=32")
    plan = check(cfg)
    assert [s for s, *_ in plan] == ["finetune", "decompose", "pretrain", "distill", "evaluate"]
    steps = {s: sc for s, sc, *_ in plan}
    assert steps["finetune"].limit_train == 32 and steps["distill"].limit_eval == 32
    assert steps["pretrain"].max_steps == 2 and steps["decompose"].fit == "outputs"


@pytest.mark.parametrize("old, new", [("refine_heldout_files", "heldout_files"),
                                      ("refine_heldout_batches", "heldout_batches"),
                                      ("refine_batch_size", "batch_size")])
def test_decompose_s_held_out_keys_were_renamed_and_old_runs_still_read(tmp_path, old, new):
    """They serve the output fit as much as the refinement: the old spelling names the new one, and a
    run saved under it resumes with its value under the new name."""
    from tdlight.config import migrate_saved, refuse_renamed

    with pytest.raises(TdlightError, match=rf"'stage.{old}' was renamed .*valid: stage.{new}"):
        refuse_renamed([f"stage.{old}=2"], "decompose")
    with pytest.raises(TdlightError, match=rf"valid: stage.decompose.{new}"):
        refuse_renamed([f"stage.decompose.{old}=2"], "pipeline")
    saved = OmegaConf.to_container(compose_cfg(tmp_path, "stage=pipeline", "task=mrpc"), resolve=False)
    saved["stage"]["decompose"][old] = saved["stage"]["decompose"].pop(new)
    saved["stage"]["decompose"][old] = 2 if "file" not in old else "/data/heldout.txt"
    cfg = typed(migrate_saved(OmegaConf.create(saved)))
    assert cfg.stage.decompose[new] == saved["stage"]["decompose"][old] and old not in cfg.stage.decompose
