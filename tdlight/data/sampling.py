"""A seeded, per-epoch shuffling sampler that can skip ahead (for exact mid-epoch resume).

torch's ``RandomSampler`` draws its permutation from a generator whose state moves on
every epoch, so a resumed run cannot reproduce an epoch's order, and it cannot start an
epoch part-way. ``EpochSampler`` derives each epoch's permutation from ``(seed, epoch)``
alone; Lightning calls ``set_epoch`` at every epoch start (also under DDP, where it wraps
this sampler in a ``DistributedSamplerWrapper``), and
:class:`ResumableDataLoader` sets the epoch and skips the batches already trained on
when a run resumes inside an epoch.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator

import torch
from torch.utils.data import DataLoader, Sampler


class EpochSampler(Sampler[int]):
    """Indices ``0..n-1``, shuffled by ``(seed, epoch)`` (or in order if ``shuffle=False``)."""

    def __init__(self, num_samples: int, seed: int = 0, shuffle: bool = True):
        self.num_samples = num_samples
        self.seed = seed
        self.shuffle = shuffle
        self.epoch = 0
        self._skip = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def skip_batches(self, batches: int, batch_size: int) -> None:
        """Make the next iteration (only) start after ``batches`` batches of this epoch."""
        self._skip = max(0, batches * batch_size)

    def order(self) -> list[int]:
        if not self.shuffle:
            return list(range(self.num_samples))
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        return torch.randperm(self.num_samples, generator=g).tolist()

    def __iter__(self) -> Iterator[int]:
        order = self.order()
        skip, self._skip = self._skip, 0
        return iter(order[skip:])

    def __len__(self) -> int:
        # The full epoch length, also when skipping: Lightning sizes the epoch from it and
        # counts the batches already done itself.
        return self.num_samples


class ResumableDataLoader(DataLoader):
    """A DataLoader over an :class:`EpochSampler` whose position goes into Lightning checkpoints.

    Lightning saves ``state_dict()`` of a training loader that has one and calls
    ``load_state_dict()`` before it creates the first iterator of a resumed run (its
    own fault-tolerant loading was removed in 2.0, so a plain loader restarts the epoch
    from its first batch). The position is ``progress()`` -> ``(epoch, batches done)``,
    taken from the trainer's restored counters rather than from batches fetched, which
    run ahead of training by Lightning's prefetch.
    """

    def __init__(self, *args, progress=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.progress = progress

    def state_dict(self) -> dict[str, int]:
        epoch, done = self.progress() if self.progress is not None else (getattr(self.sampler, "epoch", 0), 0)
        return {"epoch": int(epoch), "batches_done": int(done)}

    def load_state_dict(self, state: dict[str, int]) -> None:
        epoch, done = state["epoch"], state["batches_done"]
        if done >= len(self):  # saved at the very end of an epoch: the next one starts afresh
            epoch, done = epoch + 1, 0
        sampler = self.sampler
        if not isinstance(sampler, EpochSampler):  # e.g. wrapped for DDP by Lightning
            warnings.warn("resuming mid-epoch with a wrapped sampler: the epoch restarts from its first batch",
                          RuntimeWarning, stacklevel=2)
            return
        sampler.set_epoch(epoch)
        sampler.skip_batches(done, self.batch_size or 1)


def trainer_progress(trainer) -> tuple[int, int]:
    """``(epoch, batches trained in it)`` from a Lightning trainer's exact step counters."""
    batches = trainer.num_training_batches
    if not batches or batches == float("inf"):
        return trainer.current_epoch, 0
    done = trainer.global_step * trainer.accumulate_grad_batches - trainer.current_epoch * int(batches)
    return trainer.current_epoch, max(0, done)
