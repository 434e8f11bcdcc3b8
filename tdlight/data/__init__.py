"""Data: the GLUE tasks (``glue``: registry and TSV/hub reader; ``metrics``; ``datamodule``) and the pretraining corpus.

Nothing is imported here, so ``import tdlight.data.glue`` stays light (no Lightning, no transformers).
"""
