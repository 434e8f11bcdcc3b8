"""The text corpus for reconstruction pretraining: streamed, packed, shuffled, sharded.

A corpus is a list of text files read line by line (``.gz`` transparently), never loaded
whole, so a corpus larger than memory works. One module per step, bottom up:

* :mod:`.files` -- which files a spec names (path, directory, glob, list), each checked to
  exist and hold text; reading their lines.
* :mod:`.documents` -- the two formats (plain, WikiText) as a stream of paragraphs, each
  placed in its file, block and document; which documents are held out.
* :mod:`.packing` -- paragraphs to fixed-length ``[CLS] ... [SEP]`` sequences, per block.
* :mod:`.dataset` -- :class:`~.dataset.PackedCorpusDataset`: one shard's sequences
  (sharded over DDP ranks and DataLoader workers), capped, shuffled per epoch, and able to
  start part-way into an epoch.
* :mod:`.datamodule` -- :class:`~.datamodule.CorpusDataModule`: the train and held-out
  datasets and their loaders for Lightning.

Saving and restoring the stream position in checkpoints is the same protocol as the GLUE
loaders': :class:`tdlight.data.sampling.ResumableDataLoader` (see that module).

Nothing is imported here: import from the module that defines a name.
"""
