"""stage=distill: teacher -> compressed student through run directories; frozen teacher; resume."""

from __future__ import annotations

import json

import lightning as L
import pytest
import torch

from tests.conftest import crash_at
from tests.conftest import SMALL, cli, compose_cfg, runs


@pytest.fixture(scope="module")
def chain(tmp_path_factory, teacher_dir):
    """A fine-tuned tiny teacher and its decomposition, as run directories."""
    out = tmp_path_factory.mktemp("chain")
    r = cli(out, "stage=finetune", "task=mrpc", f"teacher.path={teacher_dir}", "stage.epochs=1", "logger=none",
            *SMALL)
    assert r.returncode == 0, r.stderr[-3000:]
    (ft,) = runs(out, "finetune")
    r = cli(out, "stage=decompose", f"teacher.run_dir={ft}", "compression.rank=8", "compression.bank=12")
    assert r.returncode == 0, r.stderr[-3000:]
    (dec,) = runs(out, "decompose")
    return out, ft, dec


def _column(csv: str, name: str) -> list[str]:
    """The non-empty values of column ``name`` of a CSV logger's metrics.csv."""
    import csv as csvlib

    return [row[name] for row in csvlib.DictReader(csv.splitlines()) if row.get(name)]


def test_distill_end_to_end(chain):
    out, ft, dec = chain
    r = cli(out, "stage=distill", "task=mrpc", f"teacher.run_dir={ft}", f"stage.student={dec}",
            "stage.intermediate_epochs=1", "stage.prediction_epochs=2", "stage.temperature=2", "logger=csv", *SMALL)
    assert r.returncode == 0, r.stderr[-3000:]
    (run,) = runs(out, "distill")
    m = json.loads((run / "metrics.json").read_text())
    assert m["global_step"] == 9 and m["ratio"] > 1 and m["pairs"] == [[1, 1], [2, 2]]
    (csv,) = [p.read_text() for p in (run / "csv").glob("version_*/metrics.csv")]
    header = csv.splitlines()[0]
    for key in ("train/hidden_loss_step", "train/attention_loss_step", "train/prediction_loss_step",
                "val/phase1_score", "val/score"):
        assert key in header, key
    # the logged learning rate is the real one (was: AdamW built at lr 1.0, the schedule's factor the rate):
    # phase 1 at the stage's lr (3e-5 unless set; not the task's, the teacher's), phase 2 likewise, warm-up
    # from 0, never above it
    lrs = [float(v) for v in _column(csv, "lr-AdamW/pg1")]
    lr = compose_cfg(out, "task=mrpc", "stage=distill").stage.lr
    assert lr == 3e-5 != compose_cfg(out, "task=mrpc").task.lr
    assert lrs and max(lrs) == pytest.approx(lr) and min(lrs) >= 0, lrs
    import tdlight

    student = tdlight.load_compressed(run / "model")
    assert type(student).__name__ == "TdlightBertForSequenceClassification" and student.bert.encoder.compression.rank_in == 8
    r = cli(out, "stage=evaluate", "task=mrpc", f"stage.model={run}", "stage.limit_eval=32", "stage.max_length=32",
            "trainer=cpu", "logger=none")
    assert r.returncode == 0, r.stderr[-3000:]
    ev = json.loads((sorted(runs(out, "evaluate"))[-1] / "metrics.json").read_text())
    assert ev["score"] == pytest.approx(m["score"], abs=1e-6)


def test_teacher_frozen_student_trains(chain, tmp_path):
    from tdlight.stages import distill

    out, ft, dec = chain
    seen = {}

    class Probe(L.Callback):
        def on_after_backward(self, trainer, module):
            seen["teacher_grads"] = [p.grad for p in module.teacher.parameters() if p.grad is not None]
            seen["teacher_training"] = module.teacher.training
            seen["optimized"] = {id(p) for g in trainer.optimizers[0].param_groups for p in g["params"]}
            seen["teacher_ids"] = {id(p) for p in module.teacher.parameters()}
            seen["emb_ids"] = {id(p) for p in module.model.base_model.embeddings.parameters()}
            seen["factor_grad"] = module.model.bert.encoder.factor_banks["encoder"].core.grad.abs().sum().item()

    cfg = compose_cfg(tmp_path, "stage=distill", "task=mrpc", f"teacher.run_dir={ft}", f"stage.student={dec}",
                      "stage.intermediate_epochs=1", "stage.prediction_epochs=0", "logger=none", *SMALL)
    distill.run(cfg, tmp_path / "run", extra_callbacks=[Probe()])
    assert seen["teacher_grads"] == [] and seen["teacher_training"] is False
    assert not (seen["optimized"] & seen["teacher_ids"])
    assert not (seen["optimized"] & seen["emb_ids"])  # embeddings frozen by default
    assert seen["factor_grad"] > 0


@pytest.mark.parametrize("gold_weight", [0.0, 0.5, 1.0])
def test_prediction_phase_losses_follow_the_gold_weight(chain, tmp_path, gold_weight):
    """Soft targets weigh 1 - gold_weight, gold labels gold_weight; at 1 the teacher is never run."""
    from tdlight.stages import distill

    out, ft, dec = chain
    seen = {"teacher_calls": 0, "parts": set()}

    class Probe(L.Callback):
        def on_train_start(self, trainer, module):
            module.teacher.register_forward_hook(lambda *a: seen.__setitem__("teacher_calls", seen["teacher_calls"] + 1))

        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
            seen["parts"] |= {k.split("/")[1] for k in trainer.callback_metrics if k.endswith("_loss_step")}

    cfg = compose_cfg(tmp_path, "stage=distill", "task=mrpc", f"teacher.run_dir={ft}", f"stage.student={dec}",
                      "stage.intermediate_epochs=0", "stage.prediction_epochs=1", f"stage.gold_weight={gold_weight}",
                      "logger=none", *SMALL)
    distill.run(cfg, tmp_path / "run", extra_callbacks=[Probe()])
    expected = {0.0: {"prediction_loss_step"}, 0.5: {"prediction_loss_step", "gold_loss_step"},
                1.0: {"gold_loss_step"}}[gold_weight]
    assert seen["parts"] == expected
    assert seen["teacher_calls"] == 0  # soft targets come from the cache computed before training


def test_cached_teacher_logits_are_the_teachers_and_replace_its_forward(chain, tmp_path):
    """The cached column equals a fresh teacher forward on every example; phase 2 reads it."""
    from tdlight.model.teacher import load_classifier
    from tdlight.stages import distill
    from tdlight.stages.classifier import MODEL_INPUTS

    out, ft, dec = chain
    cfg = compose_cfg(tmp_path, "stage=distill", "task=mrpc", f"teacher.run_dir={ft}", f"stage.student={dec}",
                      "stage.intermediate_epochs=0", "stage.prediction_epochs=2", "logger=none", *SMALL)
    seen = {}

    class Probe(L.Callback):
        def on_train_batch_start(self, trainer, module, batch, batch_idx):
            seen.setdefault("batches", []).append({k: v.clone() for k, v in batch.items()})

    distill.run(cfg, tmp_path / "run", extra_callbacks=[Probe()])
    teacher, _ = load_classifier(str(ft / "model"), 2)
    teacher.eval()
    assert len(seen["batches"]) == 6  # 2 epochs x 3 batches (SMALL: 48 examples, batch 16)
    with torch.no_grad():
        for batch in seen["batches"]:
            fresh = teacher(**{k: batch[k] for k in MODEL_INPUTS if k in batch}).logits
            torch.testing.assert_close(batch[distill.TEACHER_LOGITS], fresh, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("head", ["teacher", "student"])
def test_student_head_starts_from_the_teacher_or_its_own(chain, tmp_path, teacher_dir, head):
    """Phase 1 never touches the head, so after it the saved student's head is still where it started."""
    from tdlight.model.io import load_compressed
    from tdlight.model.teacher import head_state, load_classifier
    from tdlight.stages import distill

    out, ft, _ = chain
    # as in the pipeline: the student is the *pretrained* teacher decomposed (its head is not the task's)
    r = cli(tmp_path, "stage=decompose", f"teacher.path={teacher_dir}", "compression.rank=8", "compression.bank=12")
    assert r.returncode == 0, r.stderr[-3000:]
    (dec,) = runs(tmp_path, "decompose")
    cfg = compose_cfg(tmp_path, "stage=distill", "task=mrpc", f"teacher.run_dir={ft}", f"stage.student={dec}",
                      f"stage.head={head}", "stage.intermediate_epochs=1", "stage.prediction_epochs=0",
                      "logger=none", *SMALL)
    m = distill.run(cfg, tmp_path / "run")
    assert m["head"] == head
    teacher = head_state(load_classifier(str(ft / "model"), 2)[0])
    student = head_state(load_compressed(tmp_path / "run" / "model"))
    assert teacher.keys() == student.keys() and "classifier.weight" in teacher
    same = [torch.equal(teacher[k], student[k]) for k in teacher]
    assert all(same) if head == "teacher" else not any(same)


@pytest.mark.parametrize("head_epochs", [0, 1])
def test_head_epochs_train_the_head_alone_on_the_frozen_student(chain, tmp_path, head_epochs):
    """stage.head_epochs=1 of 1 prediction epoch is linear probing: the saved student's body (encoder and the
    compressed embedding table it would train) is the input student's, bit for bit, and its head moved;
    without head epochs the body moves too. Phase 1 (the intermediate epoch) trains the body either way."""
    from tdlight.model.teacher import body_parameters, head_state, load_classifier
    from tdlight.stages import distill

    out, ft, dec = chain
    cfg = compose_cfg(tmp_path, "stage=distill", "task=mrpc", f"teacher.run_dir={ft}", f"stage.student={dec}",
                      "stage.intermediate_epochs=0", "stage.prediction_epochs=1", f"stage.head_epochs={head_epochs}",
                      "stage.lr=1e-3", "logger=none", *SMALL)
    m = distill.run(cfg, tmp_path / "run")
    assert m["head_epochs"] == head_epochs
    before, _ = load_classifier(str(dec / "model"), 2)
    after, _ = load_classifier(str(tmp_path / "run" / "model"), 2)
    body = [torch.equal(a, b) for a, b in zip(body_parameters(before), body_parameters(after), strict=True)]
    assert all(body) if head_epochs else not all(body)
    head = head_state(after)
    assert not torch.equal(head["classifier.weight"], head_state(before)["classifier.weight"])


def test_head_lr_is_the_task_heads_own_rate(chain, tmp_path):
    """stage.head_lr gives the task head its own rate: with the body's rate near zero, the head moves by
    orders of magnitude more at head_lr=1e-2 than without it (the body's rate for all), and the body
    moves as little either way; the optimizer keeps its two groups when head_lr is null (checkpoints
    written before it resume)."""
    from tdlight.model.teacher import body_parameters, head_state, load_classifier
    from tdlight.stages import distill
    from tdlight.stages.trainer import adamw

    out, ft, dec = chain
    before, _ = load_classifier(str(dec / "model"), 2)
    moved = {}
    for head_lr in (None, 1e-2):
        run = tmp_path / f"run-{head_lr}"
        cfg = compose_cfg(tmp_path, "stage=distill", "task=mrpc", f"teacher.run_dir={ft}", f"stage.student={dec}",
                          "stage.intermediate_epochs=0", "stage.prediction_epochs=1", "stage.lr=1e-9",
                          f"stage.head_lr={'null' if head_lr is None else head_lr}", "logger=none", *SMALL)
        m = distill.run(cfg, run)
        assert m["head_lr"] == head_lr
        after, _ = load_classifier(str(run / "model"), 2)
        head = (head_state(after)["classifier.weight"] - head_state(before)["classifier.weight"]).abs().max().item()
        body = max((a - b).abs().max().item() for a, b in zip(body_parameters(after), body_parameters(before)))
        moved[head_lr] = head, body
    assert moved[1e-2][0] > 1e3 * moved[None][0], moved
    assert moved[1e-2][1] < 1e-5 and moved[None][1] < 1e-5, moved
    assert len(adamw(before, 1e-3, 0.01).param_groups) == 2
    groups = adamw(before, 1e-3, 0.01, head_lr=1e-2).param_groups
    assert sorted(g["lr"] for g in groups) == [1e-3, 1e-3, 1e-2, 1e-2]
    head_ids = {id(p) for g in groups if g["lr"] == 1e-2 for p in g["params"]}
    assert head_ids == {id(p) for n, p in before.named_parameters() if n in head_state(before)}


def test_distill_resume_equals_uninterrupted(chain, tmp_path):
    from tdlight.stages import distill

    out, ft, dec = chain
    over = ["stage=distill", "task=mrpc", f"teacher.run_dir={ft}", f"stage.student={dec}", "logger=none",
            "stage.intermediate_epochs=1", "stage.prediction_epochs=1", "trainer.checkpoint_every_n_steps=1", *SMALL]
    distill.run(compose_cfg(tmp_path, *over), tmp_path / "straight")

    with pytest.raises(RuntimeError, match="simulated crash"):
        distill.run(compose_cfg(tmp_path, *over), tmp_path / "resumed", extra_callbacks=[crash_at(4)])
    cfg = compose_cfg(tmp_path, *over)
    cfg.resume = str(tmp_path / "resumed")
    distill.run(cfg, tmp_path / "resumed")
    a = torch.load(tmp_path / "straight" / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    b = torch.load(tmp_path / "resumed" / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    assert a.keys() == b.keys()
    for k in a:
        assert (a[k] - b[k]).abs().max() <= 1e-6, k


def test_distill_seed_is_the_students_own(chain, tmp_path):
    """stage.seed draws the student's training alone: unset it is the run's seed (the same weights as
    seed=<run's seed>), another value trains another student from the same teacher and decomposition,
    and the metrics say which seed trained it."""
    from tdlight.stages import distill

    out, ft, dec = chain
    over = ["stage=distill", "task=mrpc", f"teacher.run_dir={ft}", f"stage.student={dec}", "logger=none",
            "stage.intermediate_epochs=0", "stage.prediction_epochs=1", "seed=3", *SMALL]
    weights = {}
    for name, extra in (("run", []), ("same", ["stage.seed=3"]), ("other", ["stage.seed=4"])):
        res = distill.run(compose_cfg(tmp_path, *over, *extra), tmp_path / name)
        assert res["seed"] == (4 if name == "other" else 3)
        weights[name] = torch.load(tmp_path / name / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    changed = lambda a, b: any(not torch.equal(weights[a][k], weights[b][k]) for k in weights[a])  # noqa: E731
    assert not changed("run", "same") and changed("run", "other")
    r = cli(tmp_path, "stage=distill", "task=mrpc", f"teacher.run_dir={ft}", f"stage.student={dec}", "logger=none",
            "stage.seed=-1", *SMALL)
    assert r.returncode == 2 and "stage.seed=-1" in r.stderr and "an integer ≥ 0" in r.stderr, r.stderr[-2000:]


@pytest.mark.parametrize("extra, message", [
    ([], "needs a student"),
    (["stage.student=/no/such"], "neither a decompose/cut/pretrain/distill run directory"),
    (["stage.student=DEC", "stage.layer_map=[[3,1]]"], "out of range: student layers are 0..2"),
    (["stage.student=DEC", "stage.layer_map=every"], "unknown layer map 'every'"),
    (["stage.student=DEC", "stage.intermediate_epochs=0", "stage.prediction_epochs=0"], "must be ≥ 1"),
    (["stage.student=DEC", "stage.augment=true", "stage.gold_weight=0.5"], "use stage.gold_weight=0"),
    (["stage.student=DEC", "stage.head=random"], "stage.head"),
    # the tiny teacher is a sequence classifier: no masked-LM head to predict replacements with
    (["stage.student=DEC", "stage.augment=true", "stage.augment_method=mlm"], "has no masked-LM head"),
    (["stage.student=DEC", "stage.extra_text=[test]", "stage.gold_weight=0.5"], "adds examples without gold labels"),
    (["stage.student=DEC", "stage.extra_text=[validation]"], "stage.extra_text entry 'validation': mrpc's dev split"),
    (["stage.student=DEC", "stage.extra_text=[sst2:test]"], "sst2 has 1 text column(s), mrpc has 2"),
    (["stage.student=DEC", "stage.extra_text=[mnli:train]"], "no local file for mnli train"),
    (["stage.student=DEC", "stage.extra_limit=0"], "stage.extra_limit=0"),
    (["stage.student=DEC", "stage.head_epochs=2", "stage.prediction_epochs=1"], "valid: 0..1"),
    (["stage.student=DEC", "stage.head_lr=0"], "stage.head_lr"),
])
def test_distill_bad_input(chain, tmp_path, extra, message):
    out, ft, dec = chain
    extra = [e.replace("DEC", str(dec)) for e in extra]
    r = cli(tmp_path, "stage=distill", "task=mrpc", f"teacher.run_dir={ft}", "logger=none", *SMALL, *extra)
    assert r.returncode == 2, r.stderr[-2000:]
    assert message in r.stderr
    assert not (tmp_path / "distill").exists() or not any((tmp_path / "distill").iterdir())


def test_distill_with_augmentation(chain, tmp_path):
    out, ft, dec = chain
    r = cli(tmp_path, "stage=distill", "task=mrpc", f"teacher.run_dir={ft}", f"stage.student={dec}", "logger=none",
            "stage.intermediate_epochs=0", "stage.prediction_epochs=1", "stage.augment=true", "stage.augment_copies=2",
            *SMALL)
    assert r.returncode == 0, r.stderr[-3000:]
    (run,) = runs(tmp_path, "distill")
    m = json.loads((run / "metrics.json").read_text())
    assert m["global_step"] == 9  # 48 examples + 2 x 48 augmented, batches of 16


def test_distill_with_extra_text_scored_by_the_teacher(chain, tmp_path):
    # MRPC's unlabelled test pairs and RTE's join the 48 training examples: the teacher's soft targets on all
    out, ft, dec = chain
    r = cli(tmp_path, "stage=distill", "task=mrpc", f"teacher.run_dir={ft}", f"stage.student={dec}", "logger=none",
            "stage.intermediate_epochs=1", "stage.prediction_epochs=1", "stage.extra_text=[test,rte:test]",
            "stage.extra_limit=40", *SMALL)
    assert r.returncode == 0, r.stderr[-3000:]
    (run,) = runs(tmp_path, "distill")
    m = json.loads((run / "metrics.json").read_text())
    assert m["train_examples"] == 128 and m["extra_examples"] == 80 and m["extra_text"] == ["test", "rte:test"]
    assert m["global_step"] == 16  # 2 epochs of (48 + 2 x 40) / 16 batches


def test_distill_with_masked_lm_augmentation(chain, tmp_path, teacher_dir):
    from transformers import AutoTokenizer, BertForMaskedLM

    from tests.conftest import tiny_config

    out, ft, dec = chain
    mlm = tmp_path / "mlm"
    BertForMaskedLM(tiny_config()).save_pretrained(mlm)
    AutoTokenizer.from_pretrained(teacher_dir).save_pretrained(mlm)
    r = cli(tmp_path, "stage=distill", "task=mrpc", f"teacher.run_dir={ft}", f"stage.student={dec}", "logger=none",
            "stage.intermediate_epochs=0", "stage.prediction_epochs=1", "stage.augment=true", "stage.augment_copies=1",
            "stage.augment_method=mlm", f"stage.augment_mlm={mlm}", *SMALL)
    assert r.returncode == 0, r.stderr[-3000:]
    (run,) = runs(tmp_path, "distill")
    assert json.loads((run / "metrics.json").read_text())["global_step"] == 6  # 48 + 48 augmented, batches of 16


def test_select_by_balanced_accuracy_keeps_the_epoch_of_the_best_mean_class_recall(chain, tmp_path):
    # best.ckpt watches val/balanced_accuracy (phase 1 logs it as -inf, as it does the score): the student
    # saved is the phase-2 epoch with the highest balanced accuracy, whatever its GLUE score
    out, ft, dec = chain
    r = cli(tmp_path, "stage=distill", "task=mrpc", f"teacher.run_dir={ft}", f"stage.student={dec}",
            "stage.intermediate_epochs=1", "stage.prediction_epochs=3", "stage.lr=1e-3",
            "stage.select_by=balanced_accuracy", "logger=csv", *SMALL)
    assert r.returncode == 0, r.stderr[-3000:]
    (run,) = runs(tmp_path, "distill")
    m = json.loads((run / "metrics.json").read_text())
    assert m["selected_by"] == "val/balanced_accuracy"
    (csv,) = [p.read_text() for p in (run / "csv").glob("version_*/metrics.csv")]
    logged = [float(v) for v in _column(csv, "val/balanced_accuracy")]
    # one value per epoch plus the final validation of the kept weights; phase 1's is -inf
    assert logged[0] == float("-inf") and len(logged) == 5, logged
    assert m["dev"]["balanced_accuracy"] == pytest.approx(max(logged[1:4]), abs=1e-6)
    assert logged[-1] == pytest.approx(max(logged[1:4]), abs=1e-6)


def test_monitor_is_the_score_for_a_regression_task():
    from tdlight.data.glue import get_task
    from tdlight.stages.classifier import monitor
    from tdlight.stages.schemas import SelectBy

    assert monitor(get_task("mrpc"), SelectBy.balanced_accuracy) == "val/balanced_accuracy"
    assert monitor(get_task("mrpc"), SelectBy.score) == "val/score"
    assert monitor(get_task("stsb"), SelectBy.balanced_accuracy) == "val/score"  # no classes to recall
