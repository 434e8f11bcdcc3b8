"""Encoder families beyond BERT (tdlight.model.families): DistilBERT, ELECTRA, MPNet, DeBERTa-v2 (and RoBERTa).

Each family, as a tiny random config: exact at full rank (weights, outputs, attention scores), the
output fit and the layer-by-layer refit, execution plans, save/load, plain transformers with
``trust_remote_code`` in a process that never imports tdlight, ONNX, and the CLI's decompose on a
teacher directory of that family. Anything else (GPT-2, ModernBERT, DeBERTa's conv layer) is refused
by name.
"""

import copy
import json
import os
import subprocess
import sys

import pytest
import torch
import transformers as T

from tests.conftest import cli, tiny_tokenizer
from tdlight.errors import TeacherError
from tdlight.model.families import FAMILIES, family_of
from tdlight.model.surgery import compress, encoder_shape, encoder_weights
from tdlight.tensor.spec import CompressionSpec

D, I, L = 32, 64, 2  # hidden, FFN width, layers: n = L (4 + 2 I/D) = 16 blocks


def family_config(name: str, **kw):
    common = dict(vocab_size=99, max_position_embeddings=64, **kw)
    if name == "distilbert":
        return T.DistilBertConfig(dim=D, n_layers=L, n_heads=4, hidden_dim=I, **common)
    sizes = dict(hidden_size=D, num_hidden_layers=L, num_attention_heads=4, intermediate_size=I)
    if name == "roberta":
        return T.RobertaConfig(**sizes, **{**common, "max_position_embeddings": 66}, pad_token_id=0)
    if name == "electra":  # word embeddings narrower than the hidden size, as ELECTRA-small's
        return T.ElectraConfig(embedding_size=16, **sizes, **common)
    if name == "mpnet":
        return T.MPNetConfig(**sizes, **{**common, "max_position_embeddings": 66}, pad_token_id=0)
    if name == "deberta-v2":  # v3's layout: relative attention both ways through the shared Q/K projections
        return T.DebertaV2Config(**sizes, **common, relative_attention=True, pos_att_type=["p2c", "c2p"],
                                 position_buckets=16, max_relative_positions=32, share_att_key=True,
                                 norm_rel_ebd="layer_norm", type_vocab_size=0)
    raise ValueError(name)


NAMES = ["distilbert", "electra", "mpnet", "deberta-v2", "roberta"]
FULL = CompressionSpec(variant="tucker", rank=D, bank=L * (4 + 2 * I // D))
SMALL = CompressionSpec(variant="tucker", rank=8, bank=8, balance="type")  # (no block left at zero)


def build(name, head=True, seed=0, **kw):
    torch.manual_seed(seed)
    auto = T.AutoModelForSequenceClassification if head else T.AutoModel
    return auto.from_config(family_config(name, **{**({"num_labels": 3} if head else {}), **kw})).eval()


def test_every_declared_family_is_tested():
    assert {f.name for f in FAMILIES.values()} - {"bert"} <= {family_of(family_config(n)).name for n in NAMES}


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("head", [True, False], ids=["classifier", "encoder"])
def test_full_rank_is_exact(name, head, token_ids):
    from tdlight.model.capture import forward_with_scores
    from tdlight.model.linear import FactorizedLinear

    teacher = build(name, head)
    student = copy.deepcopy(teacher)
    report = compress(student, FULL)
    assert report.rel_error < 1e-4 and type(student) is type(teacher)
    assert sum(isinstance(m, FactorizedLinear) for m in student.modules()) == 6 * L  # every linear of DESIGN §1
    with torch.no_grad():
        ref, out = teacher(**token_ids, output_hidden_states=True), student(**token_ids, output_hidden_states=True)
        torch.testing.assert_close(out[0], ref[0], rtol=1e-4, atol=1e-5)
        for h, r in zip(out.hidden_states, ref.hidden_states, strict=True):
            torch.testing.assert_close(h, r, rtol=1e-4, atol=1e-5)
        s, t = forward_with_scores(student, **token_ids), forward_with_scores(teacher, **token_ids)
    assert len(s.scores) == L and s.scores[0].shape == (3, 4, 12, 12)
    for a, b in zip(s.scores, t.scores, strict=True):
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    # and a real compression is not exact: the linears did change
    small = copy.deepcopy(teacher)
    assert compress(small, SMALL).rel_error > 0.1


@pytest.mark.parametrize("name", ["mpnet", "deberta-v2"])
def test_log_probability_scores_carry_the_gradient_and_ignore_padding(name, token_ids):
    from tdlight.model.capture import forward_with_scores
    from tdlight.stages.losses import attention_loss

    teacher, student = build(name), build(name, seed=1)
    t = forward_with_scores(teacher, **token_ids)
    s = forward_with_scores(student.train(), **token_ids)
    assert (s.scores[0][1, :, :, 8:] == 0).all()  # padding keys: 0, not -inf
    loss = attention_loss(s, t, [(1, 1), (2, 2)])
    assert torch.isfinite(loss) and loss > 0
    loss.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in student.base_model.encoder.parameters())


@pytest.mark.parametrize("name", NAMES)
def test_output_fit_and_layerwise_refit(name, token_ids):
    """The calibration hooks see each linear's token input once per forward (DeBERTa calls Q/K again on
    its relative embeddings): the output fit and the refit lower the held-out error."""
    from tdlight.model.calibration import collect_grams, fit_outputs, output_errors, refit_outputs

    teacher = build(name)
    g = torch.Generator().manual_seed(2)
    batches = [{"input_ids": torch.randint(5, 99, (4, 12), generator=g),
                "attention_mask": torch.ones(4, 12, dtype=torch.long)} for _ in range(3)]
    grams, tokens = collect_grams(teacher, batches)
    assert tokens == 3 * 4 * 12 and len(grams) == 6 * L
    assert all(h.shape == ((I, I) if t == "ffn_out" else (D, D)) for (_, t), h in grams.items())
    student = copy.deepcopy(teacher)
    compress(student, CompressionSpec(variant="tucker", rank=12, bank=8))
    before = output_errors(student, teacher, [token_ids])["last_hidden"]
    fit_outputs(student, encoder_weights(teacher), grams, iters=3)
    records = refit_outputs(student, teacher, batches, [token_ids], passes=1)
    after = output_errors(student, teacher, [token_ids])["last_hidden"]
    assert records[0]["last_hidden"] >= after and after < before, (before, records, after)


@pytest.mark.parametrize("name", NAMES)
def test_save_load_and_execution_plans(tmp_path, name, token_ids):
    from tdlight.model.io import load_compressed, save_model

    student = build(name)
    compress(student, SMALL)
    path = save_model(student, tiny_tokenizer(tmp_path), tmp_path / name)
    with torch.no_grad():
        want = student(**token_ids)[0]
        for execution in ("factorized", "dense", "size", "macs"):
            torch.testing.assert_close(load_compressed(path, execution=execution)(**token_ids)[0], want,
                                       atol=1e-5, rtol=1e-4)
    assert json.loads((path / "config.json").read_text())["model_type"] == "tdlight_" + student.config.model_type


MEAN_POOLING = [n for n in NAMES if n != "distilbert"]  # (DistilBERT slices its first token in its forward)


@pytest.mark.parametrize("name", NAMES)
def test_mean_pooling_reads_the_masked_mean(name, token_ids):
    """A head that reads the first token (RoBERTa, ELECTRA, MPNet, DeBERTa) reads the masked mean under
    pooling=mean: a padded row gives what it gives unpadded; cls sets it back, also on a deep copy."""
    from tdlight.model.pooling import pooling_of, set_pooling

    model = build(name)
    if name not in MEAN_POOLING:
        with pytest.raises(TeacherError, match="pooling='mean' needs .* reads neither"):
            set_pooling(model, "mean")
        return
    with torch.no_grad():
        cls = model(**token_ids)[0]
        set_pooling(model, "mean")
        mean = model(**token_ids)[0]
        alone = model(input_ids=token_ids["input_ids"][1:2, :8], attention_mask=token_ids["attention_mask"][1:2, :8])[0]
        torch.testing.assert_close(alone[0], mean[1], atol=1e-5, rtol=0)
        assert not torch.allclose(mean, cls)
        copy_ = copy.deepcopy(model)
        set_pooling(copy_, "cls")
        assert pooling_of(copy_) == "cls" and pooling_of(model) == "mean"
        torch.testing.assert_close(copy_(**token_ids)[0], cls)
        torch.testing.assert_close(model(**token_ids)[0], mean)


def test_every_family_loads_outside_tdlight_with_the_same_outputs(tmp_path, token_ids):
    """Plain transformers in a fresh process: refused without trust_remote_code, equal outputs with it;
    a mean-pooling one loads in sentence-transformers with the same embeddings."""
    from tdlight.model.io import save_model
    from tdlight.model.pooling import set_pooling

    tok = tiny_tokenizer(tmp_path)
    sentences = ["w1 w2 w3 w4", "w7 w8", "w50 w51 w52 w53 w54 w55 w56"]
    dirs, models = [], {}
    for name in NAMES:
        student = build(name)
        compress(student, SMALL)
        if name in MEAN_POOLING:
            set_pooling(student, "mean")
        path = save_model(student, tok, tmp_path / name)
        models[str(path)] = student
        dirs.append({"path": str(path), "auto": "AutoModelForSequenceClassification",
                     "feeds": {k: v.tolist() for k, v in token_ids.items()},
                     "sentences": sentences if name in MEAN_POOLING else None})
    (tmp_path / "job.json").write_text(json.dumps({"dirs": dirs}))
    proc = subprocess.run([sys.executable, os.path.join(os.path.dirname(__file__), "artifact_outsider.py"),
                           str(tmp_path / "job.json"), str(tmp_path / "out.json")],
                          env={**os.environ, "PYTHONPATH": ""}, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads((tmp_path / "out.json").read_text())
    for path, model in models.items():
        r = out[path]
        assert "trust_remote_code=True" in r["refused"], r
        assert r["class"] == "Tdlight" + type(model).__name__
        with torch.no_grad():
            torch.testing.assert_close(torch.tensor(r["output"]), model(**token_ids)[0], atol=1e-5, rtol=0)
        if r.get("st") is not None:
            enc = tok(sentences, padding=True, return_tensors="pt")
            with torch.no_grad():
                h = model.base_model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"])[0]
            w = enc["attention_mask"][..., None].float()
            torch.testing.assert_close(torch.tensor(r["st"]), (h * w).sum(1) / w.sum(1), atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", NAMES)
def test_onnx_round_trip(tmp_path, name):
    pytest.importorskip("onnxruntime")
    from tdlight.model.io import save_model
    from tdlight.model.onnx import export_onnx

    student = build(name)
    compress(student, SMALL)
    path = save_model(student, tiny_tokenizer(tmp_path), tmp_path / name)
    r = export_onnx(path, tmp_path / f"{name}.onnx")  # verify=True: ONNX Runtime against PyTorch, atol 1e-4
    assert (tmp_path / f"{name}.onnx").is_file() and r["max_abs_diff"] <= 1e-4, r


def save_teacher(tmp_path, name):
    path = tmp_path / f"{name}-teacher"
    build(name, num_labels=2).save_pretrained(path)
    tiny_tokenizer(tmp_path).save_pretrained(path)
    return path


@pytest.mark.parametrize("name", NAMES)
def test_parameter_accounting_agrees_with_the_model(name):
    """The formula (tdlight.tensor.accounting) and the measured counts agree for every family: its
    relative-position tables (MPNet, DeBERTa) and ELECTRA's narrower embeddings and their projection
    are counted with the embeddings, and the config-only shape (sweeps price trials by it) is the same."""
    from tdlight.model.surgery import count_parameters
    from tdlight.tensor.accounting import param_counts

    for spec in (SMALL, CompressionSpec(variant="tucker", rank=8, bank=8, balance="type", embedding_rank=4)):
        model = build(name)
        shape = encoder_shape(model)
        dense = count_parameters(model)
        report = compress(model, spec)
        formula, measured = param_counts(shape, report.spec), count_parameters(model)
        assert (measured["encoder"], measured["embeddings"]) == (formula["encoder"], formula["embeddings"])
        assert (dense["encoder"], dense["embeddings"]) == (formula["dense_encoder"], formula["dense_embeddings"])
        assert formula["ratio"] > 1
    assert (shape.extra_embeddings > 0) == (name in ("mpnet", "deberta-v2", "electra"))
    assert shape.embedding_dim == (16 if name == "electra" else D)


@pytest.mark.parametrize("name", ["distilbert", "electra", "mpnet", "deberta-v2"])
def test_cli_decomposes_a_family_exactly_at_full_rank(tmp_path, name, token_ids):
    from tdlight.model.io import load_compressed

    teacher = save_teacher(tmp_path, name)
    r = cli(tmp_path / "out", "stage=decompose", f"teacher.path={teacher}", f"compression.rank={D}",
            f"compression.bank={FULL.bank}")
    assert r.returncode == 0, r.stderr
    (run,) = (tmp_path / "out" / "decompose").iterdir()
    m = json.loads((run / "metrics.json").read_text())
    assert m["rel_error"] < 1e-4 and set(m["type_errors"]) == set(FULL_TYPES)
    student = load_compressed(run / "model")
    ref = T.AutoModelForSequenceClassification.from_pretrained(teacher).eval()
    with torch.no_grad():
        torch.testing.assert_close(student(**token_ids)[0], ref(**token_ids)[0], rtol=1e-4, atol=1e-5)


FULL_TYPES = ("query", "key", "value", "attn_out", "ffn_in", "ffn_out")


def test_cli_fits_outputs_on_a_deberta_teacher(tmp_path):
    teacher = save_teacher(tmp_path, "deberta-v2")
    r = cli(tmp_path / "out", "stage=decompose", f"teacher.path={teacher}", "compression.rank=8",
            "compression.bank=6", "stage.fit=outputs", "stage.calibration_sequences=16",
            "stage.calibration_max_length=16", "stage.heldout_batches=1", "stage.batch_size=4")
    assert r.returncode == 0, r.stderr
    (run,) = (tmp_path / "out" / "decompose").iterdir()
    m = json.loads((run / "metrics.json").read_text())
    fit = m["fit"]
    assert fit["method"] == "outputs" and fit["outputs"]["last_hidden"] <= fit["hooi"]["last_hidden"], fit


def test_other_architectures_are_refused_by_name(tmp_path):
    gpt2 = T.GPT2Model(T.GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=50, bos_token_id=0, eos_token_id=0))
    with pytest.raises(TeacherError, match="model_type 'gpt2'.*not BERT-shaped.*'distilbert'"):
        encoder_shape(gpt2)
    modern = T.ModernBertModel(T.ModernBertConfig(vocab_size=99, hidden_size=32, num_hidden_layers=1,
                                                  num_attention_heads=2, intermediate_size=64, pad_token_id=0,
                                                  bos_token_id=2, eos_token_id=3, cls_token_id=2, sep_token_id=3))
    with pytest.raises(TeacherError, match="'modernbert'.*ModernBERT is not"):
        compress(modern, FULL)
    conv = T.DebertaV2Model(family_config("deberta-v2", conv_kernel_size=3))
    with pytest.raises(TeacherError, match="conv_kernel_size=3.*not supported"):
        compress(conv, FULL)
    path = tmp_path / "gpt2"
    gpt2.save_pretrained(path)
    r = cli(tmp_path / "out", "stage=decompose", f"teacher.path={path}")
    assert r.returncode == 2 and "model_type 'gpt2'" in r.stderr and "supported model types" in r.stderr


def test_teacher_shape_reads_each_familys_config_keys(tmp_path):
    from tdlight.model.teacher import teacher_shape

    for name in ("distilbert", "mpnet"):
        path = save_teacher(tmp_path, name)
        assert teacher_shape(str(path)) == encoder_shape(build(name))


@pytest.mark.parametrize("name", ["mpnet", "deberta-v2"])
def test_the_whole_pipeline_runs_on_a_family_outside_the_attention_interface(tmp_path, name):
    """finetune -> decompose (output fit) -> pretrain (log-probability attention) -> distill -> evaluate."""
    from tdlight.model.io import load_compressed

    teacher = save_teacher(tmp_path, name)
    out = tmp_path / "out"
    r = cli(out, "experiment=debug", f"teacher.path={teacher}", "stage.decompose.calibration_max_length=32")
    assert r.returncode == 0, r.stderr
    (ev,) = (out / "evaluate").glob("*/metrics.json")
    m = json.loads(ev.read_text())
    assert m["ratio"] > 1 and m["examples"] == 32 and 0 <= m["score"] <= 1
    (pre,) = (out / "pretrain").glob("*/metrics.json")
    assert all(v == v for v in json.loads(pre.read_text()).values() if isinstance(v, float))  # no NaN loss
    student = load_compressed(m["model"])
    assert family_of(student).name == name


@pytest.mark.parametrize("name", NAMES)
def test_the_layer_cut_peer_saves_and_loads_as_that_depth(tmp_path, name, token_ids):
    from tdlight.model.surgery import cut_layers
    from tdlight.model.teacher import load_teacher

    model = cut_layers(build(name), [1])
    assert encoder_shape(model).num_layers == 1 and model.config.num_hidden_layers == 1
    model.save_pretrained(tmp_path / "cut")
    again, _ = load_teacher(str(tmp_path / "cut"))
    with torch.no_grad():
        torch.testing.assert_close(again(**token_ids)[0], model(**token_ids)[0])


@pytest.mark.parametrize("name", NAMES)
def test_a_decomposed_encoder_gets_a_classification_head(name, token_ids):
    """A decomposed bare encoder (a sentence encoder such as all-mpnet-base-v2, with or without a pooler
    its family's classifier never reads) becomes that family's classifier with the same encoder weights."""
    from tdlight.model.teacher import as_classifier

    encoder = build(name, head=False)
    compress(encoder, SMALL)
    clf = as_classifier(encoder, 2)
    assert type(clf).__name__.endswith("ForSequenceClassification") and clf.config.num_labels == 2
    with torch.no_grad():
        torch.testing.assert_close(clf.base_model(**token_ids)[0], encoder(**token_ids)[0])
        assert torch.isfinite(clf(**token_ids).logits).all()


def test_a_tokenizer_loads_first_without_a_remote_code_prompt(tmp_path):
    """tdlight.load_tokenizer on a tdlight directory, first thing in a fresh process: transformers reads
    config.json to choose the tokenizer, and must find the tdlight type registered, not ask to run code."""
    from tdlight.model.io import save_model

    student = build("distilbert")
    compress(student, SMALL)
    path = save_model(student, tiny_tokenizer(tmp_path), tmp_path / "student")
    code = f"import tdlight; print(type(tdlight.load_tokenizer({str(path)!r})).__name__)"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip().endswith("Tokenizer") and "custom code" not in proc.stdout + proc.stderr
