"""How a sentence-pair model reads its pair: as one sequence (``cross``, the GLUE default) or as two
sentences encoded apart and compared by the cosine of their embeddings (``bi``, a bi-encoder, as
sentence-transformers trains all-MiniLM-L6-v2).

A cross-encoder's prediction on a pair needs attention between the two sentences; a classifier on
the mean of a bag of words cannot compare them (a linear head on a sum has no product in it). A
bi-encoder puts the comparison outside the encoder — the cosine multiplies the two embeddings — so
an encoder whose attention is mostly lost (an extreme compression ratio) still compares: on STS-B dev
the embedded MiniLM's word embeddings alone, mean-pooled, give a Spearman correlation of 0.63 as a
bi-encoder (docs/RESULTS.md §12d), where a cross-encoder student at ratio 48 kept 0.10.

``bi`` is a head: :class:`PairCosine` replaces a ``*ForSequenceClassification``'s classifier, so the
model keeps the classifier's interface — ``model(input_ids, attention_mask, labels=...)`` returns
``logits`` (B, 1) and HF's regression loss — when its batch holds the first sentences of B pairs and
then their second sentences, (2B, S) (:class:`tdlight.data.datamodule.GlueDataModule` stacks them so).
The prediction is ``scale × cos(u, v)``, ``scale`` the top of the task's label range (STS-B: 5), so
the MSE on the labels is sentence-transformers' ``CosineSimilarityLoss`` scaled by ``scale²``.

The choice and the scale are stored in the HF config (``config.tdlight_pair_encoding``), saved in
``config.json`` and re-applied by every tdlight loader (:func:`tdlight.model.native.apply_config`).
The classifier's weights are gone: outside tdlight the directory is a sentence encoder
(``SentenceTransformer(dir, trust_remote_code=True)``: its embeddings' cosine times ``scale`` is the
prediction).
"""

from __future__ import annotations

import torch
from torch import nn

from tdlight.errors import TeacherError

PAIR_ENCODINGS = ("cross", "bi")
CONFIG_KEY = "tdlight_pair_encoding"  # {"encoding": "bi", "scale": float}; absent: cross


class PairCosine(nn.Module):
    """The head of a bi-encoder: pooled embeddings (2B, D) — B first sentences, then their B second
    sentences — to ``scale × cos`` (B, 1). No parameters."""

    def __init__(self, scale: float) -> None:
        super().__init__()
        self.scale = float(scale)

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        if pooled.ndim != 2 or pooled.shape[0] % 2:
            raise ValueError(f"a bi-encoder's batch holds the first and then the second sentence of each pair: "
                             f"an even number of rows; got pooled embeddings of shape {tuple(pooled.shape)}")
        u, v = pooled.float().chunk(2)
        return (self.scale * nn.functional.cosine_similarity(u, v, dim=-1)).to(pooled.dtype)[:, None]

    def extra_repr(self) -> str:
        return f"scale={self.scale}"


def pair_encoding_of(model: nn.Module) -> str:
    """``bi`` when ``model``'s classifier is a :class:`PairCosine`, else ``cross``."""
    return "bi" if isinstance(getattr(model, "classifier", None), PairCosine) else "cross"


def saved_pair_encoding(config) -> dict | None:
    """``{"encoding": "bi", "scale": s}`` as recorded in an HF config by :func:`set_pair_encoding`, or None."""
    value = getattr(config, CONFIG_KEY, None)
    if value is None:
        return None
    if not (isinstance(value, dict) and value.get("encoding") == "bi" and isinstance(value.get("scale"), (int, float))
            and value["scale"] > 0):
        raise TeacherError(f"config.json has {CONFIG_KEY}={value!r}; valid: absent (cross) or "
                           "{'encoding': 'bi', 'scale': a positive number}")
    return value


def set_pair_encoding(model: nn.Module, encoding: str, scale: float | None = None) -> nn.Module:
    """Make the sequence classifier ``model`` read a pair as ``encoding`` (in place; recorded in its config).

    ``bi`` replaces its classifier by :class:`PairCosine` (``scale``: the top of the label range) and
    needs a one-output (regression) classifier whose ``classifier`` reads the pooled embedding (BERT's
    family); ``cross`` on a bi-encoder is refused: its classifier's weights are gone.
    """
    if encoding not in PAIR_ENCODINGS:
        raise TeacherError(f"pair encoding {encoding!r}; valid: {list(PAIR_ENCODINGS)}")
    current = pair_encoding_of(model)
    if encoding == "cross":
        if current == "bi":
            raise TeacherError("this model is a bi-encoder (task.pair_encoding=bi when it was trained): it has no "
                               "cross-encoder head; valid for it: task.pair_encoding=bi")
        return model
    if scale is None or not scale > 0:
        raise TeacherError(f"a bi-encoder needs the top of the label range as its scale (> 0); got {scale!r}")
    if current == "bi":
        if model.classifier.scale != float(scale):
            raise TeacherError(f"this bi-encoder was trained at scale {model.classifier.scale} (the top of its "
                               f"task's label range), not {scale}")
        return model
    head = getattr(model, "classifier", None)
    base = getattr(model, "base_model", None)
    if not isinstance(head, nn.Linear) or base is None or getattr(base, "pooler", None) is None:
        raise TeacherError(f"task.pair_encoding=bi needs a classifier that reads the pooled embedding through a "
                           f"linear layer (BERT's family: BERT, MiniLM); {type(model).__name__} has "
                           f"{type(head).__name__} there; valid for it: task.pair_encoding=cross")
    if getattr(model.config, "num_labels", None) != 1:
        raise TeacherError(f"a bi-encoder predicts one similarity; this classifier has "
                           f"{model.config.num_labels} outputs (task.pair_encoding=bi is for a regression task)")
    model.classifier = PairCosine(scale)
    setattr(model.config, CONFIG_KEY, {"encoding": "bi", "scale": float(scale)})
    return model
