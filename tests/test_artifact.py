"""What the user takes home: files readable as the umask says, directories that load outside tdlight."""

from __future__ import annotations

import os
import stat

import pytest

from tdlight.files import atomic_directory, atomic_write_text


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

def _tokenizer(tmp_path):
    from transformers import BertTokenizerFast

    vocab = tmp_path / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + [f"w{i}" for i in range(94)]))
    return BertTokenizerFast(vocab_file=str(vocab))


def _kinds(tmp_path):
    """The directory kinds tdlight writes, on tiny random BERTs: (name, path, Auto class, reference model)."""
    import copy

    import torch
    from transformers import BertForSequenceClassification, BertModel

    from conftest import tiny_config
    from tdlight.model.io import save_model
    from tdlight.model.pooling import set_pooling
    from tdlight.model.surgery import compress
    from tdlight.tensor.spec import CompressionSpec

    tok = _tokenizer(tmp_path)
    torch.manual_seed(0)
    plain = BertForSequenceClassification(tiny_config(num_labels=3)).eval()
    teacher = set_pooling(copy.deepcopy(plain), "mean")  # a fine-tuned mean-pooling teacher
    student = copy.deepcopy(teacher)
    compress(student, CompressionSpec(variant="tucker", rank=8, bank=6))
    encoder = BertModel(tiny_config()).eval()
    compress(encoder, CompressionSpec(variant="shared", rank=12, grouping="type"))
    kinds = [("plain", plain, "AutoModelForSequenceClassification"),
             ("teacher", teacher, "AutoModelForSequenceClassification"),
             ("student", student, "AutoModelForSequenceClassification"),
             ("encoder", encoder, "AutoModel")]
    return [(name, save_model(model, tok, tmp_path / name), auto, model) for name, model, auto in kinds]


def _feeds():
    import torch

    g = torch.Generator().manual_seed(3)
    ids = torch.randint(5, 99, (3, 10), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    return {"input_ids": ids, "attention_mask": mask}


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


def test_every_directory_loads_outside_tdlight_with_the_same_outputs(tmp_path):
    """A fresh process that never imports tdlight: without trust_remote_code a directory that needs
    tdlight is refused (never random weights), with it the outputs equal tdlight's (atol 1e-5);
    save_pretrained there writes a directory both loaders read back; mean-pooling directories
    load in sentence-transformers with the same embeddings."""
    import json
    import subprocess
    import sys

    import torch

    pytest.importorskip("sentence_transformers")
    feeds = _feeds()
    sentences = ["w1 w2 w3 w4", "w7 w8", "w50 w51 w52 w53 w54 w55 w56"]
    kinds = _kinds(tmp_path)
    job = {"dirs": [{"path": str(path), "auto": auto, "feeds": {k: v.tolist() for k, v in feeds.items()},
                     "resave": str(tmp_path / f"{name}-resaved"),
                     "sentences": sentences if name in ("teacher", "student") else None}
                    for name, path, auto, _ in kinds]}
    (tmp_path / "job.json").write_text(json.dumps(job))
    env = {**os.environ, "PYTHONPATH": ""}
    proc = subprocess.run([sys.executable, os.path.join(os.path.dirname(__file__), "artifact_outsider.py"),
                           str(tmp_path / "job.json"), str(tmp_path / "out.json")], env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads((tmp_path / "out.json").read_text())
    tok = _tokenizer(tmp_path)
    for name, path, auto, model in kinds:
        r = out[str(path)]
        needs = name != "plain"
        assert ("refused" in r) == needs, (name, r.get("plain_class"))
        if needs:
            assert "trust_remote_code=True" in r["refused"]
            assert (path / "modeling_tdlight.py").is_file()
        else:  # a dense [CLS] classifier stays a plain HF directory: transformers' own class reads it right
            assert r["plain_class"] == "BertForSequenceClassification"
            assert not (path / "modeling_tdlight.py").exists()
        with torch.no_grad():
            want = model(**feeds)[0]
            mine = _tdlight_load(path)(**feeds)[0]
            again = _tdlight_load(tmp_path / f"{name}-resaved")(**feeds)[0]  # transformers' save, tdlight's load
        torch.testing.assert_close(mine, want, atol=1e-5, rtol=0)
        torch.testing.assert_close(torch.tensor(r["output"]), want, atol=1e-5, rtol=0)
        torch.testing.assert_close(again, want, atol=1e-5, rtol=0)
        if name in ("teacher", "student"):
            torch.testing.assert_close(torch.tensor(r["st"]), _mean_embedding(model, tok, sentences), atol=1e-5,
                                       rtol=0)
