"""One shard's packed sequences: sharded over ranks and workers, capped, shuffled per epoch.

:class:`PackedCorpusDataset` is an ``IterableDataset`` of packed sequences
(:mod:`tdlight.data.corpus.packing`) from the paragraphs of its documents
(:mod:`tdlight.data.corpus.documents`).

**Examples**: dicts of tensors, all of shape ``(max_length,)``: ``input_ids`` (int64),
``attention_mask`` (all ones, int64), ``token_type_ids`` (zeros, int64). The default
collate stacks them to ``(batch, max_length)``.

**Sharding**: a dataset iterated by worker ``w`` of ``W`` DataLoader workers on DDP rank
``r`` of ``R`` reads shard ``s = r * W + w`` of ``S = R * W``:

* training (``shard_by="block"``): block ``b`` of file ``f`` (both 0-based, ``f`` the file's
  position in the list) belongs to shard ``(f + b) % S``; other shards still read the
  lines (to count documents) but never tokenize them. Each sequence of an epoch is seen by
  exactly one worker of one rank. Ranks get whole blocks, so their sequence counts differ
  by up to a few blocks (see :class:`~tdlight.data.corpus.datamodule.CorpusDataModule` for
  what that means under DDP).
* held-out (``shard_by="sequence"``): every shard packs the whole (small) held-out stream
  and keeps sequences ``i`` with ``i % S == s``: the held-out set, capped or not, is the
  same for any number of ranks and workers, and per-rank counts differ by at most one.

**Shuffling**: a shuffle buffer of ``shuffle_buffer`` sequences per shard, whose RNG is
seeded from ``(seed, epoch, shard)``; the same seed and epoch give the same order, another
epoch another order, and every epoch is the same multiset of sequences. ``shuffle_buffer``
0 or 1 reads in order. Blocks are read in file order, so mixing is local to the buffer.

**Resuming**: :meth:`PackedCorpusDataset.set_epoch` and
:meth:`PackedCorpusDataset.skip_batches` are the position interface that
:class:`tdlight.data.sampling.ResumableDataLoader` drives (as it drives
:class:`~tdlight.data.sampling.EpochSampler` for map-style data).
"""

from __future__ import annotations

import hashlib
import itertools
import os
import random
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, Literal

import torch
from torch.utils.data import IterableDataset, get_worker_info

from tdlight.data.corpus.documents import DEFAULT_BLOCK_LINES, Documents, Paragraph, read_paragraphs, select_documents
from tdlight.data.corpus.packing import pack_sequences
from tdlight.errors import DataError


class PackedCorpusDataset(IterableDataset):
    """Packed ``max_length`` sequences from text files, streamed (see the module doc).

    Args:
        files: the corpus files (see :func:`~tdlight.data.corpus.files.resolve_corpus_files`), read in this order.
        tokenizer: an HF tokenizer with ``cls_token_id`` and ``sep_token_id``.
        max_length: ids per sequence, ``[CLS]`` and ``[SEP]`` included (>= 3).
        documents: ``"all"``, ``"train"`` (documents not held out) or ``"heldout"`` (only
            the held-out documents), by :func:`~tdlight.data.corpus.documents.is_heldout`
            with ``heldout_fraction``.
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
                 documents: Documents = "all", heldout_fraction: float = 0.0,
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
        """The paragraphs of this dataset's documents, in file order, in the blocks ``keep_block(f, b)`` keeps."""
        unk = getattr(self.tokenizer, "unk_token", None)
        for f, path in enumerate(self.files):
            paragraphs = read_paragraphs(path, file_index=f, block_lines=self.block_lines, unk_token=unk)
            yield from select_documents((p for p in paragraphs if keep_block(f, p.block)), path.name,
                                        self.documents, self.heldout_fraction)

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


def _derive_seed(*parts: int) -> int:
    return int.from_bytes(hashlib.blake2b(repr(parts).encode(), digest_size=8).digest(), "big")


def distributed_rank_world() -> tuple[int, int]:
    """``(rank, world_size)`` of the default ``torch.distributed`` process group, else ``(0, 1)``."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1
