"""Token statistics of a text in a teacher's vocabulary, for compressing the word embeddings.

:func:`token_stats` tokenizes text files (the ``compression.vocab`` source, or the calibration
text) with the teacher's tokenizer and counts every token id: the kept set of a restricted
vocabulary is the ids seen plus the tokenizer's special tokens, and the counts weight the rows
of a ``frequency``-weighted low-rank fit (:mod:`tdlight.tensor.embedding`).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator

import torch

from tdlight.data.corpus.files import PathSpec, raw_lines, resolve_corpus_files
from tdlight.errors import DataError
from tdlight.tensor.embedding import TokenStats

BATCH_LINES = 1000


def _batches(lines: Iterable[str], size: int) -> Iterator[list[str]]:
    batch = []
    for line in lines:
        if line.strip():
            batch.append(line)
            if len(batch) == size:
                yield batch
                batch = []
    if batch:
        yield batch


def _lines(files, max_chars: int | None) -> Iterator[str]:
    used = 0
    for path in files:
        for line in raw_lines(path):
            if max_chars is not None and used >= max_chars:
                return
            used += len(line)
            yield line


def count_tokens(tokenizer, lines: Iterable[str], vocab_size: int) -> torch.Tensor:
    """(``vocab_size``,) float64 occurrences of each token id in ``lines`` (no special tokens added)."""
    counts = torch.zeros(vocab_size, dtype=torch.float64)
    for batch in _batches(lines, BATCH_LINES):
        ids = [i for seq in tokenizer(batch, add_special_tokens=False, verbose=False)["input_ids"] for i in seq]
        if not ids:
            continue
        t = torch.tensor(ids, dtype=torch.int64)
        if int(t.max()) >= vocab_size:
            raise DataError(f"the tokenizer gives id {int(t.max())}, beyond the model's {vocab_size} word embeddings: "
                            "tokenizer and model do not match")
        counts += torch.bincount(t, minlength=vocab_size).double()
    return counts


def token_stats(tokenizer, files: PathSpec, vocab_size: int, *, what: str = "compression.vocab",
                max_chars: int | None = None) -> TokenStats:
    """Token counts of the text in ``files`` (a path, directory, glob or list, as for corpus files; at
    most ``max_chars`` characters read, None: all), with the tokenizer's special ids and unknown id.

    A text that yields no token besides the special ones (an empty file, only unknown words) is a
    :class:`~tdlight.errors.DataError` naming ``what`` and the files."""
    if tokenizer is None:
        raise DataError(f"{what} needs the teacher's tokenizer to read its text; this teacher has none")
    paths = resolve_corpus_files(files, what=what)
    counts = count_tokens(tokenizer, _lines(paths, max_chars), vocab_size)
    special = tuple(sorted({int(i) for i in tokenizer.all_special_ids if i is not None and 0 <= i < vocab_size}))
    usable = counts.clone()
    usable[list(special)] = 0
    shown = ", ".join(os.fspath(p) for p in paths[:3]) + (" …" if len(paths) > 3 else "")
    if usable.sum() == 0:
        raise DataError(f"{what}: {shown} yields no usable token (nothing but special or unknown tokens once "
                        "tokenized); valid: a text file in the teacher's language, or null")
    unk = tokenizer.unk_token_id
    return TokenStats(counts, special, int(unk) if unk is not None else None, shown)
