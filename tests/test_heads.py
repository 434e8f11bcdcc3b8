"""What the classifier reads (teacher.pooling) and what a score hides (constant predictors)."""

from __future__ import annotations

import json

import pytest
import torch

from tdlight.data.metrics import prediction_stats
from tdlight.errors import TeacherError
from tdlight.model.pooling import MeanPooler, native_pooling, pooling_of, resolve_pooling, set_pooling
from tests.conftest import tiny_config
from tests.conftest import SMALL, cli, runs


def _classifier(**kw):
    from transformers import BertForSequenceClassification

    torch.manual_seed(0)
    return BertForSequenceClassification(tiny_config(num_labels=2, **kw)).eval()


def test_mean_pooling_reads_the_masked_mean_of_real_tokens(token_ids):
    model = set_pooling(_classifier(), "mean")
    assert pooling_of(model) == "mean" and isinstance(model.bert.pooler, MeanPooler)
    assert model.config.tdlight_pooling == "mean"
    logits = model(**token_ids).logits
    h = model.bert(**token_ids).last_hidden_state
    w = token_ids["attention_mask"][..., None].float()
    expected = model.classifier((h * w).sum(1) / w.sum(1))
    assert torch.allclose(logits, expected, atol=1e-6)
    # padding does not move the result: example 1 alone, cut to its real tokens
    alone = model(input_ids=token_ids["input_ids"][1:2, :8]).logits
    assert torch.allclose(alone, logits[1:2], atol=1e-5)
    # positional calls get the mask too
    assert torch.allclose(model(token_ids["input_ids"], token_ids["attention_mask"]).logits, logits, atol=1e-6)


def test_cls_pooling_is_hf_default_and_mean_differs(token_ids):
    model = _classifier()
    cls_logits = set_pooling(model, "cls")(**token_ids).logits
    assert pooling_of(model) == "cls"
    assert not torch.allclose(set_pooling(model, "mean")(**token_ids).logits, cls_logits)


def test_pooling_saved_and_reloaded_dense_and_compressed(tmp_path, token_ids):
    from tdlight.model.io import load_compressed, save_compressed, save_model
    from tdlight.model.surgery import compress
    from tdlight.model.teacher import load_classifier
    from tdlight.tensor.spec import CompressionSpec, resolve
    from tdlight.model.surgery import encoder_shape

    model = set_pooling(_classifier(), "mean")
    save_model(model, None, tmp_path / "dense")
    assert json.loads((tmp_path / "dense" / "config.json").read_text())["tdlight_pooling"] == "mean"
    again, _ = load_classifier(str(tmp_path / "dense"), 2)
    again.eval()
    assert pooling_of(again) == "mean"
    assert torch.allclose(again(**token_ids).logits, model(**token_ids).logits, atol=1e-6)

    compress(model, resolve(CompressionSpec(rank=8, bank=12), encoder_shape(model)))
    save_compressed(model, tmp_path / "small")
    loaded = load_compressed(tmp_path / "small")
    assert pooling_of(loaded) == "mean"
    assert torch.allclose(loaded(**token_ids).logits, model(**token_ids).logits, atol=1e-5)
    with pytest.raises(TeacherError, match="pooling='mean'.*pooling='cls'"):
        resolve_pooling("cls", loaded.config, str(tmp_path / "small"))


def test_pooling_choice_and_refusals():
    from transformers import DistilBertConfig, DistilBertForSequenceClassification

    assert native_pooling(str(__import__("tdlight.model.teacher", fromlist=["x"]).embedded_path("minilm"))) == "mean"
    assert native_pooling(None) == "cls"
    cfg = tiny_config()
    assert resolve_pooling("auto", cfg, None) == "cls" and resolve_pooling("mean", cfg, None) == "mean"
    with pytest.raises(TeacherError, match="'max'.*valid"):
        resolve_pooling("max", cfg, None)
    distil = DistilBertForSequenceClassification(DistilBertConfig(vocab_size=99, dim=32, n_layers=1, n_heads=4,
                                                                  hidden_dim=64))
    with pytest.raises(TeacherError, match="pooling='mean' needs .*DistilBertForSequenceClassification reads neither"):
        set_pooling(distil, "mean")
    mean = set_pooling(_classifier(), "mean")
    with pytest.raises(TeacherError, match="no \\[CLS\\] pooler"):
        set_pooling(mean, "cls")


def test_prediction_stats_flag_a_constant_predictor():
    y = torch.tensor([0, 1, 1, 1, 0, 1, 1, 1, 1, 1])
    const = prediction_stats("sst2", torch.ones(10, dtype=torch.long), y)
    assert const == pytest.approx({"majority_score": 0.8, "majority_share": 0.8, "top_share": 1.0, "balanced_accuracy": 0.5,
                                   "constant": 1.0})
    good = prediction_stats("sst2", y, y)
    assert good["top_share"] == 0.8 and good["constant"] == 0.0 and good["balanced_accuracy"] == 1.0
    # the mean of the class recalls (2/2 and 4/8), whatever the dev set's skew
    half = prediction_stats("sst2", torch.tensor([0, 1, 0, 0, 0, 1, 1, 0, 1, 0]), y)
    assert half["balanced_accuracy"] == pytest.approx((1.0 + 0.5) / 2)
    # a slice whose labels miss a class: only the classes present count (recall 8/10 of class 1)
    assert prediction_stats("sst2", y, torch.ones(10, dtype=torch.long))["balanced_accuracy"] == pytest.approx(0.8)
    mrpc = prediction_stats("mrpc", y, y)  # the majority baseline in the task's own score (F1 and accuracy)
    assert mrpc["majority_score"] == pytest.approx((0.8 + 2 * 0.8 / 1.8) / 2)
    reg = prediction_stats("stsb", torch.full((5,), 2.5), torch.arange(5.0))
    assert reg["spread"] == 0.0 and reg["constant"] == 1.0 and reg["majority_score"] == 0.0
    assert prediction_stats("stsb", torch.arange(5.0), torch.arange(5.0))["constant"] == 0.0


def test_mean_pooling_through_finetune_distill_evaluate(tmp_path, teacher_dir):
    r = cli(tmp_path, "stage=finetune", "task=mrpc", f"teacher.path={teacher_dir}", "teacher.pooling=mean",
            "stage.epochs=1", "logger=none", *SMALL)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "majority-class baseline" in r.stdout and "top-prediction share" in r.stdout
    (ft,) = runs(tmp_path, "finetune")
    assert json.loads((ft / "model" / "config.json").read_text())["tdlight_pooling"] == "mean"
    r = cli(tmp_path, "stage=decompose", f"teacher.path={teacher_dir}", "compression.rank=8", "compression.bank=12")
    assert r.returncode == 0, r.stderr[-3000:]
    (dec,) = runs(tmp_path, "decompose")
    r = cli(tmp_path, "stage=distill", "task=mrpc", f"teacher.run_dir={ft}", f"stage.student={dec}",
            "stage.intermediate_epochs=0", "stage.prediction_epochs=1", "logger=none", *SMALL)
    assert r.returncode == 0, r.stderr[-3000:]
    (dist,) = runs(tmp_path, "distill")
    m = json.loads((dist / "metrics.json").read_text())
    assert m["pooling"] == "mean" and isinstance(m["constant_predictions"], bool)
    assert json.loads((dist / "model" / "config.json").read_text())["tdlight_pooling"] == "mean"
    if m["constant_predictions"]:  # a tiny random model may well be constant: the console says so, loudly
        assert "WARNING" in r.stderr and "constant predictor" in r.stderr
    r = cli(tmp_path, "stage=evaluate", "task=mrpc", f"stage.model={dist}", "stage.limit_eval=32",
            "stage.max_length=32", "trainer=cpu", "logger=none")
    assert r.returncode == 0, r.stderr[-3000:]
    ev = json.loads((runs(tmp_path, "evaluate")[-1] / "metrics.json").read_text())
    assert ev["score"] == pytest.approx(m["score"], abs=1e-6) and ev["dev"]["top_share"] == m["dev"]["top_share"]
    # an explicit pooling that contradicts the saved one is one clear error, exit 2
    r = cli(tmp_path, "stage=evaluate", "task=mrpc", f"stage.model={dist}", "teacher.pooling=cls",
            "stage.limit_eval=32", "trainer=cpu", "logger=none")
    assert r.returncode == 2 and "pooling='mean'" in r.stderr and "Traceback" not in r.stderr
    r = cli(tmp_path, "stage=finetune", "task=mrpc", f"teacher.path={teacher_dir}", "teacher.pooling=max",
            "logger=none", *SMALL)
    assert r.returncode == 2 and "max" in r.stderr and "mean" in r.stderr


def test_a_decomposition_of_a_pretrained_teacher_records_the_pooling_it_was_trained_for(tmp_path, teacher_dir):
    """A pretrained sentence encoder (its 1_Pooling config says mean, as the embedded MiniLM's does)
    decomposed: the student records mean pooling, so a stand-alone evaluation reads what distillation
    will (it read the [CLS] pooler before); teacher.pooling=cls is another cache entry, read as [CLS]."""
    import shutil

    from tdlight.model.teacher import load_classifier

    st = tmp_path / "sentence-teacher"
    shutil.copytree(teacher_dir, st)
    (st / "1_Pooling").mkdir()
    (st / "1_Pooling" / "config.json").write_text(json.dumps({"pooling_mode_mean_tokens": True}))
    args = ("stage=decompose", f"teacher.path={st}", "compression.rank=8", "compression.bank=12", "logger=none")
    for pooling in ("auto", "cls", "auto"):
        r = cli(tmp_path, *args, f"teacher.pooling={pooling}")
        assert r.returncode == 0, r.stderr[-3000:]
    first, second, third = runs(tmp_path, "decompose")
    want = {first: "mean", second: "cls", third: "mean"}
    for run, pooling in want.items():
        m = json.loads((run / "metrics.json").read_text())
        assert m["pooling"] == pooling
        assert json.loads((run / "model" / "config.json").read_text()).get("tdlight_pooling", "cls") == pooling
        model, _ = load_classifier(str(run / "model"), 2)  # auto: reads what the directory records
        assert pooling_of(model) == pooling
    assert "cached" not in json.loads((second / "metrics.json").read_text())  # not the mean entry
    assert json.loads((third / "metrics.json").read_text())["cached"]  # the mean entry, reused
    assert "pooler.dense.weight" not in str(load_classifier(str(first / "model"), 2)[0].state_dict().keys())


def test_a_mean_pooling_teacher_decomposed_untrained_evaluates_as_it_was_trained(tmp_path, teacher_dir):
    """Decompose-only students of a fine-tuned mean-pooling teacher: the saved model pools by mean
    (no stray [CLS] pooler weights), and at full rank it scores what the teacher scores."""
    r = cli(tmp_path, "stage=finetune", "task=mrpc", f"teacher.path={teacher_dir}", "teacher.pooling=mean",
            "stage.epochs=1", "logger=none", *SMALL)
    assert r.returncode == 0, r.stderr[-3000:]
    (ft,) = runs(tmp_path, "finetune")
    shape = json.loads((ft / "model" / "config.json").read_text())
    full = [f"compression.rank={shape['hidden_size']}", f"compression.bank={12 * shape['num_hidden_layers']}"]
    r = cli(tmp_path, "stage=decompose", f"teacher.run_dir={ft}", *full)
    assert r.returncode == 0, r.stderr[-3000:]
    (dec,) = runs(tmp_path, "decompose")
    assert json.loads((dec / "model" / "config.json").read_text())["tdlight_pooling"] == "mean"
    r = cli(tmp_path, "stage=evaluate", "task=mrpc", f"stage.model={dec}", "stage.limit_eval=32",
            "stage.max_length=32", "trainer=cpu", "logger=none")
    assert r.returncode == 0, r.stderr[-3000:]
    r = cli(tmp_path, "stage=evaluate", "task=mrpc", f"stage.model={ft}", "stage.limit_eval=32",
            "stage.max_length=32", "trainer=cpu", "logger=none")
    assert r.returncode == 0, r.stderr[-3000:]
    student, teacher = (json.loads((d / "metrics.json").read_text())["score"] for d in runs(tmp_path, "evaluate"))
    assert student == pytest.approx(teacher, abs=1e-6)
