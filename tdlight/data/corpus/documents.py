"""Corpus documents: the file formats as a stream of paragraphs, and which documents are held out.

**Formats** (:func:`read_paragraphs`), chosen by suffix:

* plain (``.txt``, ``.txt.gz`` and anything else named explicitly): one paragraph per line;
  one or more blank lines end a document (the BERT/WikiExtractor layout).
* WikiText (``.tokens``, ``.tokens.gz``): blank lines are only spacing; a top-level heading
  `` = Title = `` starts a new document and is dropped (like the article titles of the
  Wikipedia extract); section headings `` = = Section = = `` are kept as their text
  (``Section``), a short line like the extract's ``History.`` lines; the WikiText escapes
  ``@-@``, ``@,@``, ``@.@`` become ``-``, ``,``, ``.`` (glued to their neighbours) and
  ``<unk>`` becomes the tokenizer's unknown token (one ``[UNK]`` id, not four word pieces).

Each :class:`Paragraph` knows its place: the file (its position in the list), the *block*
(``block_lines`` raw lines, blank lines included: the unit of packing and of train
sharding) and the document, numbered from 0 in each file, counting only documents with text.

**Held out** (:func:`is_heldout`, :func:`select_documents`): a document is held out by a
stable hash of its file name and index, so a held-out fraction of the train files is the
same on every machine, for every seed and for any sharding.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from tdlight.data.corpus.files import raw_lines

WIKITEXT_SUFFIXES = (".tokens", ".tokens.gz")
_WIKITEXT_ESCAPE = re.compile(r" @([-,.])@ ")  # " @-@ " -> "-"
DEFAULT_BLOCK_LINES = 1024

Documents = Literal["all", "train", "heldout"]


@dataclass(frozen=True)
class Paragraph:
    """One non-blank line of text with where it sits: file, block and document (all 0-based)."""

    file: int
    block: int
    doc: int
    text: str


def read_paragraphs(path: str | os.PathLike, *, file_index: int = 0, block_lines: int = DEFAULT_BLOCK_LINES,
                    unk_token: str | None = None) -> Iterator[Paragraph]:
    """The paragraphs of one corpus file, streamed, in the file's format (see the module doc).

    ``block`` is ``(raw line number - 1) // block_lines``; ``doc`` counts documents with text.
    """
    path = Path(path)
    wikitext = path.name.endswith(WIKITEXT_SUFFIXES)
    doc, doc_has_text = 0, False
    for i, line in enumerate(raw_lines(path)):
        text = line.strip()
        if wikitext:
            if not text:
                continue
            heading = _wikitext_heading(text)
            if heading is not None:
                level, title = heading
                if level == 1:
                    if doc_has_text:
                        doc, doc_has_text = doc + 1, False
                    continue
                text = title
            else:
                text = _WIKITEXT_ESCAPE.sub(r"\1", text)
                if unk_token is not None:
                    text = text.replace("<unk>", unk_token)
            if not text:
                continue
        elif not text:
            if doc_has_text:
                doc, doc_has_text = doc + 1, False
            continue
        doc_has_text = True
        yield Paragraph(file_index, i // block_lines, doc, text)



def _wikitext_heading(line: str) -> tuple[int, str] | None:
    """``(level, title)`` for a WikiText heading line (`` = = Title = = `` is level 2), else None."""
    s = line.strip()
    if not (s.startswith("= ") and s.endswith(" =")):
        return None
    rest = s.lstrip("= ")
    level = s[: len(s) - len(rest)].count("=")
    return level, rest.rstrip("= ")


# --- held out --------------------------------------------------------------------------------


def is_heldout(file_name: str, doc: int, fraction: float) -> bool:
    """Whether document ``doc`` of the file named ``file_name`` is held out.

    A stable hash of (file name, document index) against ``fraction``: deterministic, the
    same on every machine and for every seed, and nested (a larger fraction holds out a
    superset).
    """
    if fraction <= 0.0:
        return False
    digest = hashlib.blake2b(f"{file_name}\0{doc}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2.0**64 < fraction


def select_documents(paragraphs: Iterable[Paragraph], file_name: str, documents: Documents,
                     fraction: float) -> Iterator[Paragraph]:
    """The paragraphs of one file's ``documents``: ``"all"``, ``"train"`` (not held out) or ``"heldout"``."""
    if documents == "all":
        yield from paragraphs
        return
    heldout_doc, heldout = None, False
    for p in paragraphs:
        if p.doc != heldout_doc:
            heldout_doc, heldout = p.doc, is_heldout(file_name, p.doc, fraction)
        if heldout == (documents == "heldout"):
            yield p
