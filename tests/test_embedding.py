"""Whole-model compression: the word embeddings at low rank and over a restricted vocabulary."""

from __future__ import annotations

import copy
import json
import subprocess
from pathlib import Path

import pytest
import torch
from torch import nn

from tdlight.errors import DataError, SpecError
from tdlight.model.embedding import FactorizedEmbedding, train_compressed_embeddings
from tdlight.model.io import load_compressed, save_compressed
from tdlight.model.surgery import compress, count_parameters, densify, encoder_shape
from tdlight.tensor.accounting import param_counts
from tdlight.tensor.embedding import TokenStats, embedding_error, fit_embedding, row_weights
from tdlight.tensor.spec import CompressionSpec, ResolvedSpec, resolve
from tests.conftest import cli

V, D, UNK = 99, 32, 1  # tiny_config: 99 ids, hidden 32; the tiny tokenizer's [UNK] is id 1
FULL = dict(variant="tucker", rank=D, bank=24)  # the tiny encoder at full rank and bank: exact


def stats(kept: list[int], special=(0, 1, 2, 3, 4)) -> TokenStats:
    """Token counts with ``kept`` seen (id i seen i times) and nothing else."""
    counts = torch.zeros(V, dtype=torch.float64)
    counts[kept] = torch.tensor(kept, dtype=torch.float64)
    return TokenStats(counts, tuple(special), UNK, "test")


@pytest.fixture(scope="module")
def word_teacher(tmp_path_factory):
    """The tiny teacher directory, its tokenizer knowing its words."""
    from transformers import AutoTokenizer

    from tests.conftest import save_tiny_teacher

    tmp = tmp_path_factory.mktemp("word_teacher")
    path = save_tiny_teacher(tmp / "tiny", tmp)
    assert AutoTokenizer.from_pretrained(path).convert_tokens_to_ids("w1") == 6
    return path


def out(model, input_ids, attention_mask=None):
    with torch.no_grad():
        mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
        o = model(input_ids=input_ids, attention_mask=mask)
    return o.logits if hasattr(o, "logits") else o.last_hidden_state


# --- tensor/: the fit -----------------------------------------------------------------------

@pytest.mark.parametrize("weighted", [False, True])
def test_fit_is_exact_at_full_rank_and_its_error_falls_with_rank(weighted):
    g = torch.Generator().manual_seed(0)
    E = torch.randn(200, 24, generator=g)
    w = row_weights(torch.randint(0, 50, (200,), generator=g).double()) if weighted else None
    fit = fit_embedding(E, 24, w)
    torch.testing.assert_close(fit.A @ fit.B, E, atol=1e-5, rtol=0)
    torch.testing.assert_close(fit.B @ fit.B.T, torch.eye(24), atol=1e-5, rtol=0)
    errors = [fit_embedding(E, r, w).rel_error for r in (4, 12, 20)]
    assert errors[0] > errors[1] > errors[2] > fit.rel_error


def test_weighted_fit_minimises_the_weighted_error_and_uniform_the_plain_one():
    g = torch.Generator().manual_seed(1)
    E = torch.randn(300, 16, generator=g) * torch.linspace(0.2, 2, 16)
    w = row_weights(torch.randint(0, 1000, (300,), generator=g).double() ** 2)  # very skewed counts
    uni, freq = fit_embedding(E, 6), fit_embedding(E, 6, w)
    assert embedding_error(E, freq.A @ freq.B, w) < embedding_error(E, uni.A @ uni.B, w)
    assert uni.rel_error < freq.rel_error
    assert freq.weighted_rel_error == pytest.approx(embedding_error(E, freq.A @ freq.B, w))


def test_row_weights_keep_unseen_tokens_and_refuse_negative_counts():
    w = row_weights(torch.tensor([0.0, 9.0, 0.0, 90.0]))
    assert (w > 0).all() and w.mean() == pytest.approx(1.0) and w[3] > w[1] > w[0]
    with pytest.raises(SpecError, match="non-negative"):
        row_weights(torch.tensor([1.0, -1.0]))


# --- the spec -------------------------------------------------------------------------------

@pytest.mark.parametrize("kw, message", [
    ({"embedding_rank": 0}, "embedding_rank=0; valid: an integer in [1, 32]"),
    ({"embedding_rank": 33}, "embedding_rank=33; valid: an integer in [1, 32] (the hidden size)"),
    ({"embedding_rank": 8, "embedding_weighting": "tfidf"}, "embedding_weighting='tfidf'; valid: uniform, frequency"),
    ({"embedding_weighting": "frequency"}, "it needs embedding_rank"),
    ({"vocab": "  "}, "vocab='  '; valid: null (the full vocabulary), task"),
])
def test_impossible_embedding_settings_are_refused(tiny_bert, kw, message):
    with pytest.raises(SpecError) as e:
        resolve(CompressionSpec(rank=8, **kw), encoder_shape(tiny_bert))
    assert message in str(e.value)


def test_spec_round_trips_and_encoder_only_dicts_are_unchanged(tiny_bert):
    shape = encoder_shape(tiny_bert)
    plain = resolve(CompressionSpec(rank=8), shape).to_dict()
    assert not {"embedding_rank", "vocab", "vocab_size", "embedding_weighting"} & set(plain)  # same cache keys
    r = resolve(CompressionSpec(rank=8, embedding_rank=4, vocab="task", embedding_weighting="frequency"), shape,
                vocab_size=20)
    assert ResolvedSpec.from_dict(json.loads(json.dumps(r.to_dict())), shape) == r
    d = r.to_dict()
    d.pop("vocab_size")  # a saved restricted vocabulary must say how many rows it kept
    with pytest.raises(SpecError, match="vocab_size=None"):
        ResolvedSpec.from_dict(d, shape)
    with pytest.raises(SpecError, match="vocab_size=100"):
        resolve(CompressionSpec(rank=8, vocab="x.txt"), shape, vocab_size=100)


# --- model/: exactness, restriction, round trips --------------------------------------------

def test_full_rank_full_vocabulary_is_exact(tiny_classifier, token_ids):
    teacher = copy.deepcopy(tiny_classifier)
    report = compress(tiny_classifier, CompressionSpec(**FULL, embedding_rank=D))
    word = tiny_classifier.get_input_embeddings()
    assert isinstance(word, FactorizedEmbedding) and word.weight.shape == (V, D) and word.id_map is None
    assert report.embedding["rel_error"] < 1e-6
    torch.testing.assert_close(out(tiny_classifier, **token_ids), out(teacher, **token_ids), atol=1e-5, rtol=0)


@pytest.mark.parametrize("rank", [None, D])
def test_restricted_vocabulary_maps_dropped_ids_to_unk_and_is_exact_on_kept_ones(tiny_bert, rank):
    teacher = copy.deepcopy(tiny_bert)
    kept = list(range(5, 60))
    report = compress(tiny_bert, CompressionSpec(**FULL, embedding_rank=rank, vocab="some text"), tokens=stats(kept))
    word = tiny_bert.embeddings.word_embeddings
    assert report.spec.vocab_size == 60 == word.weight.shape[0]  # 55 seen + 5 special tokens
    assert word.id_map.dtype == torch.int32 and word.id_map.shape == (V,)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, V, (4, 16), generator=g)
    ids[0] = torch.randint(5, 60, (16,), generator=g)  # a row of kept tokens only
    as_tokenizer_would = torch.where((ids >= 60), torch.full_like(ids, UNK), ids)  # dropped ids -> [UNK]
    assert (ids != as_tokenizer_would).any()
    torch.testing.assert_close(out(tiny_bert, ids), out(teacher, as_tokenizer_would), atol=1e-5, rtol=0)
    assert not torch.allclose(out(tiny_bert, ids)[1:], out(teacher, ids)[1:], atol=1e-3)  # dropped ids do change
    torch.testing.assert_close(out(tiny_bert, ids[:1]), out(teacher, ids[:1]), atol=1e-5, rtol=0)


def test_restricted_vocabulary_needs_its_token_statistics(tiny_bert):
    with pytest.raises(SpecError, match="needs the token statistics"):
        compress(tiny_bert, CompressionSpec(rank=8, vocab="corpus.txt"))
    assert isinstance(tiny_bert.embeddings.word_embeddings, nn.Embedding)  # refused before any change
    with pytest.raises(SpecError, match="no unknown token"):
        compress(copy.deepcopy(tiny_bert), CompressionSpec(rank=8, vocab="corpus.txt"),
                 tokens=TokenStats(stats([7, 8]).counts, (0, 2, 3), None))


def test_save_load_round_trip_gives_equal_outputs(tmp_path, tiny_classifier, token_ids):
    compress(tiny_classifier, CompressionSpec(rank=8, bank=12, embedding_rank=6, vocab="text",
                                              embedding_weighting="frequency"), tokens=stats(list(range(5, 80, 2))))
    path = save_compressed(tiny_classifier, tmp_path / "m")
    meta = json.loads((path / "tdlight.json").read_text())
    assert meta["spec"]["vocab_size"] == 43 and meta["spec"]["embedding_rank"] == 6
    loaded = load_compressed(path, execution="factorized")
    word = loaded.bert.embeddings.word_embeddings
    assert isinstance(word, FactorizedEmbedding) and word.weight.shape == (43, 6) and word.projection.shape == (6, D)
    assert torch.equal(word.id_map, tiny_classifier.bert.embeddings.word_embeddings.id_map)
    torch.testing.assert_close(out(loaded, **token_ids), out(tiny_classifier, **token_ids), atol=1e-5, rtol=0)


def test_densify_gives_a_full_vocabulary_embedding_with_the_same_outputs(tiny_bert, token_ids):
    compress(tiny_bert, CompressionSpec(rank=8, bank=12, embedding_rank=6, vocab="t"), tokens=stats([9, 20, 50]))
    before = out(tiny_bert, **token_ids)
    densify(tiny_bert)
    word = tiny_bert.embeddings.word_embeddings
    assert type(word) is nn.Embedding and word.weight.shape == (V, D) and word.padding_idx == 0
    torch.testing.assert_close(out(tiny_bert, **token_ids), before, atol=1e-5, rtol=0)
    torch.testing.assert_close(word.weight[60], word.weight[UNK])  # a dropped id reads [UNK]'s row
    assert not torch.allclose(word.weight[9], word.weight[UNK])
    assert all(isinstance(m, nn.Linear) for m in tiny_bert.encoder.layer[0].attention.self.children()
               if not isinstance(m, nn.Dropout))


def test_parameter_counts_of_the_whole_model(tiny_classifier):
    dense = count_parameters(copy.deepcopy(tiny_classifier))
    report = compress(tiny_classifier, CompressionSpec(rank=8, bank=12, embedding_rank=6, vocab="t"),
                      tokens=stats(list(range(5, 45))))
    counted = count_parameters(tiny_classifier)
    formula = param_counts(encoder_shape(tiny_classifier), report.spec)
    rest = (64 + 2) * D + 2 * D  # position + token-type embeddings + their LayerNorm
    assert counted["embeddings"] == formula["embeddings"] == 45 * 6 + 6 * D + rest
    assert dense["embeddings"] == formula["dense_embeddings"] == V * D + rest
    assert counted["encoder"] == formula["encoder"]
    assert formula["model"] == formula["encoder"] + formula["embeddings"]
    assert formula["model_ratio"] == pytest.approx((dense["encoder"] + dense["embeddings"]) / formula["model"])
    assert "id_map" not in dict(tiny_classifier.named_parameters())  # a buffer, not a parameter
    assert encoder_shape(tiny_classifier).vocab_size == V  # the teacher's ids, not the kept rows


def test_input_embeddings_and_training_back(tiny_bert, token_ids):
    compress(tiny_bert, CompressionSpec(rank=8, embedding_rank=6))
    word = tiny_bert.get_input_embeddings()
    assert isinstance(word, FactorizedEmbedding)
    embeds = word(token_ids["input_ids"])
    with torch.no_grad():
        a = tiny_bert(inputs_embeds=embeds, attention_mask=token_ids["attention_mask"]).last_hidden_state
    torch.testing.assert_close(a, out(tiny_bert, **token_ids))
    tiny_bert.embeddings.requires_grad_(False)  # what pretrain / distill do without train_embeddings
    train_compressed_embeddings(tiny_bert)
    assert word.weight.requires_grad and word.projection.requires_grad
    assert not tiny_bert.embeddings.position_embeddings.weight.requires_grad


def test_tied_masked_lm_is_refused_untouched():
    from transformers import BertForMaskedLM

    from tests.conftest import tiny_config

    mlm = BertForMaskedLM(tiny_config())
    with pytest.raises(SpecError, match="ties its output embeddings"):
        compress(mlm, CompressionSpec(rank=8, embedding_rank=6))
    assert not hasattr(mlm.bert.encoder, "factor_banks")
    assert mlm.get_output_embeddings().weight is mlm.get_input_embeddings().weight
    compress(mlm.bert, CompressionSpec(rank=8, embedding_rank=6))  # its encoder alone: fine


def test_onnx_export_of_compressed_embeddings(tmp_path, tiny_classifier):
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")
    from tdlight.model.onnx import export_onnx

    compress(tiny_classifier, CompressionSpec(rank=8, bank=12, embedding_rank=6, vocab="t"),
             tokens=stats(list(range(5, 50))))
    path = save_compressed(tiny_classifier, tmp_path / "m")
    export_onnx(path, tmp_path / "m.onnx", execution="factorized")
    ids = torch.randint(0, V, (2, 10), generator=torch.Generator().manual_seed(3))
    feeds = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "token_type_ids": torch.zeros_like(ids)}
    session = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    got = session.run(None, {i.name: feeds[i.name].numpy() for i in session.get_inputs()})[0]
    torch.testing.assert_close(torch.from_numpy(got), out(tiny_classifier, ids), atol=1e-4, rtol=0)


# --- data/: token statistics ----------------------------------------------------------------

def test_token_stats_count_the_text_and_refuse_a_text_without_usable_tokens(tmp_path, word_teacher):
    from transformers import AutoTokenizer

    from tdlight.data.vocab import token_stats

    tok = AutoTokenizer.from_pretrained(word_teacher)
    f = tmp_path / "v.txt"
    f.write_text("w1 w2 w2\n\nw7 zzz\n")
    s = token_stats(tok, f, V)
    ids = tok.convert_tokens_to_ids(["w1", "w2", "w7"])
    assert s.counts[ids].tolist() == [1, 2, 1] and s.counts[UNK] == 1 and s.counts.sum() == 5
    assert s.unk_id == UNK and set(s.special_ids) == {0, 1, 2, 3, 4}
    assert s.kept_ids().tolist() == sorted({0, 1, 2, 3, 4, *ids})
    (tmp_path / "unk.txt").write_text("zzz qqq\n")
    with pytest.raises(DataError, match="yields no usable token"):
        token_stats(tok, tmp_path / "unk.txt", V)


# --- the command ----------------------------------------------------------------------------

def run_cli(out_dir: Path, *overrides: str) -> subprocess.CompletedProcess:
    return cli(out_dir, *overrides)


def test_decompose_compresses_the_embeddings(tmp_path, word_teacher):
    vocab = tmp_path / "vocab.txt"
    vocab.write_text("w1 w2 w3 w4 w5 w6 w7 w8 w9 w10 w11\nw12 w13 w14 w15 w2 w2 w2\n")
    r = run_cli(tmp_path, "stage=decompose", f"teacher.path={word_teacher}", "compression.rank=8", "compression.bank=12",
                "compression.embedding_rank=4", f"compression.vocab={vocab}", "compression.embedding_weighting=frequency")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "whole-model ratio" in r.stdout
    (run,) = sorted((tmp_path / "decompose").iterdir())
    m = json.loads((run / "metrics.json").read_text())
    assert m["spec"]["vocab_size"] == 20 and m["embedding"]["rows"] == 20  # 15 words + 5 special tokens
    assert m["parameters_after"]["embeddings"] == 20 * 4 + 4 * D + (64 + 2) * D + 2 * D
    b, a = m["parameters_before"], m["parameters_after"]
    assert m["model_parameters_after"] == a["encoder"] + a["embeddings"]
    assert m["model_ratio"] == pytest.approx((b["encoder"] + b["embeddings"]) / (a["encoder"] + a["embeddings"]))
    assert m["embedding"]["weighting"] == "frequency" and 0 < m["embedding"]["rel_error"] < 1
    model = load_compressed(run / "model")
    assert model.bert.embeddings.word_embeddings.weight.shape == (20, 4)


@pytest.mark.parametrize("overrides, message", [
    (["compression.embedding_rank=33"], "embedding_rank=33; valid: an integer in [1, 32]"),
    (["compression.embedding_rank=0"], "compression.embedding_rank=0; valid: an integer ≥ 1"),
    (["compression.embedding_rank=8", "compression.embedding_weighting=tfidf"], "embedding_weighting='tfidf'"),
    (["compression.vocab=/does/not/exist.txt"], "compression.vocab: '/does/not/exist.txt' does not exist"),
    (["compression.vocab=UNKFILE"], "yields no usable token"),
    (["compression.vocab=task"], "compression.vocab=task reads the task's training text: add task=<name>"),
])
def test_bad_embedding_input_exits_2_and_writes_nothing(tmp_path, word_teacher, overrides, message):
    unk = tmp_path / "unk.txt"
    unk.write_text("zzz qqq\n")
    overrides = [o.replace("UNKFILE", str(unk)) for o in overrides]
    r = run_cli(tmp_path / "out", f"teacher.path={word_teacher}", "compression.rank=8", *overrides)
    assert r.returncode == 2, (r.returncode, r.stderr[-2000:])
    assert message in r.stderr and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert [ln for ln in r.stderr.splitlines() if ln.startswith("tdlight: error:")]
    assert not (tmp_path / "out" / "decompose").exists() or not any((tmp_path / "out" / "decompose").iterdir())


# --- the real MiniLM ------------------------------------------------------------------------

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
WIKI = DATA / "pretrain_corpus" / "enwiki_2015_wikiextractor_AA.txt.gz"
HELDOUT = DATA / "pretrain_corpus" / "wikitext103_heldout" / "wiki.valid.tokens.gz"


@pytest.mark.skipif(not WIKI.is_file() or not HELDOUT.is_file(), reason="../shared/data/pretrain_corpus is not present")
def test_real_minilm_frequency_vs_uniform_embedding_fit(minilm):
    """Measured on real text (the numbers are printed; RESULTS: benchmarks/embedding_fit.py): each fit is best
    on its own objective (a property of the math), and frequency weighting is compared with uniform on
    held-out text, whichever wins."""
    from tdlight.data.corpus.files import raw_lines
    from tdlight.data.vocab import count_tokens, token_stats

    model, tok = minilm
    E = model.get_input_embeddings().weight.detach()
    calib = token_stats(tok, WIKI, E.shape[0], what="calibration", max_chars=1_000_000)
    held = count_tokens(tok, (ln for i, ln in enumerate(raw_lines(HELDOUT)) if i < 3000), E.shape[0])
    uni, freq = fit_embedding(E, 128), fit_embedding(E, 128, row_weights(calib.counts))
    errors = {name: {"table": fit.rel_error,
                     "calibration": embedding_error(E, fit.A @ fit.B, calib.counts),
                     "heldout": embedding_error(E, fit.A @ fit.B, held)} for name, fit in (("uniform", uni),
                                                                                          ("frequency", freq))}
    print(json.dumps(errors, indent=1))
    assert errors["uniform"]["table"] < errors["frequency"]["table"]
    assert errors["frequency"]["calibration"] < errors["uniform"]["calibration"]
    for e in errors.values():
        assert all(0.1 < v < 1 for v in e.values())  # a real, lossy fit at r = D/3
    # what the fit buys on held-out text, measured: frequency weighting serves the tokens text reads
    assert errors["frequency"]["heldout"] < errors["uniform"]["heldout"]
