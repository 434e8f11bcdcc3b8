"""Exact mid-epoch resume: one checkpoint protocol for the GLUE loaders and the corpus stream.

torch's ``RandomSampler`` draws its permutation from a generator whose state moves on
every epoch, so a resumed run cannot reproduce an epoch's order, and it cannot start an
epoch part-way; Lightning's own fault-tolerant loading was removed in 2.0, so a plain
loader restarts the epoch from its first batch. Here instead:

**The position holder**: an object with ``set_epoch(epoch)`` (the epoch whose order the
next iteration uses; each epoch's order is derived from ``(seed, epoch)`` alone) and
``skip_batches(batches, batch_size)`` (the next iteration, only, starts after that many
batches). Two implement it: :class:`EpochSampler` for map-style data (the GLUE splits),
and :class:`~tdlight.data.corpus.dataset.PackedCorpusDataset` for the streamed corpus.

**The protocol** (:class:`ResumableDataLoader`): Lightning saves ``state_dict()`` of a
training loader that has one and calls ``load_state_dict()`` before it creates the first
iterator of a resumed run. The state is the position ``{"epoch": e, "batches_done": k}``,
taken from the trainer's restored step counter rather than from batches fetched (which run
ahead of training by Lightning's prefetch); loading it calls ``set_epoch(e)`` and
``skip_batches(k, batch_size)`` on the holder. A position at the very end of a known-length
epoch means the next epoch, from its start.

What differs between the two kinds of data is only how the loader learns its position and
epoch, because a stream has no length:

* map-style (:class:`ResumableDataLoader` with ``progress=trainer_progress``): the batches
  done in the epoch are the trained batches minus ``epoch * batches per epoch``; Lightning
  calls the sampler's ``set_epoch`` at every epoch start (also under DDP, where it wraps
  the sampler in a ``DistributedSamplerWrapper``; a wrapped sampler cannot skip, so that
  resume restarts the epoch, with a warning).
* streamed (:class:`ResumableStreamLoader`): the epoch length is unknown until the stream
  ends, so the loader records the step at which each epoch's iteration started and the
  batches done are the steps since; and since Lightning sets the epoch only on samplers,
  the loader sets its dataset's epoch itself at each ``iter()``. The stream ends the epoch
  by running out, so there is no end-of-epoch roll-over to do. Checkpoints written before
  the protocol was shared (``{"epoch", "epoch_start", "step"}``) still load.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator
from typing import Any

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
    """A DataLoader whose position ``(epoch, batches done)`` goes into Lightning checkpoints.

    For map-style data over an :class:`EpochSampler`; ``progress()`` gives the position
    (:func:`trainer_progress` of the attached trainer). See the module doc.
    """

    def __init__(self, *args, progress: Callable[[], tuple[int, int]] | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.progress = progress

    # -- the protocol --

    def state_dict(self) -> dict[str, int]:
        epoch, done = self.position()
        return {"epoch": int(epoch), "batches_done": int(done)}

    def load_state_dict(self, state: dict[str, int]) -> None:
        epoch, done = self.restore_position(state)
        length = self._epoch_length()
        if length is not None and done >= length:  # saved at the very end of an epoch: the next one starts afresh
            epoch, done = epoch + 1, 0
        holder = self.position_holder()
        if holder is None:
            warnings.warn("resuming mid-epoch with a wrapped sampler: the epoch restarts from its first batch",
                          RuntimeWarning, stacklevel=2)
            return
        holder.set_epoch(epoch)
        holder.skip_batches(done, self.batch_size or 1)

    # -- what differs by kind of data --

    def position(self) -> tuple[int, int]:
        """``(epoch, batches trained in it)``, for the checkpoint."""
        if self.progress is not None:
            return self.progress()
        return getattr(self.sampler, "epoch", 0), 0

    def restore_position(self, state: dict[str, int]) -> tuple[int, int]:
        """``(epoch, batches done)`` of a saved ``state``."""
        return state["epoch"], state["batches_done"]

    def position_holder(self) -> Any:
        """What takes ``set_epoch``/``skip_batches``: the sampler, unless wrapped (e.g. by Lightning for DDP)."""
        return self.sampler if isinstance(self.sampler, EpochSampler) else None

    def _epoch_length(self) -> int | None:
        return len(self)


class ResumableStreamLoader(ResumableDataLoader):
    """A :class:`ResumableDataLoader` over an iterable dataset that is its own position holder.

    At each ``iter()`` it sets the dataset's epoch to ``epoch_fn()``. Workers receive their
    copy of the dataset when the iterator starts, so the epoch and a pending skip reach them
    (do not use ``persistent_workers``); a pending skip is consumed by that one iteration.
    With ``step_fn`` (batches trained so far, from the trainer's exact step counter) it
    records the step its epoch started at, which gives the position in the epoch.
    """

    def __init__(self, dataset: Any, *args: Any, epoch_fn: Callable[[], int],
                 step_fn: Callable[[], int] | None = None, **kwargs: Any):
        super().__init__(dataset, *args, **kwargs)
        self.epoch_fn = epoch_fn
        self.step_fn = step_fn
        self._epoch_start: int | None = None
        self._restored = False

    def position(self) -> tuple[int, int]:
        step = self.step_fn() if self.step_fn is not None else 0
        start = self._epoch_start if self._epoch_start is not None else step
        return self.epoch_fn(), step - start

    def restore_position(self, state: dict[str, int]) -> tuple[int, int]:
        if "batches_done" in state:
            done = state["batches_done"]
            # the trainer's counters are restored by now: this epoch started `done` steps ago
            self._epoch_start = self.step_fn() - done if self.step_fn is not None else None
        else:  # written before the protocol was shared with the GLUE loaders
            done, self._epoch_start = state["step"] - state["epoch_start"], state["epoch_start"]
        self._restored = True
        return state["epoch"], done

    def position_holder(self) -> Any:
        return self.dataset

    def _epoch_length(self) -> int | None:
        return None  # a stream's epoch ends when it runs out

    def __iter__(self):
        self.dataset.set_epoch(self.epoch_fn())
        if not self._restored and self.step_fn is not None:
            self._epoch_start = self.step_fn()
        self._restored = False
        try:
            return super().__iter__()
        finally:
            self.dataset.skip_batches(0, 0)


def trainer_progress(trainer) -> tuple[int, int]:
    """``(epoch, batches trained in it)`` from a Lightning trainer's exact step counters."""
    batches = trainer.num_training_batches
    if not batches or batches == float("inf"):
        return trainer.current_epoch, 0
    done = trainer.global_step * trainer.accumulate_grad_batches - trainer.current_epoch * int(batches)
    return trainer.current_epoch, max(0, done)
