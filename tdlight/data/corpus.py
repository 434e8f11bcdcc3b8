"""The text corpus for reconstruction pretraining: streamed, packed, shuffled, sharded.

A corpus is a list of text files read line by line (``.gz`` transparently), never loaded
whole, so a corpus larger than memory works. The pieces, bottom up:

**Files** (:func:`resolve_corpus_files`). A spec is a path, a directory (every
``.txt``/``.txt.gz``/``.tokens``/``.tokens.gz`` file directly in it, sorted), a glob, or a
list of these; the result is a sorted-per-item, de-duplicated list of files, each checked to
exist and to hold at least one non-blank line.

**Formats** (:func:`read_paragraphs`), chosen by suffix:

* plain (``.txt``, ``.txt.gz`` and anything else named explicitly): one paragraph per line;
  one or more blank lines end a document (the BERT/WikiExtractor layout).
* WikiText (``.tokens``, ``.tokens.gz``): blank lines are only spacing; a top-level heading
  `` = Title = `` starts a new document and is dropped (like the article titles of the
  Wikipedia extract); section headings `` = = Section = = `` are kept as their text
  (``Section``), a short line like the extract's ``History.`` lines; the WikiText escapes
  ``@-@``, ``@,@``, ``@.@`` become ``-``, ``,``, ``.`` (glued to their neighbours) and
  ``<unk>`` becomes the tokenizer's unknown token (one ``[UNK]`` id, not four word pieces).

Documents are numbered from 0 in each file, counting only documents with text.

**Blocks and packing** (:func:`pack_sequences`). Each file is cut into *blocks* of
``block_lines`` raw lines (blank lines included). Within a block the paragraphs are
tokenized without special tokens (256 lines per tokenizer call), concatenated into one
token stream with a ``[SEP]`` between consecutive documents (none at the start of a block),
and cut into sequences of exactly ``max_length`` ids::

    [CLS] t_1 ... t_{max_length-2} [SEP]

so the inner ids of a block's consecutive sequences concatenate to the block's stream. The
tail of a block that does not fill a sequence is dropped (about half a sequence per block:
~0.1% of the Wikipedia extract at the defaults); sequences never cross a block boundary.
Packing per block makes the set of sequences independent of how the stream is sharded.

**Examples**: dicts of tensors, all of shape ``(max_length,)``: ``input_ids`` (int64),
``attention_mask`` (all ones, int64), ``token_type_ids`` (zeros, int64). The default
collate stacks them to ``(batch, max_length)``.

**Sharding**: a dataset iterated by worker ``w`` of ``W`` DataLoader workers on DDP rank
``r`` of ``R`` reads shard ``s = r * W + w`` of ``S = R * W``:

* training (``shard_by="block"``): block ``b`` of file ``f`` (both 0-based, ``f`` the file's
  position in the list) belongs to shard ``(f + b) % S``; other shards still read the
  lines (to count documents) but never tokenize them. Each sequence of an epoch is seen by
  exactly one worker of one rank. Ranks get whole blocks, so their sequence counts differ
  by up to a few blocks (see :class:`CorpusDataModule` for what that means under DDP).
* held-out (``shard_by="sequence"``): every shard packs the whole (small) held-out stream
  and keeps sequences ``i`` with ``i % S == s``: the held-out set, capped or not, is the
  same for any number of ranks and workers, and per-rank counts differ by at most one.

**Shuffling**: a shuffle buffer of ``shuffle_buffer`` sequences per shard, whose RNG is
seeded from ``(seed, epoch, shard)``; the same seed and epoch give the same order, another
epoch another order, and every epoch is the same multiset of sequences. ``shuffle_buffer``
0 or 1 reads in order. Blocks are read in file order, so mixing is local to the buffer.
"""

from __future__ import annotations

import glob as globlib
import gzip
import hashlib
import itertools
import os
import random
import re
import zlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import lightning as L
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from tdlight.errors import DataError

CORPUS_SUFFIXES = (".txt", ".txt.gz", ".tokens", ".tokens.gz")
WIKITEXT_SUFFIXES = (".tokens", ".tokens.gz")
TOKENIZE_BATCH_LINES = 256
DEFAULT_BLOCK_LINES = 1024

PathSpec = str | os.PathLike | Sequence[str | os.PathLike]


# --- files -----------------------------------------------------------------------------------


def _is_corpus_file(path: Path) -> bool:
    return path.is_file() and path.name.endswith(CORPUS_SUFFIXES)


def open_text(path: str | os.PathLike):
    """A text-mode (UTF-8) handle on ``path``; ``.gz`` files are decompressed as they stream."""
    path = Path(path)
    if path.name.endswith(".gz"):
        return gzip.open(path, "rt", encoding="utf-8", newline="\n")
    return open(path, encoding="utf-8", newline="\n")


def _raw_lines(path: Path) -> Iterator[str]:
    """The lines of ``path`` (newline stripped); unreadable input raises DataError naming it."""
    lineno = 0
    try:
        with open_text(path) as f:
            for lineno, line in enumerate(f, 1):
                yield line.rstrip("\r\n")
    except UnicodeDecodeError as e:
        raise DataError(f"corpus file {str(path)!r}, near line {lineno + 1}: not valid UTF-8 text ({e.reason})") from e
    except (gzip.BadGzipFile, EOFError, zlib.error) as e:
        raise DataError(f"corpus file {str(path)!r}: not a readable gzip file ({e})") from e
    except OSError as e:
        raise DataError(f"corpus file {str(path)!r}: cannot be read ({e.strerror or e})") from e


def _check_nonempty(path: Path, what: str) -> None:
    try:
        for line in _raw_lines(path):
            if line.strip():
                return
    except DataError as e:
        raise DataError(f"{what}: {e}") from e
    raise DataError(f"{what}: corpus file {str(path)!r} is empty (no non-blank line); valid: a text file "
                    f"with one paragraph per line")


def resolve_corpus_files(spec: PathSpec, *, what: str = "corpus files") -> list[Path]:
    """The files named by ``spec``, in order, each checked to exist and to hold some text.

    ``spec`` is a path, a directory (every ``*.txt``, ``*.txt.gz``, ``*.tokens``,
    ``*.tokens.gz`` file directly in it, sorted by name), a glob pattern (``*``, ``?``,
    ``[``; matches sorted, ``**`` recursive; matched directories are expanded as above), or
    a list/tuple of these. Files named twice are kept once (first position). ``what`` names
    the setting in error messages (e.g. ``"train_files"``).
    """
    if spec is None or isinstance(spec, (str, os.PathLike)):
        items = [spec]
    else:
        items = list(spec)
    if not items:
        raise DataError(f"{what} is an empty list; valid: a file, a directory, a glob, or a list of them")
    files: list[Path] = []
    for item in items:
        if not isinstance(item, (str, os.PathLike)) or str(item).strip() == "":
            raise DataError(f"{what}: {item!r} is not a path; valid: a file, a directory, a glob, or a list of them")
        text = os.path.expanduser(os.fspath(item))
        path = Path(text)
        if path.is_dir():
            found = sorted(p for p in path.iterdir() if _is_corpus_file(p))
            if not found:
                raise DataError(f"{what}: directory {text!r} holds no corpus file; valid: files ending in "
                                f"{', '.join(CORPUS_SUFFIXES)}")
            files += found
        elif path.is_file():
            files.append(path)
        elif globlib.has_magic(text):
            matches = sorted(globlib.glob(text, recursive=True))
            found = []
            for m in map(Path, matches):
                if m.is_dir():
                    found += sorted(p for p in m.iterdir() if _is_corpus_file(p))
                elif m.is_file():
                    found.append(m)
            if not found:
                raise DataError(f"{what}: glob {text!r} matches no corpus file")
            files += found
        else:
            raise DataError(f"{what}: {text!r} does not exist; valid: an existing file, a directory, or a glob")
    unique = list(dict.fromkeys(p.resolve() for p in files))
    for p in unique:
        _check_nonempty(p, what)
    return unique


# --- formats --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Paragraph:
    """One non-blank line of text with where it sits: file, block and document (all 0-based)."""

    file: int
    block: int
    doc: int
    text: str


_WIKITEXT_ESCAPE = re.compile(r" @([-,.])@ ")


def _wikitext_heading(line: str) -> tuple[int, str] | None:
    """``(level, title)`` for a WikiText heading line (`` = = Title = = `` is level 2), else None."""
    s = line.strip()
    if not (s.startswith("= ") and s.endswith(" =")):
        return None
    rest = s.lstrip("= ")
    level = s[: len(s) - len(rest)].count("=")
    return level, rest.rstrip("= ")


def read_paragraphs(path: str | os.PathLike, *, file_index: int = 0, block_lines: int = DEFAULT_BLOCK_LINES,
                    unk_token: str | None = None) -> Iterator[Paragraph]:
    """The paragraphs of one corpus file, streamed, in the file's format (see the module doc).

    ``block`` is ``(raw line number - 1) // block_lines``; ``doc`` counts documents with text.
    """
    path = Path(path)
    wikitext = path.name.endswith(WIKITEXT_SUFFIXES)
    doc, doc_has_text = 0, False
    for i, line in enumerate(_raw_lines(path)):
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


# --- packing ---------------------------------------------------------------------------------


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


def _derive_seed(*parts: int) -> int:
    return int.from_bytes(hashlib.blake2b(repr(parts).encode(), digest_size=8).digest(), "big")


def shuffle_buffered(items: Iterable[Any], buffer_size: int, rng: random.Random) -> Iterator[Any]:
    """``items`` shuffled through a buffer of ``buffer_size``: a permutation, local to the buffer."""
    if buffer_size <= 1:
        yield from items
        return
    buf: list[Any] = []
    for item in items:
        if len(buf) < buffer_size:
            buf.append(item)
            continue
        j = rng.randrange(buffer_size)
        yield buf[j]
        buf[j] = item
    rng.shuffle(buf)
    yield from buf


def distributed_rank_world() -> tuple[int, int]:
    """``(rank, world_size)`` of the default ``torch.distributed`` process group, else ``(0, 1)``."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


# --- the dataset -----------------------------------------------------------------------------


class PackedCorpusDataset(IterableDataset):
    """Packed ``max_length`` sequences from text files, streamed (see the module docstring).

    Args:
        files: the corpus files (see :func:`resolve_corpus_files`), read in this order.
        tokenizer: an HF tokenizer with ``cls_token_id`` and ``sep_token_id``.
        max_length: ids per sequence, ``[CLS]`` and ``[SEP]`` included (>= 3).
        documents: ``"all"``, ``"train"`` (documents not held out) or ``"heldout"`` (only
            the held-out documents), by :func:`is_heldout` with ``heldout_fraction``.
        shuffle_buffer: sequences in the shuffle buffer; 0 or 1 keeps the stream order.
        seed: with the epoch (:meth:`set_epoch`) and the shard, seeds the shuffle.
        max_sequences: cap on the sequences of one pass. With ``shard_by="block"`` each of
            the ``S`` shards yields at most its share (``max_sequences // S``, the first
            ``max_sequences % S`` shards one more): the first sequences of its own stream,
            taken before shuffling (so every epoch shuffles the same subset). With
            ``shard_by="sequence"`` it keeps the first ``max_sequences`` of the global stream.
        shard_by: ``"block"`` (training: shards own whole blocks, nothing is tokenized
            twice) or ``"sequence"`` (held-out: round robin over the global sequence index;
            every shard tokenizes the whole stream, the result is independent of the layout).
        rank, world_size: this process's DDP rank and the number of ranks (see
            :meth:`set_distributed`; DataLoader workers are detected by themselves).
        block_lines: raw lines per packing block.

    Yields dicts of int64 tensors of shape ``(max_length,)``: ``input_ids``,
    ``attention_mask`` (ones), ``token_type_ids`` (zeros).
    """

    def __init__(self, files: Sequence[str | os.PathLike], tokenizer: Any, *, max_length: int = 128,
                 documents: Literal["all", "train", "heldout"] = "all", heldout_fraction: float = 0.0,
                 shuffle_buffer: int = 0, seed: int = 0, max_sequences: int | None = None,
                 shard_by: Literal["block", "sequence"] = "block", rank: int = 0, world_size: int = 1,
                 block_lines: int = DEFAULT_BLOCK_LINES):
        if documents not in ("all", "train", "heldout"):
            raise DataError(f"documents={documents!r}; valid: 'all', 'train', 'heldout'")
        if shard_by not in ("block", "sequence"):
            raise DataError(f"shard_by={shard_by!r}; valid: 'block', 'sequence'")
        self.files = [Path(f) for f in files]
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.documents = documents
        self.heldout_fraction = heldout_fraction
        self.shuffle_buffer = shuffle_buffer
        self.seed = seed
        self.max_sequences = max_sequences
        self.shard_by = shard_by
        self.block_lines = block_lines
        self.epoch = 0
        self._skip_batches = (0, 0)
        self.set_distributed(rank, world_size)

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose shuffle order the next iteration uses."""
        self.epoch = int(epoch)

    def set_distributed(self, rank: int, world_size: int) -> None:
        """Set this process's DDP ``rank`` in ``0..world_size-1`` (sharding across ranks)."""
        if world_size < 1 or not 0 <= rank < world_size:
            raise DataError(f"rank={rank}, world_size={world_size}; valid: world_size >= 1 and 0 <= rank < world_size")
        self.rank, self.world_size = int(rank), int(world_size)

    def skip_batches(self, batches: int, batch_size: int) -> None:
        """Make the next iteration (only) start after ``batches`` batches of this epoch.

        For exact mid-epoch resume: the skipped sequences are still generated (the
        shuffle depends on them) but not yielded. With DataLoader workers this relies on
        the loader's round robin (batch ``k`` comes from worker ``k % num_workers``), so it
        is exact unless some worker had already run out before batch ``batches``.
        """
        self._skip_batches = (max(0, int(batches)), int(batch_size))

    def shard(self) -> tuple[int, int]:
        """``(shard, num_shards)`` of the calling process/worker: ``rank * W + worker``, ``world * W``."""
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        return self.rank * workers + worker, self.world_size * workers

    def _paragraphs(self, keep_block: Callable[[int, int], bool]) -> Iterator[Paragraph]:
        unk = getattr(self.tokenizer, "unk_token", None)
        for f, path in enumerate(self.files):
            name = path.name
            heldout_doc, heldout = None, False
            for p in read_paragraphs(path, file_index=f, block_lines=self.block_lines, unk_token=unk):
                if not keep_block(f, p.block):
                    continue
                if self.documents != "all":
                    if p.doc != heldout_doc:
                        heldout_doc, heldout = p.doc, is_heldout(name, p.doc, self.heldout_fraction)
                    if heldout != (self.documents == "heldout"):
                        continue
                yield p

    def sequences(self) -> Iterator[torch.Tensor]:
        """This shard's sequences for the current epoch, capped and shuffled: int64 ``(max_length,)``.

        Sequences are tensors (not lists) while in the shuffle buffer: ~1 KB each at
        ``max_length=128``, so the default buffer of 10,000 holds ~11 MB per worker.
        """
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        skip, batch_size = self._skip_batches
        # Resuming after `skip` batches: the DataLoader's round robin restarts at worker 0,
        # but batch `skip` came from worker `skip % workers`, so worker w takes over the
        # stream of worker (w + skip) % workers, minus the batches that one already gave.
        role = (worker + skip) % workers
        shard, shards = self.rank * workers + role, self.world_size * workers
        if self.shard_by == "block":
            stream = pack_sequences(self._paragraphs(lambda f, b: (f + b) % shards == shard),
                                    self.tokenizer, self.max_length)
            if self.max_sequences is not None:
                share = self.max_sequences // shards + (1 if shard < self.max_sequences % shards else 0)
                stream = itertools.islice(stream, share)
        else:
            stream = pack_sequences(self._paragraphs(lambda f, b: True), self.tokenizer, self.max_length)
            if self.max_sequences is not None:
                stream = itertools.islice(stream, self.max_sequences)
            stream = itertools.islice(stream, shard, None, shards)
        rng = random.Random(_derive_seed(self.seed, self.epoch, shard))
        tensors = (torch.tensor(ids, dtype=torch.long) for ids in stream)
        out = shuffle_buffered(tensors, self.shuffle_buffer, rng)
        if skip:
            already = len(range(role, skip, workers))  # batches k < skip with k % workers == role
            out = itertools.islice(out, already * batch_size, None)
        return out

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        # Not a generator function: the epoch, shard and pending skip are read now, when the
        # DataLoader (or its worker) starts the iteration, not at the first next().
        shard, shards = self.shard()
        must_yield = not self._skip_batches[0] and (shards == 1 or (self.shard_by == "sequence" and shard == 0))
        return self._examples(self.sequences(), must_yield)

    def _examples(self, sequences: Iterator[torch.Tensor], must_yield: bool) -> Iterator[dict[str, torch.Tensor]]:
        ones = torch.ones(self.max_length, dtype=torch.long)
        zeros = torch.zeros(self.max_length, dtype=torch.long)
        count = 0
        for ids in sequences:
            count += 1
            yield {"input_ids": ids, "attention_mask": ones.clone(),
                   "token_type_ids": zeros.clone()}
        if count == 0 and must_yield:
            which = {"all": "", "train": "non-held-out ", "heldout": "held-out "}[self.documents]
            raise DataError(
                f"the {which}documents of {[str(f) for f in self.files]} produce no sequence of "
                f"max_length={self.max_length} tokens: a block of {self.block_lines} lines needs at least "
                f"{self.max_length - 2} tokens of text; valid: more text, or a smaller max_length")


class EpochAwareLoader(DataLoader):
    """A DataLoader that, at each ``iter()``, sets its dataset's epoch to ``epoch_fn()``.

    Workers receive their copy of the dataset when the iterator starts, so the epoch
    reaches them (do not use ``persistent_workers``). A pending
    :meth:`PackedCorpusDataset.skip_batches` is consumed by that one iteration.

    With ``step_fn`` (batches trained so far, from the trainer's exact step counter) the
    loader is stateful for Lightning checkpoints: it records the step its epoch started
    at, and a resumed run skips the batches of the interrupted epoch already trained on.
    """

    def __init__(self, dataset: PackedCorpusDataset, *args: Any, epoch_fn: Callable[[], int],
                 step_fn: Callable[[], int] | None = None, **kwargs: Any):
        super().__init__(dataset, *args, **kwargs)
        self.epoch_fn = epoch_fn
        self.step_fn = step_fn
        self._epoch_start: int | None = None
        self._restored = False

    def state_dict(self) -> dict[str, int]:
        step = self.step_fn() if self.step_fn is not None else 0
        start = self._epoch_start if self._epoch_start is not None else step
        return {"epoch": self.epoch_fn(), "epoch_start": start, "step": step}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self._epoch_start = state["epoch_start"]
        self._restored = True
        self.dataset.skip_batches(state["step"] - state["epoch_start"], self.batch_size or 1)

    def __iter__(self):
        self.dataset.set_epoch(self.epoch_fn())
        if not self._restored and self.step_fn is not None:
            self._epoch_start = self.step_fn()
        self._restored = False
        try:
            return super().__iter__()
        finally:
            self.dataset._skip_batches = (0, 0)


# --- the datamodule --------------------------------------------------------------------------


class CorpusDataModule(L.LightningDataModule):
    """Packed text sequences for reconstruction pretraining (train and held-out).

    Batches are dicts of int64 tensors of shape ``(batch, max_length)``: ``input_ids``
    (``[CLS] ... [SEP]``, no padding), ``attention_mask`` (ones), ``token_type_ids`` (zeros).
    The module docstring describes the formats, packing, sharding and shuffle.

    Args:
        tokenizer: an HF tokenizer with ``cls_token_id`` and ``sep_token_id``.
        train_files: a file, a directory, a glob, or a list of them
            (:func:`resolve_corpus_files`).
        heldout_files: the same, for :meth:`val_dataloader` (in order, no shuffle).
        max_length: ids per sequence, ``[CLS]`` and ``[SEP]`` included; 3 to the
            tokenizer's ``model_max_length``.
        batch_size / eval_batch_size: train / held-out batch size (``eval_batch_size``
            defaults to ``batch_size``).
        seed: seeds the train shuffle together with the epoch.
        num_workers: DataLoader workers (each reads its own shard).
        shuffle_buffer: train shuffle buffer, in sequences (0 or 1: no shuffle).
        max_train_sequences / max_heldout_sequences: caps per pass (train: split evenly
            over ranks and workers; held-out: the first sequences of the held-out stream).
        heldout_fraction: without ``heldout_files``, hold out this fraction of the train
            files' documents (by a stable hash of file name and document index) for
            :meth:`val_dataloader` and leave them out of training. With neither,
            :meth:`val_dataloader` returns ``[]`` and Lightning runs no validation.
        block_lines: raw lines per packing block (the unit of train sharding).
        rank / world_size: force the DDP rank and world size (for tests and custom
            launchers); by default they come from the attached Trainer, else from
            ``torch.distributed``, else ``(0, 1)``.

    Epochs: the train loader is an :class:`EpochAwareLoader` that calls
    ``train_dataset.set_epoch(e)`` each time an epoch's iteration starts, with ``e`` =
    ``trainer.current_epoch`` when a Trainer is attached (so a resumed run replays the
    right epoch's order; no ``reload_dataloaders_every_n_epochs`` needed), else the value
    given to :meth:`set_epoch` (default 0). Outside Lightning, call ``dm.set_epoch(e)``
    before iterating epoch ``e``.

    DDP: ranks read disjoint blocks, so their sequence counts differ a little; a rank that
    runs out first would wait for the others at the next gradient all-reduce. Bound DDP
    training by ``max_steps``/``limit_train_batches`` below the smallest rank's batch count,
    or by ``max_train_sequences`` on a corpus large enough for every rank to reach its share.
    """

    def __init__(self, tokenizer: Any, *, train_files: PathSpec, heldout_files: PathSpec | None = None,
                 max_length: int = 128, batch_size: int = 32, eval_batch_size: int | None = None,
                 seed: int = 0, num_workers: int = 0, shuffle_buffer: int = 10_000,
                 max_train_sequences: int | None = None, max_heldout_sequences: int | None = None,
                 heldout_fraction: float = 0.0, block_lines: int = DEFAULT_BLOCK_LINES,
                 rank: int | None = None, world_size: int | None = None):
        super().__init__()
        if getattr(tokenizer, "cls_token_id", None) is None or getattr(tokenizer, "sep_token_id", None) is None:
            raise DataError(f"tokenizer {type(tokenizer).__name__} has no [CLS]/[SEP] token "
                            f"(cls_token_id/sep_token_id is None); valid: a BERT-style tokenizer")
        limit = getattr(tokenizer, "model_max_length", None)
        limit = limit if isinstance(limit, int) and limit < 1_000_000 else None
        _check_int("max_length", max_length, 3, limit)
        _check_int("batch_size", batch_size, 1)
        if eval_batch_size is not None:
            _check_int("eval_batch_size", eval_batch_size, 1)
        _check_int("seed", seed, None)
        _check_int("num_workers", num_workers, 0)
        _check_int("shuffle_buffer", shuffle_buffer, 0)
        _check_int("block_lines", block_lines, 1)
        for name, value in (("max_train_sequences", max_train_sequences),
                            ("max_heldout_sequences", max_heldout_sequences)):
            if value is not None:
                _check_int(name, value, 1)
        if isinstance(heldout_fraction, bool) or not isinstance(heldout_fraction, (int, float)) \
                or not 0.0 <= heldout_fraction < 1.0:
            raise DataError(f"heldout_fraction={heldout_fraction!r}; valid: a number in [0, 1)")
        if heldout_files is not None and heldout_fraction > 0:
            raise DataError(f"heldout_files and heldout_fraction={heldout_fraction} are both set; valid: "
                            f"held-out files, or a held-out fraction of the train files, not both")
        if (rank is None) != (world_size is None):
            raise DataError(f"rank={rank!r}, world_size={world_size!r}; valid: both set or both None")

        self.tokenizer = tokenizer
        self.max_length = max_length
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.seed = seed
        self.num_workers = num_workers
        self.train_files = resolve_corpus_files(train_files, what="train_files")
        self.heldout_files = (resolve_corpus_files(heldout_files, what="heldout_files")
                              if heldout_files is not None else None)
        self.heldout_fraction = float(heldout_fraction)
        self._forced_rank = (rank, world_size) if rank is not None else None
        self._epoch = 0

        common = dict(max_length=max_length, block_lines=block_lines)
        self.train_dataset = PackedCorpusDataset(
            self.train_files, tokenizer, documents="train" if self.heldout_fraction > 0 else "all",
            heldout_fraction=self.heldout_fraction, shuffle_buffer=shuffle_buffer, seed=seed,
            max_sequences=max_train_sequences, shard_by="block", **common)
        self.val_dataset: PackedCorpusDataset | None = None
        if self.heldout_files is not None:
            self.val_dataset = PackedCorpusDataset(self.heldout_files, tokenizer, max_sequences=max_heldout_sequences,
                                                   shard_by="sequence", **common)
        elif self.heldout_fraction > 0:
            self.val_dataset = PackedCorpusDataset(self.train_files, tokenizer, documents="heldout",
                                                   heldout_fraction=self.heldout_fraction,
                                                   max_sequences=max_heldout_sequences, shard_by="sequence", **common)
        self._apply_distributed()

    # -- epochs and ranks --

    def set_epoch(self, epoch: int) -> None:
        """The epoch for the next train iteration when no Trainer is attached."""
        self._epoch = int(epoch)

    @property
    def current_epoch(self) -> int:
        """``trainer.current_epoch`` when attached to a Trainer, else the :meth:`set_epoch` value."""
        trainer = getattr(self, "trainer", None)
        return trainer.current_epoch if trainer is not None else self._epoch

    def rank_world(self) -> tuple[int, int]:
        """``(rank, world_size)``: forced by the constructor, else the Trainer's, else torch.distributed's."""
        if self._forced_rank is not None:
            return self._forced_rank
        trainer = getattr(self, "trainer", None)
        if trainer is not None:
            return trainer.global_rank, trainer.world_size
        return distributed_rank_world()

    def _apply_distributed(self) -> None:
        rank, world = self.rank_world()
        for ds in (self.train_dataset, self.val_dataset):
            if ds is not None:
                ds.set_distributed(rank, world)

    # -- Lightning hooks --

    def setup(self, stage: str | None = None) -> None:
        """Pick up the rank and world size (the process group exists by now under DDP)."""
        self._apply_distributed()

    def train_dataloader(self) -> EpochAwareLoader:
        """Shuffled, sharded train batches; re-seeded from the epoch at each iteration."""
        self._apply_distributed()
        trainer = getattr(self, "trainer", None)
        step_fn = (lambda: trainer.global_step * trainer.accumulate_grad_batches) if trainer is not None else None
        return EpochAwareLoader(self.train_dataset, batch_size=self.batch_size, num_workers=self.num_workers,
                                epoch_fn=lambda: self.current_epoch, step_fn=step_fn)

    def val_dataloader(self) -> DataLoader | list:
        """Held-out batches in stream order, or ``[]`` when nothing is held out."""
        if self.val_dataset is None:
            return []
        self._apply_distributed()
        return DataLoader(self.val_dataset, batch_size=self.eval_batch_size, num_workers=self.num_workers)


def _check_int(name: str, value: Any, low: int | None, high: int | None = None) -> None:
    ok = isinstance(value, int) and not isinstance(value, bool)
    ok = ok and (low is None or value >= low) and (high is None or value <= high)
    if not ok:
        valid = "an integer" + (f" >= {low}" if low is not None else "") + (f" and <= {high}" if high is not None else "")
        raise DataError(f"{name}={value!r}; valid: {valid}")
