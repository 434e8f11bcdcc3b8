"""The `tdlight` entry point, run as a user would (tiny teacher on disk): its main() in the test
process (conftest.tdlight), and as real processes where it takes one (runs started together, the
installed console script)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from tdlight.config import migrate_saved
from tests.conftest import tdlight


def run_cli(out: Path, *overrides: str) -> subprocess.CompletedProcess:
    flags = [o for o in overrides if o.startswith("--")]
    rest = [o for o in overrides if not o.startswith("--")]
    return tdlight(*flags, f"paths.output_dir={out}", *rest)


def run_dirs(out: Path) -> list[Path]:
    return sorted(p for p in (out / "decompose").glob("*") if p.is_dir()) if (out / "decompose").exists() else []


def test_decompose_writes_a_loadable_model_and_report(tmp_path, teacher_dir):
    r = run_cli(tmp_path, "stage=decompose", f"teacher.path={teacher_dir}", "compression=tucker",
                "compression.rank=8", "compression.bank=12")
    assert r.returncode == 0, r.stderr
    assert "encoder ratio" in r.stdout and "rel. error" in r.stdout
    (run,) = run_dirs(tmp_path)
    assert f"running decompose in {run}" in r.stdout  # where the composed config is (print_config=true prints it)
    assert (run / ".hydra" / "config.yaml").is_file()
    report = json.loads((run / "metrics.json").read_text())
    assert report["spec"]["rank_in"] == 8 and report["spec"]["banks"] == {"encoder": 12}
    assert set(report["type_errors"]) == {"query", "key", "value", "attn_out", "ffn_in", "ffn_out"}
    assert report["ratio"] > 1
    import tdlight

    model = tdlight.load_compressed(run / "model")
    from transformers import AutoTokenizer

    text = "w1 w2 [MASK]"
    assert tdlight.load_tokenizer(run / "model")(text)["input_ids"] == AutoTokenizer.from_pretrained(teacher_dir)(text)["input_ids"]
    assert type(model).__name__ == "TdlightBertForSequenceClassification"  # BertForSequenceClassification + tdlight's encoder
    assert model.bert.encoder.compression.rank_in == 8


def test_group_banks_from_the_command_line(tmp_path, teacher_dir):
    """A bank per group (attention keeps all 8 cores, the FFN shares 2), solved to the preset's ratio;
    saved with the model, which loads with those banks."""
    r = run_cli(tmp_path, "stage=decompose", f"teacher.path={teacher_dir}", "compression=paper_1_7",
                "compression.grouping=type", "compression.group_banks={attention:8,ffn:2}", "compression.target_ratio=1.5")
    assert r.returncode == 0, r.stderr
    (run,) = run_dirs(tmp_path)
    report = json.loads((run / "metrics.json").read_text())
    assert report["spec"]["banks"] == {"attention": 8, "ffn": 2} and report["ratio"] >= 1.5
    import tdlight

    model = tdlight.load_compressed(run / "model")
    assert dict(model.bert.encoder.compression.banks) == {"attention": 8, "ffn": 2}


@pytest.mark.parametrize("preset", ["paper_1_7", "shared", "lowrank"])
def test_presets_resolve_on_any_teacher(tmp_path, teacher_dir, preset):
    r = run_cli(tmp_path, f"teacher.path={teacher_dir}", f"compression={preset}", "stage.save_model=false")
    assert r.returncode == 0, r.stderr
    report = json.loads((run_dirs(tmp_path)[0] / "metrics.json").read_text())
    if preset == "paper_1_7":
        assert report["spec"]["rank_in"] == 16 and report["spec"]["banks"] == {"encoder": 12}


def test_runs_started_together_get_their_own_run_directories(tmp_path, teacher_dir):
    """Two runs started in the same second: two run directories, each with its own log and report."""
    cmd = [sys.executable, "-m", "tdlight.cli", f"paths.output_dir={tmp_path}", f"teacher.path={teacher_dir}",
           "stage.save_model=false", "stage.cache=false"]
    procs = [subprocess.Popen([*cmd, f"compression.rank={r}"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                              text=True) for r in (4, 8)]
    assert all(p.wait(timeout=300) == 0 for p in procs), [p.stderr.read()[-2000:] for p in procs]
    dirs = run_dirs(tmp_path)
    assert len(dirs) == 2
    ranks = sorted(json.loads((d / "metrics.json").read_text())["spec"]["rank_in"] for d in dirs)
    assert ranks == [4, 8]
    for d in dirs:
        assert (d / "tdlight.log").read_text().count("resolved spec") == 1  # one run per log


def test_multirun_gives_one_run_dir_per_job(tmp_path, teacher_dir):
    r = run_cli(tmp_path, "--multirun", f"teacher.path={teacher_dir}", "compression.rank=4,8",
                "stage.save_model=false")
    assert r.returncode == 0, r.stderr
    reports = sorted((tmp_path / "multirun").rglob("metrics.json"))
    assert [json.loads(p.read_text())["spec"]["rank_in"] for p in reports] == [4, 8]


@pytest.mark.parametrize("overrides, message", [
    (["compression.rank=0"], "rank_in=0"),
    (["compression.rank=-2"], "rank_in=-2"),
    (["compression.rank=33"], "rank_in=33"),
    (["compression.rank=8", "compression.bank=25"], "bank=25"),
    (["compression.variant=V"], "unknown variant 'V'"),
    (["compression.scope=heads"], "unknown layout scope 'heads'"),
    (["teacher.path=/does/not/exist"], "does not exist"),
    (["compression.rnak=3"], "'compression' has no key 'rnak'; did you mean rank?"),
    (["compression.rank=abc"], "could not be converted to Integer"),
    (["compression=nope"], "nope"),
    (["compression.grouping=type", "compression.rank=8", "compression.group_banks={attn:2}"],
     "group_banks names group 'attn', which grouping='type' does not have; valid groups: attention (n=8), ffn (n=16)"),
    (["compression.grouping=type", "compression.rank=8", "compression.group_banks={ffn:17}"],
     "group_banks['ffn']=17; valid: an integer in [1, 16]"),
    (["compression.grouping=type", "compression.group_banks={ffn:x}"], "group_banks['ffn']='x'; valid: an integer"),
    # a 2-layer D=32 encoder is mostly biases and LayerNorms: 1/48 cannot be reached
    (["compression=paper_1_48"], "target_ratio=48.0 is out of reach"),
    (["stage=nope"], "nope"),
    # a key added with + / ++ under a validated group is refused like a typo
    (["+compression.foo=1"], "'compression' has no key 'foo'"),
    (["++compression.foo=1"], "'compression' has no key 'foo'"),
    (["stage=distill", "+stage.foo=2"], "'stage' has no key 'foo'"),
    (["+foo=3"], "the top level has no key 'foo'"),
    # the preset's per-task settings follow experiment= and task=; chosen by hand they would be silently skipped
    (["experiment=cpu_7", "task=cola", "experiment_task=null"], "valid: '~experiment_task' to run the preset without it"),
    (["experiment=cpu_7", "task=sst2", "experiment_task=cpu_7_cola"], "experiment_task follows experiment= and task="),
    # gold labels on a preset that augments for this task: the refusal says how to turn the copies off
    (["experiment=cpu_7", "task=cola", "stage.distill.gold_weight=1"],
     "or stage.distill.augment=false for gold labels (a preset turns augmentation on for some tasks"),
    # renamed keys: the old spelling is refused by a message that names the new one
    (["device=cpu"], "'device' was renamed (override 'device=cpu'); valid: trainer.accelerator"),
    (["stage=finetune", "task=rte", "trainer.max_epochs=2"], "valid: the stage's epochs: stage.epochs (finetune)"),
    (["stage=pipeline", "task=rte", "stage.pretrain.steps=5"], "valid: stage.pretrain.max_steps"),
    (["trainer.accelerator=tpu"], "trainer.accelerator='tpu': the decomposition runs on auto, cpu, gpu or cuda"),
])
def test_bad_input_exits_2_and_writes_nothing(tmp_path, teacher_dir, overrides, message):
    if not any(o.startswith("teacher.path") for o in overrides):
        overrides = [f"teacher.path={teacher_dir}", *overrides]
    r = run_cli(tmp_path, *overrides)
    assert r.returncode == 2, (r.returncode, r.stderr)
    assert message in r.stderr
    assert "Traceback" not in r.stderr
    assert run_dirs(tmp_path) == []


def test_not_bert_shaped_teacher_exits_2(tmp_path):
    from transformers import GPT2Config, GPT2Model

    path = tmp_path / "gpt2"
    GPT2Model(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=50)).save_pretrained(path)
    r = run_cli(tmp_path / "out", f"teacher.path={path}", "compression.rank=4")
    assert r.returncode == 2 and "not BERT-shaped" in r.stderr, r.stderr
    assert run_dirs(tmp_path / "out") == []


def test_decompose_reuses_the_cached_decomposition(tmp_path, teacher_dir):
    args = ("stage=decompose", f"teacher.path={teacher_dir}", "compression.rank=8", "compression.bank=12")
    r1 = run_cli(tmp_path, *args)
    assert r1.returncode == 0, r1.stderr
    r2 = run_cli(tmp_path, *args)
    assert r2.returncode == 0, r2.stderr
    first, second = run_dirs(tmp_path)
    rep1, rep2 = (json.loads((d / "metrics.json").read_text()) for d in (first, second))
    assert "cached" not in rep1 and rep2["cached"].startswith(str(tmp_path / "cache" / "decompose"))
    assert rep2["rel_error"] == rep1["rel_error"] and "(cached)" in r2.stdout
    assert (first / "model" / "model.safetensors").read_bytes() == (second / "model" / "model.safetensors").read_bytes()
    r3 = run_cli(tmp_path, *args[:-1], "compression.bank=6")  # another spec: decomposed afresh
    assert r3.returncode == 0, r3.stderr
    assert "cached" not in json.loads((run_dirs(tmp_path)[-1] / "metrics.json").read_text())
    r4 = run_cli(tmp_path, *args, "stage.cache=false")
    assert r4.returncode == 0, r4.stderr
    assert "cached" not in json.loads((run_dirs(tmp_path)[-1] / "metrics.json").read_text())


def test_saved_configs_of_older_runs_read_with_the_renamed_keys():
    """config.migrate_saved: each renamed key of a saved config moves to its new name (or is dropped
    for the new default), only for the stage it was renamed in."""
    pretrain = migrate_saved(OmegaConf.create({"device": "cpu", "trainer": {"max_epochs": 3, "devices": 1},
                                               "stage": {"name": "pretrain", "steps": 6}}))
    assert "device" not in pretrain and "max_epochs" not in pretrain.trainer
    assert pretrain.stage.max_steps == 6 and "steps" not in pretrain.stage
    pipeline = migrate_saved(OmegaConf.create({"stage": {"name": "pipeline", "steps": ["finetune", "decompose"],
                                                         "pretrain": {"steps": 4}}}))
    assert list(pipeline.stage.steps) == ["finetune", "decompose"]  # the pipeline's list of steps stays
    assert pipeline.stage.pretrain.max_steps == 4 and "steps" not in pipeline.stage.pretrain


def test_dry_run_checks_everything_before_work_and_runs_nothing(tmp_path, teacher_dir):
    """dry_run=true: the checks that come before work, the resolved settings, nothing written."""
    out = tmp_path / "out"
    r = run_cli(out, "stage=finetune", "task=mrpc", f"teacher.path={teacher_dir}", "dry_run=true")
    assert r.returncode == 0, r.stderr[-2000:]
    assert "dry run: the finetune settings above pass every check" in r.stdout and "task:" in r.stdout
    assert not out.exists()
    # what a run refuses before work, a dry run refuses the same way: a setting, a missing input
    for bad, message in ((["stage=finetune", "task=mrpc", "teacher.path=/no/such/teacher"], "does not exist"),
                         (["stage=finetune", "task=mnli"], "no local file for mnli train"),
                         # the tasks listed are those task= accepts (was: 'ax' too, which has no config)
                         (["stage=finetune"], "add task=<name>; valid: ['cola', 'mnli', 'mrpc', 'qnli', 'qqp', 'rte', "
                                              "'sst2', 'stsb', 'wnli']"),
                         (["stage=pipeline", "task=mrpc", "stage.decompose.fit=bogus"], "stage.decompose.fit='bogus'"),
                         (["stage=decompose", "compression.rank=0"], "rank_in=0 is impossible")):
        r = run_cli(out, f"teacher.path={teacher_dir}", *bad, "dry_run=true")
        assert r.returncode == 2 and message in r.stderr and "Traceback" not in r.stderr, (bad, r.stderr[-2000:])
        assert not out.exists()



def test_help_is_tdlights_own_page():
    """`tdlight --help` / `tdlight help`: the subcommands, every config group with its options (from
    conf/ and the stage registry), the most used keys (was: Hydra's page, no subcommand mentioned;
    `tdlight help` a parse error)."""
    from tdlight.stages.registry import STAGES

    # --help through the installed console script (`tdlight`, next to this interpreter): the one test
    # that runs the entry point pip wrote; `help` in this process
    script = Path(sys.executable).parent / "tdlight"
    assert script.is_file(), script
    for flag in ("--help", "help"):
        r = (subprocess.run([str(script), flag], capture_output=True, text=True, timeout=300) if flag == "--help"
             else tdlight(flag))
        assert r.returncode == 0 and r.stderr == "", (flag, r.stderr[-2000:])
        for text in ("sweep-report SWEEP_DIR", "export-onnx MODEL_DIR", "plan MODEL_DIR", "dry_run=true", "--cfg job",
                     "task:            cola, mnli", "experiment:", "quickstart",
                     "experiment_task: cpu_48_mrpc, cpu_7_cola (follows experiment= and task=", *STAGES):
            assert text in r.stdout, (flag, text)
