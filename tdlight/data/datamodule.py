"""``GlueDataModule``: one GLUE task, tokenized once and cached, dynamically padded batches.

Tokenization runs through ``datasets.Dataset.map`` and the result is stored with
``save_to_disk`` under ``<cache_dir>/glue/<task>/<split>-<key>``, where the key hashes
the task, split, data source (local file path, size and SHA-256; or the hub dataset's
fingerprint), the tokenizer (name and a hash of its full definition), ``max_length`` and
the example limit. A second run with the same inputs loads the cache and does not
tokenize again; any change makes a new entry. An entry is written to a temporary
directory and renamed into place, so a run that fails (say, on a malformed row) leaves
no entry behind.

Batches are dicts of tensors: ``input_ids``, ``attention_mask``, ``token_type_ids`` (if
the tokenizer makes them) padded to the longest sequence of the batch, and ``labels``
(long; float for STS-B). ``extra`` adds other splits' inputs to the training split
(``stage.extra_text``: the task's unlabelled test pairs, or another task's with as many text
columns), each tokenized and cached as its own entry, with ``labels`` -1 (-1.0 for a regression):
examples for a teacher's soft targets only. With ``pair_encoding="bi"`` (a bi-encoder,
:mod:`tdlight.model.pairs`) each sentence of a pair is tokenized alone (its second sentence in the ``*_b`` columns) and a batch
of B pairs holds 2B sequences: the B first sentences, then the B second ones, padded together;
``labels`` stay B.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
from pathlib import Path

import lightning as L
import torch
from torch.utils.data import DataLoader

from tdlight.data.augment import MaskedLMCandidates, augment_columns, neighbour_table
from tdlight.data.glue import GlueTask, get_task, load_split, resolve_source
from tdlight.data.sampling import EpochSampler, ResumableDataLoader, trainer_progress
from tdlight.files import file_stamp, state_fingerprint, temporary_directory

log = logging.getLogger("tdlight.data")

CACHE_VERSION = 1
SECOND = "_b"  # suffix of a bi-encoder's second-sentence columns (input_ids_b, ...)
PAIR_ENCODINGS = ("cross", "bi")


def tokenizer_fingerprint(tokenizer) -> str:
    """A short hash of everything that decides how the tokenizer splits text."""
    h = hashlib.sha1()
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        # the backend's JSON also records the truncation/padding of its last call: leave them out
        spec = json.loads(backend.to_str())
        spec.pop("truncation", None)
        spec.pop("padding", None)
        h.update(json.dumps(spec, sort_keys=True).encode())
    else:
        h.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    h.update(type(tokenizer).__name__.encode())
    return h.hexdigest()[:16]


class GlueDataModule(L.LightningDataModule):
    """Train / validation / test dataloaders of one GLUE task.

    ``val_dataloader()`` is one loader, or a list in ``task.validation_splits`` order
    (MNLI: matched, mismatched). The train order is shuffled by ``(seed, epoch)`` with an
    :class:`~tdlight.data.sampling.EpochSampler`, so a resumed run replays it exactly.
    ``limit_train`` / ``limit_eval`` keep the first N examples (smoke runs, tests);
    ``train=False`` prepares only the evaluation splits.
    """

    def __init__(self, task: str | GlueTask, tokenizer, *, data_dir: str | os.PathLike | None, source: str = "auto",
                 max_length: int = 128, batch_size: int = 32, eval_batch_size: int | None = None,
                 num_workers: int = 0, cache_dir: str | os.PathLike | None = None, seed: int = 0,
                 limit_train: int | None = None, limit_eval: int | None = None, train: bool = True,
                 augment: dict | None = None, pair_encoding: str = "cross",
                 extra: tuple[tuple[str | GlueTask, str], ...] = (), limit_extra: int | None = None):
        super().__init__()
        self.task = get_task(task)
        if pair_encoding not in PAIR_ENCODINGS:
            raise ValueError(f"pair_encoding={pair_encoding!r}; valid: {list(PAIR_ENCODINGS)}")
        if pair_encoding == "bi" and len(self.task.text_columns) != 2:
            raise ValueError(f"pair_encoding='bi' encodes the two sentences of a pair apart; {self.task.name} has "
                             f"{len(self.task.text_columns)} text column(s); valid for it: 'cross'")
        self.pair_encoding = pair_encoding
        self.tokenizer = tokenizer
        self.data_dir = Path(data_dir) if data_dir is not None else None
        self.source = source
        self.max_length = max_length
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.num_workers = num_workers
        self.cache_dir = Path(cache_dir) if cache_dir is not None else None
        self.seed = seed
        self.limit_train, self.limit_eval = limit_train, limit_eval
        self.train = train  # False: evaluation only, the train split is never read
        # {"copies", "prob", "neighbours"} and either "embeddings" ((V, D) tensor: embedding-neighbour
        # candidates) or "mlm" (a *ForMaskedLM: its in-context predictions): augment the train split
        # (tdlight.data.augment); the augmented text is cached with the tokenized split
        self.augment = augment
        # (task, split) pairs whose inputs join the training split without their labels (see the module's doc)
        self.extra = tuple((get_task(t), s) for t, s in extra)
        self.limit_extra = limit_extra
        self.extra_examples = 0  # how many of the training split's examples came from ``extra`` (set by setup)
        self.val_split_names = self.task.validation_splits
        self.datasets: dict[str, object] = {}
        self.tokenized_now: list[str] = []  # splits tokenized (not loaded from cache) by this instance
        for name, value in (("max_length", max_length), ("batch_size", batch_size)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}={value!r} must be a positive integer")
        self._collate = None

    # --- tokenization and cache ---------------------------------------------------------

    def _limit(self, split: str, extra: bool = False) -> int | None:
        if extra:
            return self.limit_extra
        return self.limit_train if split == "train" else self.limit_eval

    def _cache_key(self, split: str, task: GlueTask | None = None) -> tuple[str, dict]:
        """The cache entry's key and what it hashes; ``task`` given: an ``extra`` source's split."""
        extra = task is not None
        task = task or self.task
        limit = self._limit(split, extra)
        kind, path = resolve_source(task, split, self.data_dir, self.source)
        if kind == "local":
            src = file_stamp(path)
        else:
            src = {"hub": f"{task.hub_config}/{split}"}
        aug = None
        if split == "train" and not extra and self.augment:
            aug = {k: self.augment[k] for k in ("copies", "prob", "neighbours")}
            if self.augment.get("mlm") is not None:  # the candidates depend on every weight of the MLM
                aug["mlm"] = state_fingerprint(self.augment["mlm"].state_dict())[:16]
            else:
                aug["embeddings"] = state_fingerprint({"embeddings": self.augment["embeddings"]})[:16]
            aug["seed"] = self.seed
        info = {"version": CACHE_VERSION, "task": task.name, "split": split, "source": src, "augment": aug,
                "tokenizer": getattr(self.tokenizer, "name_or_path", ""), "tokenizer_hash": tokenizer_fingerprint(self.tokenizer),
                "max_length": self.max_length, "limit": limit}
        if self.pair_encoding != "cross":  # (cross-encoded entries keep the keys they had before bi existed)
            info["pair_encoding"] = self.pair_encoding
        return hashlib.sha1(json.dumps(info, sort_keys=True).encode()).hexdigest()[:16], info

    def _tokenize(self, split: str, task: GlueTask | None = None):
        extra = task is not None  # an ``extra`` source's split: its own limit, never augmented
        task = task or self.task
        limit = self._limit(split, extra)
        ds = load_split(task, split, data_dir=self.data_dir, source=self.source)
        if limit is not None:
            ds = ds.select(range(min(limit, len(ds))))
        cols = task.text_columns
        if split == "train" and not extra and self.augment:
            import datasets

            a = self.augment
            table = mlm = None
            if a.get("mlm") is not None:
                mlm = MaskedLMCandidates(a["mlm"], self.tokenizer, a["neighbours"], max_length=self.max_length)
            else:
                table = neighbour_table(a["embeddings"], self.tokenizer, a["neighbours"])
            ds = datasets.Dataset.from_dict(augment_columns(ds.to_dict(), cols, self.tokenizer, table, mlm=mlm,
                                                            copies=a["copies"], prob=a["prob"], seed=self.seed))
        tok, max_length, bi = self.tokenizer, self.max_length, self.pair_encoding == "bi"

        def encode(batch):
            texts = [batch[c] for c in cols]
            if bi:  # each sentence alone: the second's columns get the suffix
                enc = dict(tok(texts[0], truncation=True, max_length=max_length))
                enc.update({k + SECOND: v for k, v in tok(texts[1], truncation=True, max_length=max_length).items()})
            else:
                enc = tok(*texts, truncation=True, max_length=max_length)
            enc["labels"] = batch["label"]
            return enc

        self.tokenized_now.append(f"{task.name}:{split}" if extra else split)
        return ds.map(encode, batched=True, remove_columns=list(ds.column_names),
                      desc=f"tokenizing {task.name} {split}", keep_in_memory=True)

    def _load(self, split: str, task: GlueTask | None = None):
        """One split, tokenized (or read from the cache); ``task`` given: an ``extra`` source."""
        import datasets

        if self.cache_dir is None:
            return self._tokenize(split, task)
        key, info = self._cache_key(split, task)
        entry = self.cache_dir / "glue" / (task or self.task).name / f"{split}-{key}"
        if (entry / "tdlight_cache.json").is_file():
            return datasets.load_from_disk(str(entry))
        ds = self._tokenize(split, task)
        entry.parent.mkdir(parents=True, exist_ok=True)
        tmp = temporary_directory(entry.parent, f".{entry.name}-")
        try:
            with _no_datasets_bars():  # the tokenizing bar above is the step's one bar
                ds.save_to_disk(str(tmp))
            (tmp / "tdlight_cache.json").write_text(json.dumps(info, indent=2))
            try:
                os.replace(tmp, entry)
            except OSError:  # another process made the same entry meanwhile: keep theirs
                shutil.rmtree(tmp, ignore_errors=True)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        log.info("cached tokenized %s %s in %s", (task or self.task).name, split, entry)
        return datasets.load_from_disk(str(entry))

    def _load_train(self):
        """The training split, followed by the ``extra`` splits' examples with their labels replaced by -1."""
        import datasets

        ds = self._load("train")
        if not self.extra:
            return ds
        blank = -1.0 if self.task.is_regression else -1
        parts = []
        for task, split in self.extra:
            part = self._load(split, task)
            with _no_datasets_bars():  # (the tokenizing bar is the one a user watches)
                part = part.map(lambda b: {"labels": [blank] * len(b["labels"])}, batched=True, keep_in_memory=True)
                parts.append(part.cast(ds.features, keep_in_memory=True))
        self.extra_examples = sum(len(p) for p in parts)
        return datasets.concatenate_datasets([ds, *parts])

    def _splits_for(self, stage: str | None) -> list[str]:
        if stage in ("fit", None):
            train = ["train"] if self.train and "train" in self.task.splits else []
            return [*train, *self.task.validation_splits]
        if stage == "validate":
            return list(self.task.validation_splits)
        if stage in ("test", "predict"):
            return list(self.task.test_splits)
        return []

    def prepare_data(self) -> None:
        """Tokenize and cache the train and validation splits (once, on one process)."""
        self.setup("fit")

    def setup(self, stage: str | None = None) -> None:
        for split in self._splits_for(stage):
            if split not in self.datasets:
                self.datasets[split] = self._load_train() if split == "train" else self._load(split)

    # --- loaders -------------------------------------------------------------------------

    def collate(self, features: list[dict]) -> dict[str, torch.Tensor]:
        if self._collate is None:
            from transformers import DataCollatorWithPadding

            self._collate = DataCollatorWithPadding(self.tokenizer, return_tensors="pt")
        if self.pair_encoding == "bi":
            batch = self._collate_pairs(features)
        else:
            batch = dict(self._collate(features))
        if self.task.is_regression:
            batch["labels"] = batch["labels"].float()
        return batch

    def _collate_pairs(self, features: list[dict]) -> dict[str, torch.Tensor]:
        """A bi-encoder's batch: the first sentences, then the second ones, padded together (2B rows); every
        other column (labels, cached teacher logits) one row per pair."""
        second = [k for k in features[0] if k.endswith(SECOND)]
        tokens = {k.removesuffix(SECOND) for k in second}
        sentences = ([{k: f[k] for k in tokens} for f in features]
                     + [{k: f[k + SECOND] for k in tokens} for f in features])
        batch = dict(self._collate(sentences))
        for k in features[0]:
            if k not in tokens and k not in second:
                batch[k] = torch.tensor([f[k] for f in features])
        return batch

    def _loader(self, split: str, train: bool) -> DataLoader:
        ds = self.datasets[split]
        # own generator: creating the iterator must not draw from the global RNG (dropout's)
        gen = torch.Generator().manual_seed(self.seed)
        kwargs = dict(batch_size=self.batch_size if train else self.eval_batch_size,
                      sampler=EpochSampler(len(ds), self.seed, shuffle=train), collate_fn=self.collate,
                      num_workers=self.num_workers, generator=gen, persistent_workers=self.num_workers > 0)
        if train:
            trainer = self.trainer
            progress = (lambda: trainer_progress(trainer)) if trainer is not None else None
            return ResumableDataLoader(ds, progress=progress, **kwargs)
        return DataLoader(ds, **kwargs)

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", train=True)

    def val_dataloader(self):
        loaders = [self._loader(s, train=False) for s in self.task.validation_splits]
        return loaders[0] if len(loaders) == 1 else loaders

    def test_dataloader(self):
        loaders = [self._loader(s, train=False) for s in self.task.test_splits]
        return loaders[0] if len(loaders) == 1 else loaders


@contextlib.contextmanager
def _no_datasets_bars():
    import datasets

    was = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        if was:
            datasets.enable_progress_bars()
