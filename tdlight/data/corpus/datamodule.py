"""The corpus as a LightningDataModule: settings checked, the train and held-out sets, their loaders.

The held-out set is either separate files (packed in order, sharded by sequence) or a
fraction of the train files' documents (:func:`~tdlight.data.corpus.documents.is_heldout`),
left out of training. The train loader resumes mid-epoch by the protocol of
:mod:`tdlight.data.sampling`.
"""

from __future__ import annotations

from typing import Any

import lightning as L
from torch.utils.data import DataLoader

from tdlight.data.corpus.dataset import PackedCorpusDataset, distributed_rank_world
from tdlight.data.corpus.documents import DEFAULT_BLOCK_LINES
from tdlight.data.corpus.files import PathSpec, resolve_corpus_files
from tdlight.data.sampling import ResumableStreamLoader
from tdlight.errors import DataError


class CorpusDataModule(L.LightningDataModule):
    """Packed text sequences for reconstruction pretraining (train and held-out).

    Batches are dicts of int64 tensors of shape ``(batch, max_length)``: ``input_ids``
    (``[CLS] ... [SEP]``, no padding), ``attention_mask`` (ones), ``token_type_ids`` (zeros).
    The package doc (:mod:`tdlight.data.corpus`) leads to the formats, packing, sharding and shuffle.

    Args:
        tokenizer: an HF tokenizer with ``cls_token_id`` and ``sep_token_id``.
        train_files: a file, a directory, a glob, or a list of them
            (:func:`~tdlight.data.corpus.files.resolve_corpus_files`).
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

    Epochs: the train loader is a :class:`~tdlight.data.sampling.ResumableStreamLoader` that calls
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

    def train_dataloader(self) -> ResumableStreamLoader:
        """Shuffled, sharded train batches; re-seeded from the epoch at each iteration."""
        self._apply_distributed()
        trainer = getattr(self, "trainer", None)
        step_fn = (lambda: trainer.global_step * trainer.accumulate_grad_batches) if trainer is not None else None
        return ResumableStreamLoader(self.train_dataset, batch_size=self.batch_size, num_workers=self.num_workers,
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
