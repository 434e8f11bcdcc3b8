"""GLUE tasks and their files (``tdlight/data/glue.py``): the task table and its names, the real
files in ``../shared/data/glue``, the tasks that come from the hub here (MNLI, QQP, QNLI train) on
files in their original layout, local and hub sources, and read errors that name file and line.
"""

from __future__ import annotations

import pytest

from tdlight.data.glue import GLUE_TASKS, TASKS, get_task, load_split, read_tsv
from tdlight.errors import DataError
from tests.conftest import GLUE, ORIGINAL_FORMAT, needs_data, write_file


# --- the task table --------------------------------------------------------------------------


def test_the_task_table_holds_the_nine_glue_tasks_and_ax():
    assert sorted(TASKS) == sorted(["cola", "sst2", "mrpc", "stsb", "qqp", "mnli", "qnli", "rte", "wnli", "ax"])
    assert "ax" not in GLUE_TASKS and len(GLUE_TASKS) == 9
    assert get_task("SST-2") is TASKS["sst2"] and get_task("STS-B").is_regression and get_task("CoLA").num_labels == 2
    assert get_task("mnli").validation_splits == ("validation_matched", "validation_mismatched")
    assert get_task("mnli").num_labels == 3 and get_task("stsb").num_labels == 1
    with pytest.raises(DataError, match=r"unknown GLUE task 'glue'; valid: \['ax', 'cola'"):
        get_task("glue")


def test_task_names_are_case_hyphen_and_underscore_insensitive():
    assert get_task("STS_B") is get_task("sts-b") is TASKS["stsb"]
    assert get_task(TASKS["qqp"]) is TASKS["qqp"]
    assert TASKS["ax"].validation_splits == () and TASKS["ax"].hub_config == "ax"
    assert TASKS["mnli"].labels == ("entailment", "neutral", "contradiction")
    with pytest.raises(DataError, match=r"unknown GLUE task 'mnli-m'; valid: \[.*'wnli'\]"):
        get_task("mnli-m")


# --- the real files --------------------------------------------------------------------------


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


# --- the tasks that come from the hub here, in their original TSV layout ---------------------


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
    header = ORIGINAL_FORMAT[("mnli", "validation_matched")][0][0]
    f = write_file(tmp_path / "MNLI/dev_matched.tsv", [header, lines[1]])
    with pytest.raises(DataError, match=rf"{f}:2: expected 16 tab-separated columns for mnli validation_matched, "
                                        r"found 12"):
        load_split("mnli", "validation_matched", data_dir=tmp_path, source="local")
    with pytest.raises(DataError, match=r"task 'mnli' has no split 'validation'; valid: \['train', "
                                        r"'validation_matched', 'validation_mismatched', 'test_matched'"):
        load_split("mnli", "validation", data_dir=tmp_path, source="local")


# --- sources: .tsv, .tsv.gz, the hub, missing files ------------------------------------------


def test_tsv_preferred_over_gz_and_both_read(tmp_path):
    head = "sentence\tlabel\n"
    write_file(tmp_path / "SST-2/dev.tsv.gz", head + "from gz\t1\n", gz=True)
    assert load_split("sst2", "validation", data_dir=tmp_path, source="local")["sentence"] == ["from gz"]
    write_file(tmp_path / "SST-2/dev.tsv", head + "plain\t0\n")
    assert load_split("sst2", "validation", data_dir=tmp_path, source="local")["sentence"] == ["plain"]


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


# --- read errors -----------------------------------------------------------------------------


@pytest.mark.parametrize("gz", [False, True])
def test_malformed_files_name_file_and_line(tmp_path, gz):
    ext = ".tsv.gz" if gz else ".tsv"
    head = "index\tsentence1\tsentence2\tlabel\n"
    f = write_file(tmp_path / f"RTE/train{ext}", head + '0\t"quoted start\tb\tentailment\n1\tonly two\n', gz)
    with pytest.raises(DataError, match=rf"{f}:3: expected 4 tab-separated columns for rte train, found 2"):
        read_tsv("rte", "train", f)
    f = write_file(tmp_path / f"bad/train{ext}", head + "0\ta\tb\tentailment\n1\ta\tb\tmaybe\n", gz)
    with pytest.raises(DataError, match=rf"{f}:3: label 'maybe' is not one of rte's labels \['entailment', 'not_entailment'\]"):
        read_tsv("rte", "train", f)
    f = write_file(tmp_path / f"empty/train{ext}", "", gz)
    with pytest.raises(DataError, match=rf"{f}: no data rows"):
        read_tsv("rte", "train", f)
    sts = "index\tgenre\tfilename\tyear\told_index\tsource1\tsource2\tsentence1\tsentence2\tscore\n"
    f = write_file(tmp_path / f"sts/train{ext}", sts + "0\tg\tf\ty\to\ts\ts\ta\tb\tfive\n", gz)
    with pytest.raises(DataError, match=rf"{f}:2: score 'five' is not a number"):
        read_tsv("stsb", "train", f)
    # quoting is off: a leading quote is part of the text, as in the real files
    ok = write_file(tmp_path / f"RTE2/train{ext}", head + '0\t"quoted start\tb\tentailment\n', gz)
    assert read_tsv("rte", "train", ok)["sentence1"] == ['"quoted start']


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
    f = write_file(tmp_path / "lone_cr.tsv", [head, "0\ta\rb\tc\tentailment"])  # a bare CR inside a field
    with pytest.raises(DataError, match=rf"{f}:2: cannot parse the line"):
        read_tsv("rte", "train", f)
    # a header-only file has no data rows
    f = write_file(tmp_path / "header_only.tsv.gz", [head], gz=True)
    with pytest.raises(DataError, match=rf"{f}: no data rows"):
        read_tsv("rte", "train", f)


def test_crlf_files_and_blank_lines_read_cleanly(tmp_path):
    f = write_file(tmp_path / "crlf.tsv", ["index\tsentence1\tsentence2\tlabel", "0\ta\tb\tnot_entailment", "",
                                           "1\tc\td\tentailment"], newline="\r\n")
    out = read_tsv("rte", "train", f)
    assert out == {"sentence1": ["a", "c"], "sentence2": ["b", "d"], "label": [1, 0], "idx": [0, 1]}
