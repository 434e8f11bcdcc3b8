"""task.pair_encoding=bi: a sentence-pair regression read by a bi-encoder (tdlight.model.pairs) — the head, the
batches, the directories (in tdlight, transformers and sentence-transformers) and the stages end to end."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys

import pytest
import torch

from tdlight.errors import TeacherError
from tdlight.model.pairs import PairCosine, pair_encoding_of, set_pair_encoding
from tdlight.model.pooling import set_pooling
from tests.conftest import cli, runs, tiny_config, tiny_tokenizer


def _regressor(seed: int = 0):
    from transformers import BertForSequenceClassification

    torch.manual_seed(seed)
    return set_pooling(BertForSequenceClassification(tiny_config(num_labels=1)).eval(), "mean")


def _mean(model, ids, mask):
    h = model.base_model(input_ids=ids, attention_mask=mask).last_hidden_state
    w = mask[..., None].float()
    return (h * w).sum(1) / w.sum(1)


def test_a_bi_encoder_predicts_the_scaled_cosine_of_each_sentence_encoded_alone():
    model = set_pair_encoding(_regressor(), "bi", 5.0)
    assert pair_encoding_of(model) == "bi" and isinstance(model.classifier, PairCosine)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(5, 99, (6, 9), generator=g)
    mask = torch.ones_like(ids)
    mask[4, 5:] = 0  # a shorter second sentence, padded
    labels = torch.tensor([0.5, 4.0, 2.5])
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, labels=labels)
        u, v = _mean(model, ids[:3], mask[:3]), _mean(model, ids[3:], mask[3:])
    want = 5 * torch.nn.functional.cosine_similarity(u, v)
    torch.testing.assert_close(out.logits[:, 0], want, atol=1e-5, rtol=0)
    torch.testing.assert_close(out.loss, torch.nn.functional.mse_loss(want, labels), atol=1e-5, rtol=0)
    assert model.config.tdlight_pair_encoding == {"encoding": "bi", "scale": 5.0}
    with pytest.raises(ValueError, match="even number of rows"):
        model(input_ids=ids[:3], attention_mask=mask[:3])


def test_pair_encoding_refusals():
    from transformers import BertForSequenceClassification

    torch.manual_seed(0)
    two = BertForSequenceClassification(tiny_config(num_labels=2))
    with pytest.raises(TeacherError, match="predicts one similarity; this classifier has 2 outputs"):
        set_pair_encoding(two, "bi", 5.0)
    bi = set_pair_encoding(_regressor(), "bi", 5.0)
    with pytest.raises(TeacherError, match="valid for it: task.pair_encoding=bi"):
        set_pair_encoding(bi, "cross")
    with pytest.raises(TeacherError, match="trained at scale 5.0"):
        set_pair_encoding(bi, "bi", 1.0)
    with pytest.raises(TeacherError, match=r"pair encoding 'siamese'; valid: \['cross', 'bi'\]"):
        set_pair_encoding(_regressor(), "siamese")
    assert pair_encoding_of(set_pair_encoding(_regressor(), "cross")) == "cross"  # (a no-op)


def test_a_bi_encoder_directory_loads_back_in_tdlight_transformers_and_sentence_transformers(tmp_path):
    """Dense and compressed bi-encoders saved by tdlight: tdlight loads them as bi-encoders (and refuses to
    read them as cross-encoders); a process that never imports tdlight gets the same predictions through
    transformers (trust_remote_code=True; refused without it) and, through sentence-transformers, embeddings
    whose scaled cosine is the prediction."""
    pytest.importorskip("sentence_transformers")
    from tdlight.model.io import save_model
    from tdlight.model.surgery import compress
    from tdlight.model.teacher import load_classifier
    from tdlight.tensor.spec import CompressionSpec

    tok = tiny_tokenizer(tmp_path)
    teacher = set_pair_encoding(_regressor(), "bi", 5.0)
    student = copy.deepcopy(teacher)
    compress(student, CompressionSpec(variant="tucker", rank=8, bank=6))
    firsts, seconds = ["w1 w2 w3 w4", "w7 w8"], ["w1 w2 w9", "w50 w51 w52 w53 w54"]
    enc = tok(firsts + seconds, padding=True, return_tensors="pt")
    feeds = {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}
    dirs = {name: save_model(m, tok, tmp_path / name) for name, m in (("teacher", teacher), ("student", student))}
    job = {"dirs": [{"path": str(d), "auto": "AutoModelForSequenceClassification",
                     "feeds": {k: v.tolist() for k, v in feeds.items()}, "sentences": firsts + seconds}
                    for d in dirs.values()]}
    (tmp_path / "job.json").write_text(json.dumps(job))
    proc = subprocess.run([sys.executable, os.path.join(os.path.dirname(__file__), "artifact_outsider.py"),
                           str(tmp_path / "job.json"), str(tmp_path / "out.json")],
                          env={**os.environ, "PYTHONPATH": ""}, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads((tmp_path / "out.json").read_text())
    for name, model in (("teacher", teacher), ("student", student)):
        d = dirs[name]
        assert json.loads((d / "config.json").read_text())["tdlight_pair_encoding"] == {"encoding": "bi", "scale": 5.0}
        loaded, _ = load_classifier(str(d), 1)
        assert pair_encoding_of(loaded) == "bi"
        with torch.no_grad():
            want = model(**feeds).logits
            torch.testing.assert_close(loaded(**feeds).logits, want, atol=1e-5, rtol=0)
        r = out[str(d)]
        assert "trust_remote_code=True" in r["refused"]  # plain transformers: refused, never a random head
        torch.testing.assert_close(torch.tensor(r["output"]), want, atol=1e-5, rtol=0)
        st = torch.tensor(r["st"])  # sentence-transformers' embeddings: 5 × their cosine is the prediction
        torch.testing.assert_close(5 * torch.nn.functional.cosine_similarity(st[:2], st[2:]), want[:, 0],
                                   atol=1e-5, rtol=0)
        with pytest.raises(TeacherError, match="valid for it: task.pair_encoding=bi"):
            load_classifier(str(d), 1, pair_encoding="cross")
        # ONNX: the graph is the encoder (a prediction needs two sentences at once); its mean-pooled states'
        # scaled cosine is the prediction
        pytest.importorskip("onnxruntime")
        import onnxruntime as ort

        from tdlight.model.onnx import export_onnx

        r = export_onnx(d, tmp_path / f"{name}.onnx")
        assert r["output"] == "last_hidden_state"
        session = ort.InferenceSession(r["path"], providers=["CPUExecutionProvider"])
        inputs = {**feeds, "token_type_ids": torch.zeros_like(feeds["input_ids"])}
        h = torch.tensor(session.run(None, {n.name: inputs[n.name].numpy() for n in session.get_inputs()})[0])
        w = feeds["attention_mask"][..., None].float()
        pooled = (h * w).sum(1) / w.sum(1)
        torch.testing.assert_close(5 * torch.nn.functional.cosine_similarity(pooled[:2], pooled[2:]), want[:, 0],
                                   atol=1e-4, rtol=0)


def test_bi_batches_hold_the_first_sentences_then_the_second_ones_each_tokenized_alone(tmp_path, minilm_tokenizer):
    from tdlight.config import ROOT
    from tdlight.data.datamodule import GlueDataModule

    def dm(encoding):
        m = GlueDataModule("stsb", minilm_tokenizer, data_dir=ROOT.parent / "shared" / "data" / "glue",
                           batch_size=4, cache_dir=tmp_path, limit_train=8, limit_eval=8, pair_encoding=encoding)
        m.setup("fit")
        return m

    bi, cross = dm("bi"), dm("cross")
    assert bi._cache_key("train")[0] != cross._cache_key("train")[0]
    assert "pair_encoding" not in cross._cache_key("train")[1]  # (cross entries keep the keys they had)
    batch = next(iter(bi.val_dataloader()))
    rows = bi.datasets["validation"][:4]
    assert batch["input_ids"].shape[0] == 8 and batch["labels"].shape == (4,) and batch["labels"].dtype == torch.float32
    from tdlight.data.glue import load_split

    raw = load_split(bi.task, "validation", data_dir=ROOT.parent / "shared" / "data" / "glue")[:4]
    for i in range(4):
        for j, column in ((i, "sentence1"), (4 + i, "sentence2")):
            ids = minilm_tokenizer(raw[column][i])["input_ids"]
            n = int(batch["attention_mask"][j].sum())
            assert batch["input_ids"][j, :n].tolist() == ids, (i, column)
    assert batch["labels"].tolist() == pytest.approx(rows["labels"])
    with pytest.raises(ValueError, match="sst2 has 1 text column"):
        GlueDataModule("sst2", minilm_tokenizer, data_dir=None, pair_encoding="bi")


def test_the_pair_encoding_joins_a_step_key_only_when_bi(tmp_path):
    """task.pair_encoding came after steps were cached: at cross (every task's default but STS-B's) it stays
    out of the key, so cached cross-encoder steps keep theirs."""
    from omegaconf import OmegaConf

    from tdlight.stages.pipeline import step_key
    from tests.conftest import compose_cfg

    assert compose_cfg(tmp_path, "stage=distill", "task=stsb").task.pair_encoding == "bi"  # (conf/task/stsb.yaml)
    assert compose_cfg(tmp_path, "stage=distill", "task=mrpc").task.pair_encoding == "cross"
    cfg = compose_cfg(tmp_path, "stage=distill", "task=stsb", "task.pair_encoding=cross")
    cross = step_key("distill", cfg.stage, cfg, {})
    before = OmegaConf.create(OmegaConf.to_container(cfg))  # (a plain config: a field can be deleted)
    del before.task["pair_encoding"]
    assert step_key("distill", before.stage, before, {}) == cross
    cfg.task.pair_encoding = "bi"
    assert step_key("distill", cfg.stage, cfg, {}) != cross


def test_a_bi_encoder_pipeline_on_stsb_end_to_end_and_its_refusals(pretrain_inputs, teacher_dir, tmp_path):
    """task=stsb task.pair_encoding=bi through every step: the teacher is fine-tuned as a bi-encoder, the
    student distilled from it is one (its directory says so), evaluate reads it back; a classification
    task, a cross-encoder teacher for a bi run and a bi student read as a cross-encoder are refused."""
    _, _, files = pretrain_inputs
    args = ["stage=pipeline", "task=stsb", f"teacher.path={teacher_dir}",  # (bi: STS-B's default)
            "teacher.pooling=mean", "compression.rank=8", "compression.bank=12", "trainer=cpu",
            "trainer.enable_progress_bar=false", "logger=none",
            "stage.finetune.epochs=1", "stage.finetune.limit_train=32", "stage.finetune.limit_eval=16",
            "stage.finetune.batch_size=8", "stage.finetune.max_length=16",
            *[f.replace("stage.", "stage.pretrain.") for f in files],
            "stage.pretrain.max_steps=2", "stage.pretrain.val_every_n_steps=2", "stage.pretrain.max_length=16",
            "stage.pretrain.batch_size=4", "stage.pretrain.max_heldout_sequences=8",
            "stage.distill.intermediate_epochs=1", "stage.distill.prediction_epochs=1",
            "stage.distill.limit_train=32", "stage.distill.limit_eval=16", "stage.distill.batch_size=8",
            "stage.distill.max_length=16", "stage.evaluate.limit_eval=16", "stage.evaluate.max_length=16",
            "stage.speed_reps=2", "stage.speed_batch_size=4"]
    r = cli(tmp_path, *args)
    assert r.returncode == 0, r.stderr[-4000:]
    (ft,), (dist,), (ev,) = runs(tmp_path, "finetune"), runs(tmp_path, "distill"), runs(tmp_path, "evaluate")
    for d in (ft, dist):
        config = json.loads((d / "model" / "config.json").read_text())
        assert config["tdlight_pair_encoding"] == {"encoding": "bi", "scale": 5.0} and "classifier.weight" not in \
            json.dumps(config)
    assert json.loads((ev / "metrics.json").read_text())["score"] == pytest.approx(
        json.loads((dist / "metrics.json").read_text())["score"], abs=1e-6)

    small = ["trainer=cpu", "logger=none", "stage.limit_eval=16", "stage.max_length=16"]
    r = cli(tmp_path, "stage=finetune", "task=mrpc", "task.pair_encoding=bi", f"teacher.path={teacher_dir}", *small)
    assert r.returncode == 2 and "task=mrpc is not a similarity task; valid: task.pair_encoding=cross" in r.stderr
    assert "Traceback" not in r.stderr
    r = cli(tmp_path, "stage=finetune", "task=stsb", "task.pair_encoding=siamese", f"teacher.path={teacher_dir}", *small)
    assert r.returncode == 2 and "task.pair_encoding='siamese'; valid: cross, bi" in r.stderr
    r = cli(tmp_path, "stage=evaluate", "task=stsb", "task.pair_encoding=cross", f"stage.model={dist}", *small)
    assert r.returncode == 2 and "valid for it: task.pair_encoding=bi" in r.stderr and "Traceback" not in r.stderr
    # a cross-encoder teacher cannot teach a bi-encoder run (its trained head would be thrown away)
    r = cli(tmp_path, "stage=finetune", "task=stsb", "task.pair_encoding=cross", f"teacher.path={teacher_dir}",
            "teacher.pooling=mean", "stage.epochs=1", "stage.limit_train=16", "stage.batch_size=8", *small)
    assert r.returncode == 0, r.stderr[-3000:]
    cross = [d for d in runs(tmp_path, "finetune") if d != ft][0]
    r = cli(tmp_path, "stage=distill", "task=stsb", f"teacher.run_dir={cross}",
            f"stage.student={dist}", "stage.intermediate_epochs=0", "stage.prediction_epochs=1", *small)
    assert r.returncode == 2 and "fine-tuned with task.pair_encoding=cross" in r.stderr, r.stderr[-2000:]
    # a bi-encoder's head is the cosine: no weight for head-only epochs to train
    r = cli(tmp_path, "stage=distill", "task=stsb", f"teacher.run_dir={ft}", f"stage.student={dist}",
            "stage.intermediate_epochs=0", "stage.prediction_epochs=1", "stage.head_epochs=1", *small)
    assert r.returncode == 2 and "stage.head_epochs=1 is for the task head" in r.stderr, r.stderr[-2000:]
    r = cli(tmp_path, "stage=distill", "task=stsb", f"teacher.run_dir={ft}", f"stage.student={dist}",
            "stage.intermediate_epochs=0", "stage.prediction_epochs=1", "stage.head_lr=1e-3", *small)
    assert r.returncode == 2 and "stage.head_lr=0.001 is for the task head" in r.stderr, r.stderr[-2000:]
    # a student with nothing to train (no layer, frozen embeddings, a head without weights): one clear error
    r = cli(tmp_path, "stage=cut", "stage.layers=0", f"teacher.path={teacher_dir}", "teacher.pooling=mean", "logger=none")
    assert r.returncode == 0, r.stderr[-3000:]
    (cut,) = runs(tmp_path, "cut")
    r = cli(tmp_path, "stage=distill", "task=stsb", f"teacher.run_dir={ft}", f"stage.student={cut}",
            "stage.intermediate_epochs=0", "stage.prediction_epochs=1", *small)
    assert r.returncode == 2 and "has nothing to train" in r.stderr and "valid: train_embeddings=true" in r.stderr
    assert "Traceback" not in r.stderr
    # ... and what it names (the grid's STS-B peer at 1/48, benchmarks/reproduce.sh): the embeddings train
    r = cli(tmp_path, "stage=distill", "task=stsb", f"teacher.run_dir={ft}", f"stage.student={cut}",
            "stage.intermediate_epochs=0", "stage.prediction_epochs=1", "stage.train_embeddings=true",
            "stage.limit_train=16", "stage.batch_size=8", *small)
    assert r.returncode == 0, r.stderr[-3000:]
    (peer,) = [m for m in (json.loads((d / "metrics.json").read_text()) for d in runs(tmp_path, "distill")
                           if (d / "metrics.json").is_file()) if m["student"] == str(cut / "model")]
    assert peer["train_embeddings"] is True and peer["global_step"] == 2
