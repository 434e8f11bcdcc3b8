"""What the user takes home: files readable as the umask says, directories that load outside tdlight."""

from __future__ import annotations

import os
import stat

import pytest

from tdlight.files import atomic_directory, atomic_write_text
from tests.conftest import tiny_tokenizer


@pytest.fixture
def umask():
    """Set the process umask for one test and put the old one back."""
    old = os.umask(0o022)
    os.umask(old)
    yield lambda m: os.umask(m)
    os.umask(old)


@pytest.mark.parametrize("mask", [0o022, 0o027, 0o077])
def test_atomic_writers_honour_the_umask(tmp_path, umask, mask):
    umask(mask)
    f = atomic_write_text(tmp_path / "a.json", "{}")
    d = atomic_directory(tmp_path / "model", lambda tmp: (tmp / "w.bin").write_bytes(b"x"))
    assert stat.S_IMODE(f.stat().st_mode) == 0o666 & ~mask
    assert stat.S_IMODE(d.stat().st_mode) == 0o777 & ~mask
    assert stat.S_IMODE((d / "w.bin").stat().st_mode) == 0o666 & ~mask


# --- every directory tdlight writes loads in transformers and sentence-transformers, or is refused ---

def _kinds(tmp_path):
    """The directory kinds tdlight writes, on tiny random BERTs: (name, path, Auto class, reference model)."""
    import copy

    import torch
    from transformers import BertForSequenceClassification, BertModel

    from tests.conftest import tiny_config
    from tdlight.model.io import save_model
    from tdlight.model.pooling import set_pooling
    from tdlight.model.surgery import compress
    from tdlight.tensor.spec import CompressionSpec

    tok = tiny_tokenizer(tmp_path)
    torch.manual_seed(0)
    plain = BertForSequenceClassification(tiny_config(num_labels=3)).eval()
    teacher = set_pooling(copy.deepcopy(plain), "mean")  # a fine-tuned mean-pooling teacher
    student = copy.deepcopy(teacher)
    compress(student, CompressionSpec(variant="tucker", rank=8, bank=6, embedding_rank=16))  # the whole model
    encoder = BertModel(tiny_config()).eval()
    compress(encoder, CompressionSpec(variant="shared", rank=12, grouping="type"))
    kinds = [("plain", plain, "AutoModelForSequenceClassification", "fp32"),
             ("teacher", teacher, "AutoModelForSequenceClassification", "fp32"),
             ("student", student, "AutoModelForSequenceClassification", "fp32"),
             ("student-int8", student, "AutoModelForSequenceClassification", "int8"),
             ("encoder", encoder, "AutoModel", "fp32")]
    return [(name, save_model(model, tok, tmp_path / name, precision=p), auto, model) for name, model, auto, p in kinds]


def _tdlight_load(path):
    from tdlight.model.io import META, load_compressed
    from tdlight.model.teacher import load_teacher

    return load_compressed(path, execution="factorized") if (path / META).is_file() else load_teacher(str(path))[0]


def _mean_embedding(model, tok, sentences):
    import torch

    enc = tok(sentences, padding=True, return_tensors="pt")
    base = getattr(model, "base_model", model)
    with torch.no_grad():
        h = base(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).last_hidden_state
    w = enc["attention_mask"][..., None].float()
    return (h * w).sum(1) / w.sum(1)


def test_every_directory_loads_outside_tdlight_with_the_same_outputs(tmp_path, token_ids):
    """A fresh process that never imports tdlight: without trust_remote_code a directory that needs
    tdlight is refused (never random weights), with it the outputs equal tdlight's (atol 1e-5);
    save_pretrained there writes a directory both loaders read back; mean-pooling directories
    load in sentence-transformers with the same embeddings."""
    import json
    import subprocess
    import sys

    import torch

    pytest.importorskip("sentence_transformers")
    feeds = token_ids
    sentences = ["w1 w2 w3 w4", "w7 w8", "w50 w51 w52 w53 w54 w55 w56"]
    kinds = _kinds(tmp_path)
    job = {"dirs": [{"path": str(path), "auto": auto, "feeds": {k: v.tolist() for k, v in feeds.items()},
                     "resave": str(tmp_path / f"{name}-resaved"), "texts": sentences,
                     "sentences": sentences if name in ("teacher", "student") else None}
                    for name, path, auto, _ in kinds]}
    (tmp_path / "job.json").write_text(json.dumps(job))
    env = {**os.environ, "PYTHONPATH": ""}
    proc = subprocess.run([sys.executable, os.path.join(os.path.dirname(__file__), "artifact_outsider.py"),
                           str(tmp_path / "job.json"), str(tmp_path / "out.json")], env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    # the loads without the flag stop to ask (and are refused); none given the flag does, the tokenizer's included
    _, sep, after = proc.stdout.partition("--- loads with trust_remote_code=True ---")  # artifact_outsider.WITH_FLAG
    assert sep and "Do you wish to run the custom code" not in after
    out = json.loads((tmp_path / "out.json").read_text())
    tok = tiny_tokenizer(tmp_path)
    for name, path, auto, model in kinds:
        r = out[str(path)]
        assert r["ids"] == [tok(t)["input_ids"] for t in sentences], name  # AutoTokenizer, flag given
        needs = name != "plain"
        assert ("refused" in r) == needs, (name, r.get("plain_class"))
        if needs:
            assert "trust_remote_code=True" in r["refused"]
            assert (path / "modeling_tdlight.py").is_file()
        else:  # a dense [CLS] classifier stays a plain HF directory: transformers' own class reads it right
            assert r["plain_class"] == "BertForSequenceClassification"
            assert not (path / "modeling_tdlight.py").exists()
        with torch.no_grad():
            mine = _tdlight_load(path)(**feeds)[0]
            want = model(**feeds)[0] if name != "student-int8" else mine  # int8: as tdlight decodes it
            again = _tdlight_load(tmp_path / f"{name}-resaved")(**feeds)[0]  # transformers' save, tdlight's load
        torch.testing.assert_close(mine, want, atol=1e-5, rtol=0)
        torch.testing.assert_close(torch.tensor(r["output"]), want, atol=1e-5, rtol=0)
        torch.testing.assert_close(again, want, atol=1e-5, rtol=0)
        if name in ("teacher", "student"):
            torch.testing.assert_close(torch.tensor(r["st"]), _mean_embedding(model, tok, sentences), atol=1e-5,
                                       rtol=0)


# --- storage precision: fp32, fp16, bf16, int8 weight-only with per-channel scales ---

def test_int8_quantization_is_within_half_a_step_per_channel():
    import torch

    from tdlight.tensor.precision import decode, dequantize_int8, encode, quantize_int8

    g = torch.Generator().manual_seed(0)
    t = torch.randn(5, 7, 33, generator=g) * torch.logspace(-3, 2, 7)[None, :, None]  # rows of very different scale
    t[0, 0] = 0.0  # an all-zero row
    q, scale = quantize_int8(t)
    assert q.dtype == torch.int8 and scale.shape == (5, 7)
    err = (dequantize_int8(q, scale) - t).abs()
    assert torch.all(err <= scale[..., None] / 2 + 1e-7)  # half a step of its own row, however small the row
    assert torch.all(dequantize_int8(q, scale)[0, 0] == 0)
    state = {"w": t, "b": torch.randn(7, generator=g), "ids": torch.arange(4)}
    stored = encode(state, "int8")
    assert sorted(stored) == ["b", "ids", "w", "w:int8_scale"] and stored["b"].dtype == torch.float32
    back = decode(stored)
    assert torch.equal(back["b"], state["b"]) and torch.equal(back["ids"], state["ids"])
    torch.testing.assert_close(back["w"], dequantize_int8(q, scale))
    for p, dtype in (("fp16", torch.float16), ("bf16", torch.bfloat16)):
        s = encode(state, p)
        assert s["w"].dtype == dtype and s["ids"].dtype == torch.int64 and decode(s)["w"].dtype == torch.float32
    assert all(torch.equal(encode(state, "fp32")[k], v) for k, v in state.items())
    with pytest.raises(ValueError, match=r"precision='int4'; valid: \['fp32', 'fp16', 'bf16', 'int8'\]"):
        encode(state, "int4")


@pytest.mark.parametrize("precision, atol, size", [("fp32", 1e-6, 1.0), ("fp16", 5e-3, 0.5), ("bf16", 5e-2, 0.5),
                                                   ("int8", 5e-2, 0.4)])
def test_saved_precision_loads_back_in_fp32(tmp_path, tiny_classifier, token_ids, precision, atol, size):
    import json

    import torch

    from tdlight.model.io import load_compressed, save_compressed
    from tdlight.model.pooling import set_pooling
    from tdlight.model.surgery import compress
    from tdlight.tensor.spec import CompressionSpec

    set_pooling(tiny_classifier, "mean")
    compress(tiny_classifier, CompressionSpec(variant="tucker", rank=16, bank=12))
    ref = save_compressed(tiny_classifier, tmp_path / "fp32-ref")
    path = save_compressed(tiny_classifier, tmp_path / precision, precision=precision)
    assert json.loads((path / "tdlight.json").read_text())["precision"] == precision
    assert json.loads((path / "config.json").read_text()).get("tdlight_precision", "fp32") == precision
    ratio = _data_bytes(path / "model.safetensors") / _data_bytes(ref / "model.safetensors")
    assert ratio <= size + 0.01, ratio  # int8 on a 32-wide tiny model: 1/4 + a 4-byte scale per 32 entries
    loaded = load_compressed(path, execution="factorized")
    assert all(p.dtype == torch.float32 for p in loaded.parameters())
    feeds = token_ids
    with torch.no_grad():
        want = tiny_classifier(**feeds).logits
        got = loaded(**feeds).logits
    torch.testing.assert_close(got, want, atol=atol, rtol=0)
    if precision != "fp32":
        assert not torch.equal(got, want)  # it really was stored at lower precision


def _data_bytes(path) -> int:
    from safetensors import safe_open

    from tdlight.tensor.precision import stored_bytes

    with safe_open(str(path), framework="pt") as f:
        return stored_bytes({k: f.get_tensor(k) for k in f.keys()})


def test_unknown_precision_writes_nothing(tmp_path, tiny_classifier):
    from tdlight.errors import ArtifactError
    from tdlight.model.io import save_model

    with pytest.raises(ArtifactError, match=r"precision='fp8'; valid: \['fp32', 'fp16', 'bf16', 'int8'\]"):
        save_model(tiny_classifier, None, tmp_path / "m", precision="fp8")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_real_minilm_directories_load_outside_tdlight(tmp_path, minilm):
    """The real MiniLM: its fine-tuning shape (a mean-pooling classifier) and a whole-model student
    (paper_1_48 encoder, rank-64 embeddings, int8) load in transformers and sentence-transformers with
    tdlight's outputs; the teacher's sentence embeddings are the sentence-transformers package's own."""
    import copy
    import json
    import subprocess
    import sys

    import torch

    from tdlight.model.io import save_model
    from tdlight.model.pooling import set_pooling
    from tdlight.model.surgery import compress
    from tdlight.model.teacher import as_classifier
    from tdlight.tensor.spec import CompressionSpec

    st = pytest.importorskip("sentence_transformers")
    model, tok = minilm
    teacher = set_pooling(as_classifier(copy.deepcopy(model), 2).eval(), "mean")
    student = copy.deepcopy(teacher)
    compress(student, CompressionSpec(variant="tucker", rank=83, bank=18, embedding_rank=64))
    kinds = [("teacher", teacher, "fp32"), ("student", student, "fp32"), ("student-int8", student, "int8")]
    sentences = ["a gripping, funny film", "the plot goes nowhere.", "it is what it is"]
    enc = tok(sentences, padding=True, return_tensors="pt")
    feeds = {k: enc[k].tolist() for k in ("input_ids", "attention_mask")}
    dirs = {name: save_model(m, tok, tmp_path / name, precision=p) for name, m, p in kinds}
    job = {"dirs": [{"path": str(d), "auto": "AutoModelForSequenceClassification", "feeds": feeds,
                     "sentences": sentences} for d in dirs.values()]}
    (tmp_path / "job.json").write_text(json.dumps(job))
    proc = subprocess.run([sys.executable, os.path.join(os.path.dirname(__file__), "artifact_outsider.py"),
                           str(tmp_path / "job.json"), str(tmp_path / "out.json")], capture_output=True, text=True,
                          timeout=1200)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads((tmp_path / "out.json").read_text())
    ids = {k: torch.tensor(v) for k, v in feeds.items()}
    for name, d in dirs.items():
        r = out[str(d)]
        assert "trust_remote_code=True" in r["refused"]
        mine = _tdlight_load(d)
        with torch.no_grad():
            want = mine(**ids).logits
        torch.testing.assert_close(torch.tensor(r["output"]), want, atol=1e-5, rtol=0)
        torch.testing.assert_close(torch.tensor(r["st"]), _mean_embedding(mine, tok, sentences), atol=1e-5, rtol=0)
    # the teacher's embeddings are all-MiniLM-L6-v2's own (before its Normalize module)
    from tdlight.model.teacher import embedded_path

    reference = st.SentenceTransformer(embedded_path("minilm"), device="cpu")
    want = reference.encode(sentences, convert_to_tensor=True, normalize_embeddings=True)
    got = torch.nn.functional.normalize(torch.tensor(out[str(dirs["teacher"])]["st"]), dim=-1)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
