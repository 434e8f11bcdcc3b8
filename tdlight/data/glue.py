"""The GLUE tasks: a registry (columns, labels, metrics, splits) and two sources behind one reader.

``load_split(task, split, data_dir=..., source=...)`` returns a ``datasets.Dataset`` with
the task's text columns (named as in the hub dataset ``nyu-mll/glue``), ``label`` (class
index, in the hub's label order; a float for STS-B; -1 / -1.0 for unlabelled test rows)
and ``idx``. Sources:

* ``local``: ``<data_dir>/<Task>/<file>.tsv`` or ``.tsv.gz`` in the original GLUE
  layout (as written by ``download_glue_data.py``), read with quoting off — some
  sentences start with a ``"`` — CoLA train/dev without a header, the MRPC header with a
  UTF-8 BOM;
* ``hub``: ``datasets.load_dataset("nyu-mll/glue", <config>)`` (needs a network once);
* ``auto``: the local file when it exists, else the hub unless offline.

The TSV reader is hand-written (``csv`` with QUOTE_NONE) rather than
``datasets.load_dataset("csv")`` because the GLUE files need per-file quirks (no header,
BOM, varying column counts per split) and every malformed row must be reported with its
file and line number.
"""

from __future__ import annotations

import csv
import gzip
import math
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from tdlight.errors import DataError

HUB_DATASET = "nyu-mll/glue"
MISSING_LOCALLY = ("MNLI", "QQP", "QNLI train")


@dataclass(frozen=True)
class FileLayout:
    """Where the fields are in one split's TSV: column count, text columns, label column."""

    columns: int
    text: tuple[int, ...]
    label: int | None  # None: unlabelled (test)
    header: bool = True


@dataclass(frozen=True)
class GlueTask:
    name: str  # registry key, also the hub config name
    dir_name: str  # folder in the GLUE TSV layout
    text_columns: tuple[str, ...]  # column names, as in nyu-mll/glue
    labels: tuple[str, ...] | None  # TSV label values in class-index order; None: regression
    metrics: tuple[str, ...]  # official metric names, in the order GLUE reports them
    splits: dict[str, str]  # split -> file stem
    layouts: dict[str, FileLayout]  # split -> file layout
    # a similarity regression on sentence pairs: the top of its label range (the bottom is 0), the scale of a
    # bi-encoder's cosine (task.pair_encoding=bi, tdlight.model.pairs); None for every other task
    similarity_scale: float | None = None

    @property
    def hub_config(self) -> str:
        return self.name

    @property
    def is_regression(self) -> bool:
        return self.labels is None

    @property
    def num_labels(self) -> int:
        return 1 if self.labels is None else len(self.labels)

    @property
    def validation_splits(self) -> tuple[str, ...]:
        return tuple(s for s in self.splits if s.startswith("validation"))

    @property
    def test_splits(self) -> tuple[str, ...]:
        return tuple(s for s in self.splits if s.startswith("test"))


def _std(text: tuple[int, ...], label: int, columns: int, test_text: tuple[int, ...], test_columns: int,
         header: bool = True) -> dict[str, FileLayout]:
    return {
        "train": FileLayout(columns, text, label, header),
        "validation": FileLayout(columns, text, label, header),
        "test": FileLayout(test_columns, test_text, None),
    }


_SPLITS = {"train": "train", "validation": "dev", "test": "test"}
_BINARY = ("0", "1")
_NLI3 = ("entailment", "neutral", "contradiction")
_NLI2 = ("entailment", "not_entailment")

TASKS: dict[str, GlueTask] = {
    t.name: t
    for t in [
        GlueTask("cola", "CoLA", ("sentence",), _BINARY, ("matthews_correlation",), _SPLITS,
                 _std((3,), 1, 4, (1,), 2, header=False)),
        GlueTask("sst2", "SST-2", ("sentence",), _BINARY, ("accuracy",), _SPLITS, _std((0,), 1, 2, (1,), 2)),
        GlueTask("mrpc", "MRPC", ("sentence1", "sentence2"), _BINARY, ("f1", "accuracy"), _SPLITS,
                 _std((3, 4), 0, 5, (3, 4), 5)),
        GlueTask("stsb", "STS-B", ("sentence1", "sentence2"), None, ("pearson", "spearman"), _SPLITS,
                 _std((7, 8), 9, 10, (7, 8), 9), similarity_scale=5.0),
        GlueTask("qqp", "QQP", ("question1", "question2"), _BINARY, ("f1", "accuracy"), _SPLITS,
                 _std((3, 4), 5, 6, (1, 2), 3)),
        GlueTask("mnli", "MNLI", ("premise", "hypothesis"), _NLI3, ("accuracy",),
                 {"train": "train", "validation_matched": "dev_matched", "validation_mismatched": "dev_mismatched",
                  "test_matched": "test_matched", "test_mismatched": "test_mismatched"},
                 {"train": FileLayout(12, (8, 9), 11), "validation_matched": FileLayout(16, (8, 9), 15),
                  "validation_mismatched": FileLayout(16, (8, 9), 15), "test_matched": FileLayout(10, (8, 9), None),
                  "test_mismatched": FileLayout(10, (8, 9), None)}),
        GlueTask("qnli", "QNLI", ("question", "sentence"), _NLI2, ("accuracy",), _SPLITS,
                 _std((1, 2), 3, 4, (1, 2), 3)),
        GlueTask("rte", "RTE", ("sentence1", "sentence2"), _NLI2, ("accuracy",), _SPLITS, _std((1, 2), 3, 4, (1, 2), 3)),
        GlueTask("wnli", "WNLI", ("sentence1", "sentence2"), _BINARY, ("accuracy",), _SPLITS,
                 _std((1, 2), 3, 4, (1, 2), 3)),
        GlueTask("ax", "diagnostic", ("premise", "hypothesis"), _NLI3, ("matthews_correlation",),
                 {"test": "diagnostic"}, {"test": FileLayout(3, (1, 2), None)}),
    ]
}

# The task scores the GLUE average is made of (AX is a diagnostic, not part of it).
GLUE_TASKS = tuple(t for t in TASKS if t != "ax")


def get_task(name: str | GlueTask) -> GlueTask:
    """A task by name, case- and hyphen-insensitive (``SST-2``, ``sts-b``, ``CoLA``)."""
    if isinstance(name, GlueTask):
        return name
    key = str(name).lower().replace("-", "").replace("_", "")
    if key in TASKS:
        return TASKS[key]
    raise DataError(f"unknown GLUE task {name!r}; valid: {sorted(TASKS)}")


def _offline() -> bool:
    return any(os.environ.get(v, "").lower() in ("1", "true", "yes") for v in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE"))


def local_file(task: GlueTask, split: str, data_dir: str | os.PathLike) -> Path | None:
    """The local TSV of a split (``.tsv`` preferred over ``.tsv.gz``), or ``None``."""
    base = Path(data_dir) / task.dir_name / task.splits[split]
    for p in (base.with_suffix(".tsv"), Path(f"{base}.tsv.gz")):
        if p.is_file():
            return p
    return None


def _lines(path: Path) -> Iterator[str]:
    """The file's physical lines (split at newlines only, as ``wc -l`` and ``sed -n Np`` count them), decoded.

    Each line is decoded on its own so an encoding error names its exact line; the
    UTF-8 BOM the MRPC header starts with is dropped.
    """
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        for number, raw in enumerate(f, 1):
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise DataError(f"{path}:{number}: not UTF-8 text ({e.reason} at byte {e.start} of the line)") from e
            yield text[1:] if number == 1 and text.startswith("\ufeff") else text


def _rows(path: Path) -> Iterator[tuple[int, list[str]]]:
    """``(1-based line number, fields)`` per line, split on tabs with quoting off."""
    reader = csv.reader(_lines(path), delimiter="\t", quoting=csv.QUOTE_NONE)
    try:
        for row in reader:
            yield reader.line_num, row
    except csv.Error as e:  # raised while parsing the line just read
        raise DataError(f"{path}:{reader.line_num}: cannot parse the line: {e}") from e
    except (EOFError, OSError) as e:  # gzip/IO errors while fetching the next line
        raise DataError(f"{path}:{reader.line_num + 1}: cannot read the file: {e}") from e


def read_tsv(task: GlueTask | str, split: str, path: str | os.PathLike) -> dict[str, list]:
    """Parse one GLUE TSV into columns (text columns, ``label``, ``idx``), checking every row."""
    task = get_task(task)
    layout = task.layouts[split]
    path = Path(path)
    texts: list[list[str]] = [[] for _ in layout.text]
    labels: list = []
    label_index = {v: i for i, v in enumerate(task.labels)} if task.labels else None
    first = True
    for line, row in _rows(path):
        if first and layout.header:
            first = False
            continue
        first = False
        if not row or row == [""]:
            continue  # a blank line (e.g. a trailing newline)
        if len(row) != layout.columns:
            raise DataError(
                f"{path}:{line}: expected {layout.columns} tab-separated columns for {task.name} {split}, "
                f"found {len(row)}"
            )
        for out, c in zip(texts, layout.text):
            out.append(row[c])
        if layout.label is None:
            labels.append(-1.0 if task.is_regression else -1)
            continue
        raw = row[layout.label].strip()
        if label_index is not None:
            if raw not in label_index:
                raise DataError(f"{path}:{line}: label {raw!r} is not one of {task.name}'s labels {list(task.labels)}")
            labels.append(label_index[raw])
        else:
            try:
                value = float(raw)
            except ValueError:
                value = math.nan
            if not math.isfinite(value):
                raise DataError(f"{path}:{line}: score {raw!r} is not a number (STS-B scores are in [0, 5])")
            labels.append(value)
    if not labels:
        raise DataError(f"{path}: no data rows (the file is empty)")
    out = {name: col for name, col in zip(task.text_columns, texts)}
    out["label"] = labels
    out["idx"] = list(range(len(labels)))
    return out


def resolve_source(task: GlueTask, split: str, data_dir: str | os.PathLike | None, source: str) -> tuple[str, Path | None]:
    """``("local", file)`` or ``("hub", None)`` for a split, or a :class:`DataError` that says how to fix it."""
    if source not in ("auto", "local", "hub"):
        raise DataError(f"unknown data source {source!r}; valid: auto, local, hub")
    if split not in task.splits:
        raise DataError(f"task {task.name!r} has no split {split!r}; valid: {list(task.splits)}")
    if source == "hub":
        return "hub", None
    found = local_file(task, split, data_dir) if data_dir is not None else None
    if found is not None:
        return "local", found
    if source == "auto" and not _offline():
        return "hub", None
    base = Path(data_dir or "<paths.data_dir>/glue") / task.dir_name / task.splits[split]
    raise DataError(
        f"no local file for {task.name} {split}: looked for {base}.tsv and {base}.tsv.gz"
        f"{' (offline, so the hub is not an option)' if source == 'auto' else ''}. The shared data directory "
        f"lacks {', '.join(MISSING_LOCALLY)}. Put the GLUE TSV files there (as download_glue_data.py writes "
        f"them), point paths.data_dir at a directory that has them, or go online (task.source=hub or auto "
        f"without HF_DATASETS_OFFLINE/HF_HUB_OFFLINE)"
    )


def task_text(task: GlueTask | str, split: str, *, data_dir: str | os.PathLike | None, source: str = "auto") -> list[str]:
    """One line of text per example of a split: its text columns (both sentences of a pair) joined by a
    space — calibration text in the task's own domain (``stage.calibration_files=task``)."""
    task = get_task(task)
    ds = load_split(task, split, data_dir=data_dir, source=source)
    columns = [ds[c] for c in task.text_columns]
    return [" ".join(" ".join(str(t).split()) for t in texts) for texts in zip(*columns)]


def load_split(task: GlueTask | str, split: str, *, data_dir: str | os.PathLike | None, source: str = "auto"):
    """One split as a ``datasets.Dataset`` (columns: text columns, ``label``, ``idx``)."""
    import datasets

    task = get_task(task)
    kind, path = resolve_source(task, split, data_dir, source)
    if kind == "local":
        return datasets.Dataset.from_dict(read_tsv(task, split, path))
    try:
        ds = datasets.load_dataset(HUB_DATASET, task.hub_config, split=split)
    except Exception as e:  # the hub raises many types (connection, missing config...)
        raise DataError(f"could not load {HUB_DATASET}/{task.hub_config} split {split!r} from the hub: {e}") from e
    return ds.select_columns([*task.text_columns, "label", "idx"])


def extra_text_source(text: str, task: GlueTask | str, key: str = "stage.extra_text") -> tuple[GlueTask, str]:
    """``(task, split)`` of one ``stage.extra_text`` entry: ``"<split>"`` (the run's own task) or
    ``"<task>:<split>"`` — inputs for the teacher to score (their labels are never read). Refused: a split
    the task lacks, the run's own training split (already trained on) and validation splits (the dev set the
    student is scored on), and a task whose examples have another number of text columns."""
    own = get_task(task)
    name, sep, split = str(text).rpartition(":")
    source = get_task(name) if sep else own
    where = f"{key} entry {text!r}"
    if not split:
        raise DataError(f"{where}: no split; valid: '<split>' (the run's task) or '<task>:<split>', e.g. 'test' "
                        f"or 'qnli:validation'")
    if split not in source.splits:
        raise DataError(f"{where}: task {source.name!r} has no split {split!r}; valid: {list(source.splits)}")
    if source.name == own.name and (split == "train" or split in own.validation_splits):
        raise DataError(f"{where}: {own.name}'s {'training split is trained on already' if split == 'train' else 'dev split is what the student is scored on'}; "
                        f"valid: {[s for s in own.splits if s != 'train' and s not in own.validation_splits]} or "
                        "another task's split ('<task>:<split>')")
    if len(source.text_columns) != len(own.text_columns):
        raise DataError(f"{where}: {source.name} has {len(source.text_columns)} text column(s), {own.name} has "
                        f"{len(own.text_columns)}; valid: a task with as many "
                        f"({sorted(t.name for t in TASKS.values() if len(t.text_columns) == len(own.text_columns))})")
    return source, split
