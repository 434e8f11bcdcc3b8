"""Training stages: finetune / evaluate end to end, run directories, resume, loggers."""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L
import pytest
import safetensors.torch
import torch
from omegaconf import OmegaConf

from tests.conftest import GLUE, SMALL, cli, compose_cfg, crash_at, runs, tdlight, tiny_config


def weights(model_dir: Path) -> dict:
    return safetensors.torch.load_file(str(model_dir / "model.safetensors"))


def test_log_model_makes_the_saved_model_a_wandb_artifact(tmp_path, teacher_dir):
    """logger.log_model=true: the step's model/ becomes a W&B artifact of type model (offline: recorded in
    the run's file, uploaded by wandb sync); off by default."""
    common = ["stage=finetune", "task=mrpc", f"teacher.path={teacher_dir}", "stage.epochs=1", "logger=wandb", *SMALL]
    r = cli(tmp_path, *common, "logger.log_model=true")
    assert r.returncode == 0, r.stderr[-3000:]
    (run,) = runs(tmp_path, "finetune")
    (data,) = [p.read_bytes() for p in run.glob("wandb/offline-run-*/*.wandb")]
    name = f"finetune-mrpc-{run.name}"
    assert name.encode() in data and b"model.safetensors" in data
    assert f"logged as artifact {name}" in r.stdout + r.stderr
    r = cli(tmp_path, *common, "stage.lr=1e-4")
    assert r.returncode == 0, r.stderr[-3000:]
    (other,) = [p for p in runs(tmp_path, "finetune") if p != run]
    (data,) = [p.read_bytes() for p in other.glob("wandb/offline-run-*/*.wandb")]
    assert b"model.safetensors" not in data and "logged as artifact" not in r.stdout + r.stderr


def test_finetune_then_evaluate_cli(tmp_path, teacher_dir):
    r = cli(tmp_path, "stage=finetune", "task=mrpc", f"teacher.path={teacher_dir}", "stage.epochs=2",
            "logger=wandb", *SMALL)
    assert r.returncode == 0, r.stderr[-3000:]
    (run,) = runs(tmp_path, "finetune")
    for f in (".hydra/config.yaml", "tdlight.log", "checkpoints/last.ckpt", "checkpoints/best.ckpt",
              "model/config.json", "model/model.safetensors", "model/tokenizer.json", "metrics.json",
              "wandb_id"):
        assert (run / f).exists(), f
    assert list((run / "wandb").glob(f"offline-run-*-{(run / 'wandb_id').read_text().strip()}"))
    m = json.loads((run / "metrics.json").read_text())
    assert m["task"] == "mrpc" and set(m["dev"]) == {"f1", "accuracy", "score", "majority_score", "top_share",
                                                       "majority_share", "balanced_accuracy", "constant", "loss"}
    assert 0 < m["dev"]["loss"] < 5  # the gold-label cross-entropy on dev (val/loss)
    assert 0.5 <= m["dev"]["top_share"] <= 1 and m["constant_predictions"] == (m["dev"]["top_share"] > 0.95)
    assert m["score"] == pytest.approx((m["dev"]["f1"] + m["dev"]["accuracy"]) / 2)
    assert len(m["epoch_seconds"]) == 2 and m["global_step"] == 6
    assert "GLUE score" in r.stdout
    # a quiet console: each Lightning line once, no advertisements, no dependency deprecations or
    # W&B chatter, no weight-loading bars; the W&B run is named in one line of ours
    console = r.stdout + r.stderr
    assert console.count("GPU available") <= 1, console[-3000:]  # once where there is a GPU to use
    for noise in ("GPU available: False", "TPU available", "HPU available", "LOAD REPORT", "💡", "litlogger", "anonymous setting", "LeafSpec", "wandb leet", "Tracking run with wandb",
                  "Loading weights", "Writing model shards", "Saving the dataset"):
        assert noise not in console, (noise, console[-3000:])
    assert "upload it with `wandb sync" in r.stdout
    (csv,) = [p.read_text() for p in (run / "csv").glob("version_*/metrics.csv")]
    assert "train/loss_step" in csv and "val/score" in csv

    # evaluate the fine-tuned teacher by its run directory: the same dev score
    r = cli(tmp_path, "stage=evaluate", "task=mrpc", f"stage.model={run}", "stage.limit_eval=32",
            "stage.max_length=32", "trainer=cpu", "logger=csv")
    assert r.returncode == 0, r.stderr[-3000:]
    (ev,) = runs(tmp_path, "evaluate")
    e = json.loads((ev / "metrics.json").read_text())
    assert e["score"] == pytest.approx(m["score"], abs=1e-6)
    assert e["ratio"] == 1.0 and e["examples"] == 32 and e["examples_per_second"] > 0
    assert "examples / s" in r.stdout

    # a later stage names its input by run directory
    r = cli(tmp_path, "stage=decompose", f"teacher.run_dir={run}", "compression.rank=8", "compression.bank=12")
    assert r.returncode == 0, r.stderr[-3000:]
    (dec,) = runs(tmp_path, "decompose")
    r = cli(tmp_path, "stage=evaluate", "task=mrpc", f"stage.model={dec}", "stage.limit_eval=32",
            "stage.max_length=32", "trainer=cpu", "logger=none", "stage.precision=int8")
    assert r.returncode == 0, r.stderr[-3000:]
    ev2 = sorted(runs(tmp_path, "evaluate"))[-1]
    e2 = json.loads((ev2 / "metrics.json").read_text())
    assert e2["ratio"] > 1 and e2["rank_in"] == 8
    # shipped at int8: stored in the run's model/, scored as loaded back, the fp32 score beside it
    assert e2["precision"] == "int8" and e2["shipped"] == str(ev2 / "model") and "score_fp32" in e2
    assert json.loads((ev2 / "model" / "tdlight.json").read_text())["precision"] == "int8"
    assert e2["model_bytes"] < 0.6 * sum(f.stat().st_size for f in (dec / "model").iterdir())
    assert "GLUE score at fp32 (shipped: int8)" in r.stdout and "bytes on disk (int8)" in r.stdout
    r = cli(tmp_path, "stage=evaluate", "task=mrpc", f"stage.model={dec}", "stage.precision=int4")
    assert r.returncode == 2 and "stage.precision" in r.stderr and "int8" in r.stderr, r.stderr[-2000:]


def resume_overrides(teacher_dir) -> list[str]:
    return ["stage=finetune", "task=stsb", f"teacher.path={teacher_dir}", "stage.epochs=2", "logger=csv",
            "trainer.checkpoint_every_n_steps=1", *SMALL, "stage.limit_train=64"]


@pytest.fixture(scope="module")
def straight(tmp_path_factory, teacher_dir):
    """The uninterrupted run that each crash-and-resume case is compared with (read only: trained once)."""
    from tdlight.stages import finetune

    out = tmp_path_factory.mktemp("straight")
    finetune.run(compose_cfg(out, *resume_overrides(teacher_dir)), out / "straight")
    return out / "straight"


@pytest.mark.parametrize("stop_after", [2, 4, 6], ids=["mid-epoch-0", "end-of-epoch-0", "mid-epoch-1"])
def test_resume_equals_uninterrupted(tmp_path, teacher_dir, straight, stop_after):
    """2 epochs of 4 steps straight == crashed after `stop_after` steps + resumed: same weights, same scores."""
    import time

    from tdlight.stages import finetune

    t0 = time.perf_counter()

    over = resume_overrides(teacher_dir)
    resumed = tmp_path / "resumed"
    with pytest.raises(RuntimeError, match="simulated crash"):
        finetune.run(compose_cfg(tmp_path, *over), resumed, extra_callbacks=[crash_at(stop_after)])
    assert (resumed / "checkpoints" / "last.ckpt").is_file() and not (resumed / "model").exists()
    cfg = compose_cfg(tmp_path, *over)
    cfg.resume = str(resumed)
    out = finetune.run(cfg, resumed)
    assert out["global_step"] == 8
    # seconds per epoch: both epochs, each a part of this test's own time (a resume from the end of an
    # epoch reported the machine's uptime, perf_counter() - 0)
    assert len(out["epoch_seconds"]) == 2, out["epoch_seconds"]
    assert all(0 < s < time.perf_counter() - t0 for s in out["epoch_seconds"]), out["epoch_seconds"]
    ref = json.loads((straight / "metrics.json").read_text())
    # every epoch was validated, across the crash: a checkpoint taken between an epoch's last batch and its
    # validation resumed as if that validation had run, and lost it (trainer.LastCheckpoint)
    import csv

    validated = {int(r["step"]) for f in (resumed / "csv").rglob("metrics.csv") for r in csv.DictReader(open(f))
                 if r.get("val/score")}
    assert validated == {3, 7, 8}, validated  # after each epoch's 4 steps, and the final validation of best.ckpt
    assert out["dev"] == pytest.approx(ref["dev"], abs=1e-6)
    for name in ("last.ckpt", "best.ckpt"):
        a = torch.load(straight / "checkpoints" / name, weights_only=True)["state_dict"]
        b = torch.load(resumed / "checkpoints" / name, weights_only=True)["state_dict"]
        assert a.keys() == b.keys()
        for k in a:
            assert (a[k] - b[k]).abs().max() <= 1e-6, (name, k)
    a, b = weights(straight / "model"), weights(resumed / "model")
    for k in a:
        assert (a[k] - b[k]).abs().max() <= 1e-6, k


def test_resume_cli_continues_same_run_and_wandb_id(tmp_path, teacher_dir):
    r = cli(tmp_path, "stage=finetune", "task=cola", f"teacher.path={teacher_dir}", "stage.epochs=1",
            "logger=wandb", *SMALL)
    assert r.returncode == 0, r.stderr[-3000:]
    (run,) = runs(tmp_path, "finetune")
    wid = (run / "wandb_id").read_text()
    # a run saved before `device` and `trainer.max_epochs` were renamed away still resumes
    saved = OmegaConf.load(run / ".hydra" / "config.yaml")
    saved.device, saved.trainer.max_epochs = "auto", None
    OmegaConf.save(saved, run / ".hydra" / "config.yaml")
    r = cli(tmp_path, f"resume={run}", "stage.epochs=2")
    assert r.returncode == 0, r.stderr[-3000:]
    assert runs(tmp_path, "finetune") == [run]  # no second run directory
    assert (run / "wandb_id").read_text() == wid
    m = json.loads((run / "metrics.json").read_text())
    assert m["global_step"] == 6 and m["epochs"] == 2
    assert "resuming" in (run / "tdlight.log").read_text()
    # the override stays in force for a later resume (recorded next to the saved config)
    assert "stage.epochs=2" in (run / ".hydra" / "resume_overrides.yaml").read_text()
    r = cli(tmp_path, f"resume={run}")
    assert r.returncode == 0, r.stderr[-3000:]
    assert json.loads((run / "metrics.json").read_text())["global_step"] == 6  # nothing left to train


def test_resume_overrides_are_checked_against_the_runs_own_stage_and_kept_only_when_they_work(tmp_path, teacher_dir):
    r = cli(tmp_path, "stage=finetune", "task=cola", f"teacher.path={teacher_dir}", "stage.epochs=1", "logger=csv",
            *SMALL)
    assert r.returncode == 0, r.stderr[-3000:]
    (run,) = runs(tmp_path, "finetune")
    history = run / ".hydra" / "resume_overrides.yaml"
    before = sorted(str(p) for p in tmp_path.rglob("*"))
    for bad, message in ((["trainer.accumulate_grad_batches=0"], "trainer.accumulate_grad_batches=0; valid"),
                         (["stage.epochs=abc"], "do not fit the saved finetune config"),
                         (["stage.name=decompose", "compression.rank=8"], "keeps its stage ('finetune')"),
                         (["task.name=mrpc"], "keeps its task ('cola')"),
                         (["stage.refine_steps=3"], "has no key 'stage.refine_steps'")):
        r = cli(tmp_path, f"resume={run}", *bad)
        assert r.returncode == 2, (bad, r.returncode, r.stderr[-2000:])
        assert message in r.stderr and "Traceback" not in r.stderr, (bad, r.stderr[-2000:])
        assert not history.exists()  # a refused override never sticks to the run
        assert sorted(str(p) for p in tmp_path.rglob("*")) == before  # and leaves nothing behind
    # a value of the run's own stage (not the default stage's) works, and stays in force
    r = cli(tmp_path, f"resume={run}", "stage.epochs=2")
    assert r.returncode == 0, r.stderr[-3000:]
    assert json.loads((run / "metrics.json").read_text())["epochs"] == 2
    assert "stage.epochs=2" in history.read_text()


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["stage=finetune"], "needs a task: add task=<name>"),
        (["stage=finetune", "task=cola", "task.name=colaa"], "unknown GLUE task 'colaa'"),
        (["stage=finetune", "task=mnli"], "MNLI"),
        (["stage=evaluate", "task=cola", "stage.model=/no/such/dir"], "does not exist"),
        (["stage=finetune", "task=cola", "teacher.run_dir=/no/such/run"], "does not exist"),
        (["resume=/no/such/run"], "does not exist"),
        (["stage=finetune", "task=cola", "logger=csv", "trainer.precision=17"], "invalid trainer settings"),
        # class weights: a name that is none, a list of the wrong length or sign, a regression task
        (["stage=finetune", "task=cola", "stage.class_weights=inverse"],
         "stage.class_weights='inverse' is not a class weighting; valid: ['none', 'balanced'] or a list of 2"),
        (["stage=finetune", "task=cola", "stage.class_weights=[1,2,3]"],
         "stage.class_weights=[1, 2, 3]: valid: ['none', 'balanced'] or a list of 2 positive numbers"),
        (["stage=finetune", "task=rte", "stage.class_weights=[1,0]"], "a list of 2 positive numbers, one per class"),
        (["stage=finetune", "task=stsb", "stage.class_weights=balanced"],
         "task=stsb is a regression (MSE on a score), it has no classes to weight"),
        (["stage=pipeline", "task=cola", "compression.rank=8", "stage.finetune.class_weights=[2]"],
         "stage.finetune.class_weights=[2]: valid"),
        # packed calibration sequences longer than the tiny teacher's 64 positions: one error naming the limit,
        # not a tensor-size traceback
        (["stage=decompose", "compression.rank=8", "stage.fit=outputs", "stage.calibration_max_length=512"],
         "stage.calibration_max_length=512 is longer than the model's position table; valid: at most 64"),
        # the same for GLUE stages, named as set (was: a traceback when a batch reached 65 tokens)
        (["stage=finetune", "task=mrpc", "stage.max_length=512", *SMALL[:3], "trainer=cpu", "logger=csv"],
         "stage.max_length=512 is longer than the model's position table; valid: at most 64"),
        (["stage=finetune", "task=mrpc", "task.max_length=100", *SMALL[:3], "trainer=cpu", "logger=csv"],
         "task.max_length=100 is longer than the model's position table; valid: at most 64"),
        # a damping the fit cannot use says which values it can (was: "valid: a number ≥ 0" for 1e7)
        (["stage=decompose", "compression.rank=8", "stage.fit=outputs", "stage.calibration_damp=1e7"],
         "stage.calibration_damp=10000000.0; valid: in [0, 1e6)"),
    ],
)
def test_bad_input_exit_2_and_nothing_written(tmp_path, teacher_dir, overrides, message):
    r = cli(tmp_path, f"teacher.path={teacher_dir}", *overrides)
    assert r.returncode == 2, r.stderr[-2000:]
    assert message.lower() in r.stderr.lower()
    assert r.stderr.strip().splitlines()[-1].startswith("tdlight: error:")
    leftovers = [p for p in tmp_path.rglob("*") if p.is_file() and "cache" not in p.parts]
    assert leftovers == []


def test_finetune_stops_early_after_patience_epochs_without_a_better_dev_score(tmp_path, teacher_dir):
    # a learning rate too small to change a prediction: epoch 0 sets the best score, epochs 1 and 2 do
    # not beat it (improving means strictly better), so patience 2 stops after 3 of 10 epochs
    r = cli(tmp_path, "stage=finetune", "task=mrpc", f"teacher.path={teacher_dir}", "stage.epochs=10",
            "stage.lr=1e-12", "task.patience=2", "logger=csv", *SMALL)
    assert r.returncode == 0, r.stderr[-3000:]
    (run,) = runs(tmp_path, "finetune")
    m = json.loads((run / "metrics.json").read_text())
    assert m["epochs"] == 10 and m["epochs_run"] == 3 and m["patience"] == 2 and len(m["epoch_seconds"]) == 3
    assert m["selected_by"] == "val/score"  # what "better" means for best.ckpt and for patience
    assert m["warmup_ratio"] == 0.1  # the task's default (conf/task/mrpc.yaml, else the schema's)
    assert "stopping after 2 without a better dev score" in (run / "tdlight.log").read_text()
    assert (run / "model" / "model.safetensors").is_file()


def test_class_weights_balanced_are_computed_from_the_examples_trained_on_and_weight_the_loss(tmp_path, teacher_dir):
    """stage.class_weights=balanced: n / (classes × count) over the first 48 CoLA training labels (scikit-learn's
    formula, written out here), recorded in metrics.json and the log; unset, no weights are recorded."""
    from tdlight.data.glue import get_task, local_file, read_tsv

    r = cli(tmp_path, "stage=finetune", "task=cola", f"teacher.path={teacher_dir}", "stage.epochs=1",
            "stage.class_weights=balanced", "logger=csv", *SMALL)
    assert r.returncode == 0, r.stderr[-3000:]
    (run,) = runs(tmp_path, "finetune")
    labels = read_tsv("cola", "train", local_file(get_task("cola"), "train", GLUE))["label"][:48]
    counts = [labels.count(c) for c in (0, 1)]
    assert min(counts) > 0 and counts[0] != counts[1]  # CoLA leans to acceptable: the weights differ
    m = json.loads((run / "metrics.json").read_text())
    assert m["class_weights"] == pytest.approx([48 / (2 * c) for c in counts])
    assert "class weights [" in (run / "tdlight.log").read_text()
    r = cli(tmp_path / "plain", "stage=finetune", "task=cola", f"teacher.path={teacher_dir}", "stage.epochs=1",
            "logger=csv", *SMALL)
    assert r.returncode == 0, r.stderr[-3000:]
    (plain,) = runs(tmp_path / "plain", "finetune")
    assert json.loads((plain / "metrics.json").read_text())["class_weights"] is None


def test_weighted_training_loss_is_torchs_weighted_cross_entropy_and_equal_weights_change_nothing():
    """GlueModule's training loss with class weights: torch's weighted mean (each example's loss × its class's
    weight, over the summed weights); equal weights give the model's own loss; the dev loss stays unweighted."""
    import torch.nn.functional as F
    from transformers import BertForSequenceClassification

    from tdlight.data.glue import get_task
    from tdlight.stages.classifier import GlueModule, class_weights

    task = get_task("cola")
    torch.manual_seed(0)
    tiny_model = BertForSequenceClassification(tiny_config(num_labels=2))
    batch = {"input_ids": torch.randint(5, 90, (6, 10)), "attention_mask": torch.ones(6, 10, dtype=torch.long),
             "labels": torch.tensor([0, 1, 1, 1, 1, 0])}
    tiny_model.eval()  # no dropout: the same logits each call
    plain = GlueModule(tiny_model, task)
    logits = plain(batch)
    own = plain.training_step(batch, 0)
    assert float(own) == pytest.approx(float(F.cross_entropy(logits, batch["labels"])), rel=1e-5)
    equal = GlueModule(tiny_model, task, class_weights=torch.tensor([3.0, 3.0]))
    assert float(equal.training_step(batch, 0)) == pytest.approx(float(own), rel=1e-5)
    w = class_weights("balanced", task, batch["labels"].tolist())
    assert w.tolist() == pytest.approx([6 / 4, 6 / 8])
    per = F.cross_entropy(logits, batch["labels"], reduction="none")
    expected = (per * w[batch["labels"]]).sum() / w[batch["labels"]].sum()
    weighted = GlueModule(tiny_model, task, class_weights=w)
    assert float(weighted.training_step(batch, 0)) == pytest.approx(float(expected), rel=1e-5)
    assert float(weighted.training_step(batch, 0)) != pytest.approx(float(own), rel=1e-3)
    assert class_weights(None, task, []) is None and class_weights("none", task, []) is None
    assert class_weights([1, 2.5], task, []).tolist() == [1.0, 2.5]
    with pytest.raises(Exception, match=r"no \['1'\] example"):
        class_weights("balanced", task, [0, 0, 0])


def test_resume_without_checkpoint_is_an_error(tmp_path, teacher_dir):
    run = tmp_path / "finetune" / "x"
    (run / ".hydra").mkdir(parents=True)
    cfg = compose_cfg(tmp_path, "stage=finetune", "task=cola", f"teacher.path={teacher_dir}")
    (run / ".hydra" / "config.yaml").write_text(OmegaConf.to_yaml(cfg))
    r = cli(tmp_path, f"resume={run}")
    assert r.returncode == 2
    assert "has no checkpoint (checkpoints/last.ckpt)" in r.stderr
    assert sorted(p.name for p in run.rglob("*")) == [".hydra", "config.yaml"]  # untouched


def test_resume_of_a_decompose_run_says_to_rerun_it(tmp_path, teacher_dir):
    """A refined decomposition leaves a Lightning checkpoint, but the stage has no training state to
    continue: one error saying so (was: TypeError, an unexpected keyword argument 'extra_callbacks')."""
    run = tmp_path / "decompose" / "x"
    (run / ".hydra").mkdir(parents=True)
    (run / "checkpoints").mkdir()
    (run / "checkpoints" / "last.ckpt").write_bytes(b"refine")
    cfg = compose_cfg(tmp_path, "stage=decompose", f"teacher.path={teacher_dir}", "stage.refine_steps=2")
    (run / ".hydra" / "config.yaml").write_text(OmegaConf.to_yaml(cfg))
    r = cli(tmp_path, f"resume={run}")
    assert r.returncode == 2 and "keeps no training state" in r.stderr and "run the decompose command again" \
        in r.stderr, r.stderr[-2000:]
    assert "Traceback" not in r.stderr


@pytest.mark.parametrize("damage, message", [("truncate", "last.ckpt is corrupt"),
                                             ("garbage", "last.ckpt is corrupt"),
                                             ("zip", "is not a Lightning checkpoint of a tdlight run"),
                                             ("other-run", "was written by another run")])
def test_resume_from_a_bad_checkpoint_is_one_error_and_writes_nothing(tmp_path, teacher_dir, damage, message):
    """A damaged last.ckpt, a zip that is no checkpoint, or another run's last.ckpt copied in: one
    error, nothing written (was, for the last two: RuntimeError, exit 1, and a new csv/version_N)."""
    import zipfile

    over = ["stage=finetune", "task=mrpc", f"teacher.path={teacher_dir}", "stage.epochs=1", "logger=csv", *SMALL]
    r = cli(tmp_path, *over)
    assert r.returncode == 0, r.stderr[-2000:]
    (run,) = runs(tmp_path, "finetune")
    ckpt = run / "checkpoints" / "last.ckpt"
    data = ckpt.read_bytes()
    if damage == "zip":
        with zipfile.ZipFile(ckpt, "w") as z:
            z.writestr("notes.txt", "not a checkpoint")
    elif damage == "other-run":
        r = cli(tmp_path / "other", *over)
        assert r.returncode == 0, r.stderr[-2000:]
        (other,) = runs(tmp_path / "other", "finetune")
        ckpt.write_bytes((other / "checkpoints" / "last.ckpt").read_bytes())
    else:
        ckpt.write_bytes(data[: len(data) // 2] if damage == "truncate" else b"not a checkpoint" * 100)
    before = sorted(str(p) for p in tmp_path.rglob("*"))
    r = cli(tmp_path, f"resume={run}")
    assert r.returncode == 2, (r.returncode, r.stderr[-2000:])
    assert message in r.stderr and "Traceback" not in r.stderr, r.stderr[-2000:]
    # the hint leads somewhere: a new run, not the "no checkpoint" error that deleting the file gives
    assert "delete it" not in r.stderr and "start a new run" in r.stderr
    assert sorted(str(p) for p in tmp_path.rglob("*")) == before  # no csv/version_N, no stray run directory
    if damage == "other-run":  # the run's own checkpoint, back in place, resumes
        ckpt.write_bytes(data)
        r = cli(tmp_path, f"resume={run}")
        assert r.returncode == 0, r.stderr[-2000:]


class NotAWeight:  # a pickled object that torch.load(weights_only=True) refuses
    pass


def test_a_pickled_teacher_that_torch_refuses_is_one_error(tmp_path, teacher_dir):
    import collections
    import shutil

    import torch

    bad = tmp_path / "pickled"
    shutil.copytree(teacher_dir, bad)
    (bad / "model.safetensors").unlink()
    for i, payload in enumerate((NotAWeight(), collections.Counter(a=1))):  # refused by torch; not a tensor
        torch.save({"bert.embeddings.word_embeddings.weight": payload}, bad / "pytorch_model.bin")
        r = cli(tmp_path / "out", "stage=decompose", f"teacher.path={bad}")
        assert r.returncode == 2, (i, r.returncode, r.stderr[-2000:])
        assert str(bad) in r.stderr and "Traceback" not in r.stderr
    for stage in (["stage=decompose"], ["stage=finetune", "task=mrpc", *SMALL]):
        r = cli(tmp_path / "out", *stage, f"teacher.path={bad}")
        assert r.returncode == 2, (r.returncode, r.stderr[-2000:])
        assert str(bad) in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())  # no empty <stage>/ left


def test_misspelled_or_mistyped_stage_keys_are_rejected(tmp_path):
    for bad in ("stage.lrr=1", "stage.lr=fast", "trainer.max_epoch=3", "logger.mode=7x"):
        r = cli(tmp_path, "stage=finetune", "task=cola", bad)
        assert r.returncode == 2, (bad, r.stderr[-500:])
    assert not (tmp_path / "finetune").exists()


@pytest.mark.slow
def test_ddp_two_cpu_processes_match_single_process(tmp_path, teacher_dir):
    """trainer=ddp with 2 CPU processes (gloo): the same dev metrics as one process on the same data."""
    common = ["stage=evaluate", "task=mrpc", f"teacher.path={teacher_dir}", "stage.limit_eval=64",
              "stage.max_length=32", "trainer=ddp", "trainer.accelerator=cpu", "logger=csv",
              "trainer.enable_progress_bar=false"]
    scores = {}
    for devices in (2, 1):
        out = tmp_path / f"d{devices}"
        r = cli(out, *common, f"trainer.devices={devices}")
        assert r.returncode == 0, r.stderr[-3000:]
        (run,) = runs(out, "evaluate")
        scores[devices] = json.loads((run / "metrics.json").read_text())
    assert scores[2]["examples"] == scores[1]["examples"] == 64
    assert scores[2]["dev"] == pytest.approx(scores[1]["dev"], abs=1e-7)

    # training under DDP runs end to end and leaves a loadable model
    r = cli(tmp_path / "ft", "stage=finetune", "task=mrpc", f"teacher.path={teacher_dir}", "stage.epochs=1",
            *SMALL, "trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2")
    assert r.returncode == 0, r.stderr[-3000:]
    (run,) = runs(tmp_path / "ft", "finetune")
    m = json.loads((run / "metrics.json").read_text())
    assert m["global_step"] == 2  # 48 examples / (16 per batch × 2 processes), rounded up
    assert (run / "model" / "model.safetensors").is_file()


@pytest.mark.parametrize("n, batch, epochs, max_steps, accum, limit",
                         [(50, 8, 3, -1, 1, None), (50, 8, 3, 10, 1, None), (64, 8, 2, -1, 3, None),
                          (50, 8, 2, -1, 1, 4), (50, 8, 2, -1, 1, 0.5), (7, 8, 1, -1, 1, None)])
def test_training_steps_matches_lightning_estimate(n, batch, epochs, max_steps, accum, limit):
    """The LR schedule length, computed without building the train loader early (see training_steps)."""
    from torch.utils.data import DataLoader, TensorDataset

    from tdlight.stages.classifier import training_steps

    seen = {}

    class Probe(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Linear(2, 1)

        def training_step(self, b, i):
            return self.w(b[0]).sum()

        def configure_optimizers(self):
            seen["lightning"] = self.trainer.estimated_stepping_batches
            seen["ours"] = training_steps(self.trainer, n, batch)
            return torch.optim.SGD(self.parameters(), lr=0.1)

    kw = {"limit_train_batches": limit} if limit is not None else {}
    trainer = L.Trainer(max_epochs=epochs, max_steps=max_steps, accumulate_grad_batches=accum, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, **kw)
    trainer.fit(Probe(), DataLoader(TensorDataset(torch.randn(n, 2)), batch_size=batch))
    assert seen["ours"] == seen["lightning"]


def test_a_presets_settings_for_one_task_apply_to_that_pair_only_and_give_way_to_the_command_line(tmp_path):
    """conf/experiment_task/<experiment>_<task>.yaml: cpu_48 on MRPC and cpu_7 on CoLA distil on two augmented copies
    (docs/RESULTS.md §12h, §12i); the same presets on other tasks, and other presets on those tasks, do not; a
    command-line key wins; ~experiment_task gives the preset as it is."""
    def augment(*o):
        d = compose_cfg(tmp_path, *o).stage.distill
        return d.augment, d.augment_copies

    assert augment("experiment=cpu_48", "task=mrpc") == augment("experiment=cpu_7", "task=cola") == (True, 2)
    for other in (("experiment=cpu_48", "task=sst2"), ("experiment=cpu_7", "task=mrpc"), ("experiment=cpu_48", "task=cola"),
                  ("experiment=quickstart", "task=cola"), ("stage=pipeline", "task=cola"),
                  ("experiment=cpu_7", "task=cola", "~experiment_task")):
        assert augment(*other) == (False, 4), other
    assert augment("experiment=cpu_7", "task=cola", "stage.distill.augment_copies=3") == (True, 3)
    assert augment("experiment=cpu_48", "task=mrpc", "stage.distill.augment=false")[0] is False


def test_every_per_task_preset_file_names_a_preset_and_a_task():
    """The group is optional, so a misspelt file would never apply, silently: each name splits into exactly one
    existing experiment and task."""
    conf = Path(__file__).resolve().parents[1] / "conf"
    experiments = {p.stem for p in (conf / "experiment").glob("*.yaml")}
    tasks = {p.stem for p in (conf / "task").glob("*.yaml")}
    files = sorted((conf / "experiment_task").glob("*.yaml"))
    assert files
    for f in files:
        splits = [(f.stem[:i], f.stem[i + 1:]) for i in range(len(f.stem)) if f.stem[i] == "_"]
        assert len([s for s in splits if s[0] in experiments and s[1] in tasks]) == 1, f.name


@pytest.mark.parametrize("name", ["paper_1_7", "paper_1_48", "no_pretrain", "no_distill", "variant_iii", "quickstart",
                                  "cpu_7", "cpu_48"])
def test_experiment_presets_compose_and_resolve(tmp_path, name):
    from tdlight.config import compression_spec
    from tdlight.tensor.accounting import param_counts
    from tdlight.tensor.spec import EncoderShape, resolve

    cfg = compose_cfg(tmp_path, f"experiment={name}", "task=mrpc", "stage.distill.temperature=2")
    assert cfg.stage.name == "pipeline" and cfg.stage.distill.temperature == 2  # presets stay overridable
    minilm = EncoderShape(6, 384, 1536, 30522, 512, 2)
    ratio = param_counts(minilm, resolve(compression_spec(cfg.compression), minilm))["ratio"]
    expected = {"paper_1_7": (5, 9), "paper_1_48": (48, 60), "no_pretrain": (48, 60), "no_distill": (48, 60),
                "variant_iii": (7, 9), "quickstart": (5, 9), "cpu_7": (5, 9), "cpu_48": (48, 60)}[name]
    assert expected[0] <= ratio < expected[1], ratio
    assert ("pretrain" in cfg.stage.steps) == (name not in ("no_pretrain", "quickstart"))
    if name in ("quickstart", "cpu_7", "cpu_48"):  # the recipes that fit a CPU hour
        assert cfg.stage.distill.head == "student"
    if name in ("quickstart", "cpu_7", "cpu_48", "paper_1_7", "paper_1_48"):  # no dead block (RESULTS §7a/§7b)
        assert cfg.stage.decompose.fit == "outputs"
    if name in ("cpu_7", "cpu_48"):  # 200 reconstruction steps: STS-B 0.17 -> 0.75 at 1/7 (docs/RESULTS.md §5b′)
        assert cfg.stage.pretrain.max_steps == 200 and cfg.stage.distill.select_by == "balanced_accuracy"
        # one intermediate epoch on the task's pairs at 1/7 (MRPC past 90% of its teacher, RESULTS §12b)
        assert cfg.stage.distill.intermediate_epochs == (1 if name == "cpu_7" else 0)
    if name == "cpu_7":  # measured better on SST-2 and STS-B (docs/RESULTS.md §7c)
        assert cfg.stage.decompose.teacher_weights == "finetuned" and cfg.stage.decompose.calibration_files == "task"
    if name == "no_distill":
        assert cfg.stage.distill.gold_weight == 1.0 and cfg.stage.distill.intermediate_epochs == 0


@pytest.mark.parametrize("overrides, message", [
    (["stage=finetune", "stage.lr=-1"], "stage.lr=-1.0; valid: > 0"),
    (["stage=finetune", "stage.epochs=0"], "stage.epochs=0;"),
    (["stage=distill", "stage.temperature=0"], "stage.temperature=0.0;"),
    (["stage=distill", "stage.gold_weight=1.5"], "stage.gold_weight=1.5; valid: in [0, 1]"),
    (["stage=pipeline", "stage.distill.lr=-1.0"], "stage.distill.lr=-1.0;"),
    (["stage=finetune", "trainer.accumulate_grad_batches=0"], "trainer.accumulate_grad_batches=0;"),
    (["stage=finetune", "stage.warmup_ratio=1"], "stage.warmup_ratio=1.0; valid: in [0, 1)"),
    (["stage=finetune", "stage.patience=0"], "stage.patience=0; valid: an integer ≥ 1"),
    (["stage=finetune", "task.patience=0"], "task.patience=0; valid: an integer ≥ 1"),
    (["stage=distill", "stage.select_by=f1"], "stage.select_by='f1'; valid: score, balanced_accuracy"),
])
def test_out_of_range_hyperparameters_exit_2_before_any_work(tmp_path, teacher_dir, overrides, message):
    small = SMALL if "stage=pipeline" not in overrides else ["trainer=cpu"]
    r = cli(tmp_path, *overrides, "task=mrpc", f"teacher.path={teacher_dir}", "logger=none", *small)
    assert r.returncode == 2, (r.returncode, r.stderr[-2000:])
    assert message in r.stderr and "Traceback" not in r.stderr
    assert not [p for p in tmp_path.rglob("*") if p.is_file()]  # no run directory, no checkpoint


def test_a_diverging_run_stops_with_one_error(tmp_path, teacher_dir):
    """A huge (but positive) learning rate: the loss explodes; the run says so instead of scoring."""
    r = cli(tmp_path, "stage=finetune", "task=mrpc", f"teacher.path={teacher_dir}", "stage.lr=1e4", "stage.epochs=2",
            "trainer.gradient_clip_val=null", "logger=none", *SMALL)
    assert r.returncode == 2, (r.returncode, r.stderr[-2000:])
    assert "training diverged" in r.stderr and "Traceback" not in r.stderr
    (run,) = runs(tmp_path, "finetune")
    assert not (run / "metrics.json").exists()


def test_non_finite_weights_are_an_error_not_a_score(tmp_path, teacher_dir):
    import shutil

    import safetensors.torch

    bad = tmp_path / "nan-model"
    shutil.copytree(teacher_dir, bad)
    weights = safetensors.torch.load_file(bad / "model.safetensors")
    name = sorted(k for k in weights if k.endswith("attention.self.query.weight"))[0]
    weights[name][0, 0] = float("nan")
    safetensors.torch.save_file(weights, bad / "model.safetensors", metadata={"format": "pt"})
    r = cli(tmp_path, "stage=evaluate", "task=mrpc", f"stage.model={bad}", "stage.limit_eval=32",
            "stage.max_length=32", "trainer=cpu", "logger=none")
    assert r.returncode == 2, (r.returncode, r.stderr[-2000:])
    assert "not finite" in r.stderr and name.split(".", 1)[1] in r.stderr and "Traceback" not in r.stderr


def test_ctrl_c_exits_130_with_the_resume_line_also_when_started_in_the_background(tmp_path, teacher_dir):
    """SIGINT to a fine-tune started with SIGINT ignored (as `cmd &` in a script starts it): it stops,
    exit 130, and prints the command that continues it — which does (was: Ctrl-C ignored in the
    background; in the foreground exit 1 and no hint)."""
    import signal
    import subprocess
    import sys
    import time

    cmd = [sys.executable, "-m", "tdlight.cli", f"paths.output_dir={tmp_path}", "stage=finetune", "task=mrpc",
           f"teacher.path={teacher_dir}", "stage.epochs=400", "logger=csv", "trainer.checkpoint_every_n_steps=1",
           "task.patience=null", *SMALL]  # (no early stop: it must still be training when the signal comes)
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
    deadline = time.monotonic() + 300
    while not list(tmp_path.glob("finetune/*/checkpoints/last.ckpt")) and p.poll() is None:
        assert time.monotonic() < deadline, "no checkpoint within 300 s"
        time.sleep(0.5)
    p.send_signal(signal.SIGINT)
    out, err = p.communicate(timeout=120)
    assert p.returncode == 130, (p.returncode, err[-3000:])
    (run,) = runs(tmp_path, "finetune")
    assert f"tdlight resume={run}" in err and "Traceback" not in err, err[-3000:]
    assert not (run / "model").exists()
    # the checkpoint it left continues the run; resumed from another directory, which stays empty
    # (was: an empty outputs/ left there, where Hydra made the fresh run directory that a resume drops)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    done = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True, mmap=True)["epoch"]
    # fewer epochs than the checkpoint has done: one error (was Lightning's MisconfigurationException)
    r = tdlight(f"resume={run}", f"stage.epochs={max(done - 1, 0)}", cwd=elsewhere)  # (in this process)
    if done >= 2:  # (stage.epochs must be ≥ 1)
        assert r.returncode == 2 and f"its checkpoint is past epoch {done}" in r.stderr, r.stderr[-3000:]
    r = tdlight(f"resume={run}", f"stage.epochs={done + 1}", cwd=elsewhere)
    assert r.returncode == 0, r.stderr[-3000:]
    assert (run / "model").is_dir() and list(elsewhere.iterdir()) == []


@pytest.mark.parametrize("output_dir, message", [
    ("{tmp}/a_file/out", "is a file, not a directory"),
    ("${{x}}/out", "paths.output_dir='${{x}}/out' cannot be resolved"),
    ("{tmp}/read_only/out", "Permission denied"),
])
def test_an_output_dir_that_cannot_be_made_is_one_error(tmp_path, teacher_dir, output_dir, message):
    """Was: NotADirectoryError / InterpolationKeyError / PermissionError tracebacks from Hydra."""
    import os

    (tmp_path / "a_file").write_text("x")
    (tmp_path / "read_only").mkdir(mode=0o555)
    if "read_only" in output_dir and os.access(tmp_path / "read_only", os.W_OK):
        pytest.skip("running as root: a mode-0555 directory is writable")
    before = sorted(str(p) for p in tmp_path.rglob("*"))
    r = cli(output_dir.format(tmp=tmp_path), f"teacher.path={teacher_dir}")
    assert r.returncode == 2, (r.returncode, r.stderr[-2000:])
    assert message.format() in r.stderr and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert r.stderr.strip().splitlines()[-1].startswith("tdlight: error:")
    assert sorted(str(p) for p in tmp_path.rglob("*")) == before


def test_a_failed_command_removes_the_output_root_it_created(tmp_path, teacher_dir):
    """Exit 2 in a fresh paths.output_dir: every folder the command made goes, the ones before stay."""
    r = cli(tmp_path / "new" / "root", f"teacher.path={teacher_dir}", "compression.rank=100000")
    assert r.returncode == 2, r.stderr[-2000:]
    assert list(tmp_path.iterdir()) == []
