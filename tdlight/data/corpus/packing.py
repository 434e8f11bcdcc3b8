"""Packing: paragraphs to sequences of exactly ``max_length`` token ids, block by block.

Within a block (see :mod:`tdlight.data.corpus.documents`) the paragraphs are tokenized
without special tokens (256 lines per tokenizer call), concatenated into one token stream
with a ``[SEP]`` between consecutive documents (none at the start of a block), and cut into
sequences of exactly ``max_length`` ids::

    [CLS] t_1 ... t_{max_length-2} [SEP]

so the inner ids of a block's consecutive sequences concatenate to the block's stream. The
tail of a block that does not fill a sequence is dropped (about half a sequence per block:
~0.1% of the Wikipedia extract at the defaults); sequences never cross a block boundary.
Packing per block makes the set of sequences independent of how the stream is sharded.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

from tdlight.data.corpus.documents import Paragraph

TOKENIZE_BATCH_LINES = 256


def pack_sequences(paragraphs: Iterable[Paragraph], tokenizer: Any, max_length: int,
                   batch_lines: int = TOKENIZE_BATCH_LINES) -> Iterator[list[int]]:
    """Sequences of exactly ``max_length`` ids, ``[CLS] + inner + [SEP]``, packed per block.

    Consecutive paragraphs with the same ``(file, block)`` form one token stream (a
    ``[SEP]`` between documents); a block's tail shorter than ``max_length - 2`` is dropped.
    Tokenization goes ``batch_lines`` paragraphs per call to the tokenizer.
    """
    cls, sep = tokenizer.cls_token_id, tokenizer.sep_token_id
    inner = max_length - 2
    key = None
    stream: list[int] = []
    last_doc = None
    pending: list[Paragraph] = []

    def tokenize_pending() -> Iterator[list[int]]:
        nonlocal last_doc
        if not pending:
            return
        ids = tokenizer([p.text for p in pending], add_special_tokens=False, return_attention_mask=False,
                        return_token_type_ids=False, verbose=False)["input_ids"]
        for p, tokens in zip(pending, ids):
            if last_doc is not None and p.doc != last_doc:
                stream.append(sep)
            last_doc = p.doc
            stream.extend(tokens)
        pending.clear()
        start = 0
        while len(stream) - start >= inner:
            yield [cls, *stream[start:start + inner], sep]
            start += inner
        del stream[:start]

    for p in paragraphs:
        if (p.file, p.block) != key:
            yield from tokenize_pending()
            key, stream, last_doc = (p.file, p.block), [], None
        pending.append(p)
        if len(pending) >= batch_lines:
            yield from tokenize_pending()
    yield from tokenize_pending()
