"""What a sequence classifier reads: the [CLS] pooler or the masked mean of the last hidden states.

HF's ``BertForSequenceClassification`` feeds its classifier ``base_model.pooler(h)``, a
dense + tanh layer on the first token's last hidden state. That fits BERT, whose [CLS]
was trained for next-sentence prediction, but not a mean-pooling sentence encoder such as
the embedded all-MiniLM-L6-v2: its [CLS] state is nearly the same vector for every input
(mean pairwise cosine 1.000 in layers 0-5 over SST-2 sentences), so a classifier on it
starts blind, and the small differences it needs are the first thing a lossy
decomposition erases. ``pooling="mean"`` swaps the pooler for :class:`MeanPooler` (no
parameters): the classifier then reads the mean of the last hidden states over real
tokens, as sentence-transformers does.

The choice is stored in the HF config (``config.tdlight_pooling``), so it is saved in
``config.json`` with the model and re-applied by every tdlight loader. Outside tdlight a
directory of a mean-pooling model carries a tdlight model type and a modeling file
(:mod:`tdlight.model.native`): ``from_pretrained(dir, trust_remote_code=True)`` pools as it
was trained, and without the flag transformers refuses it rather than reading [CLS].

HF calls the pooler with the hidden states only; the attention mask reaches it through a
forward pre-hook on the base model (HF offers no other way without copying its forward).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from tdlight.errors import TeacherError

POOLINGS = ("cls", "mean")
CONFIG_KEY = "tdlight_pooling"


class MeanPooler(nn.Module):
    """Replaces ``base_model.pooler``: (B, S, D) last hidden states -> (B, D) masked mean.

    ``mask`` (B, S) is set for one forward pass by the base model's pre-hook
    (:func:`set_pooling`); without one every position counts.
    """

    def __init__(self) -> None:
        super().__init__()
        self.mask: torch.Tensor | None = None

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        mask, self.mask = self.mask, None
        if mask is None:
            return hidden_states.mean(dim=1)
        w = mask[..., None].to(hidden_states.dtype)
        return (hidden_states * w).sum(dim=1) / w.sum(dim=1).clamp_min(1.0)


def _attention_mask(module: nn.Module, args: tuple, kwargs: dict) -> torch.Tensor | None:
    if "attention_mask" in kwargs:
        return kwargs["attention_mask"]
    # positional call: HF's BERT-family forward(input_ids, attention_mask, ...)
    return args[1] if len(args) > 1 and isinstance(args[1], torch.Tensor) else None


def _give_mask(module: nn.Module, args: tuple, kwargs: dict) -> None:
    pooler = getattr(module, "pooler", None)
    if isinstance(pooler, MeanPooler):
        mask = _attention_mask(module, args, kwargs)
        pooler.mask = mask if mask is None or mask.ndim == 2 else None


def pooling_of(model: nn.Module) -> str:
    """The pooling a (tdlight-loaded) model's classifier reads: ``cls`` or ``mean``."""
    base = getattr(model, "base_model", model)
    return "mean" if isinstance(getattr(base, "pooler", None), MeanPooler) else "cls"


def set_pooling(model: nn.Module, pooling: str) -> nn.Module:
    """Make ``model`` (a classifier or a bare BERT-family encoder) pool by ``pooling``; in place.

    ``mean`` needs a base model with a ``pooler`` that its classifier reads (the BERT
    family); ``cls`` on a model that already pools by mean is refused, because its [CLS]
    pooler weights are gone. Records the choice in ``model.config``.
    """
    if pooling not in POOLINGS:
        raise TeacherError(f"pooling={pooling!r} is not a pooling; valid: {list(POOLINGS)}")
    base = getattr(model, "base_model", model)
    current = pooling_of(model)
    if pooling == current:
        pass
    elif pooling == "mean":
        if getattr(base, "pooler", None) is None:
            raise TeacherError(f"pooling='mean' needs a model whose classifier reads base_model.pooler (BERT "
                               f"family); {type(model).__name__} has none; valid for it: pooling='cls'")
        base.pooler = MeanPooler()
    else:
        raise TeacherError(f"pooling='cls' cannot be used with this {type(model).__name__}: it was saved with "
                           "pooling='mean' and has no [CLS] pooler weights; valid for it: pooling='mean'")
    if pooling == "mean" and not getattr(base, "_tdlight_mask_hook", False):
        base.register_forward_pre_hook(_give_mask, with_kwargs=True)
        base._tdlight_mask_hook = True
    setattr(model.config, CONFIG_KEY, pooling)
    return model


def saved_pooling(config) -> str | None:
    """The pooling recorded in an HF config by :func:`set_pooling`, if any."""
    value = getattr(config, CONFIG_KEY, None)
    if value is not None and value not in POOLINGS:
        raise TeacherError(f"config.json has {CONFIG_KEY}={value!r}; valid: {list(POOLINGS)}")
    return value


def native_pooling(path: str | None) -> str:
    """The pooling a checkpoint was trained for: ``mean`` for a sentence-transformers directory
    whose ``1_Pooling/config.json`` says mean tokens (the embedded MiniLM), else ``cls``."""
    import json

    if path:
        f = Path(path) / "1_Pooling" / "config.json"
        if f.is_file():
            try:
                if json.loads(f.read_text()).get("pooling_mode_mean_tokens"):
                    return "mean"
            except (OSError, ValueError):
                pass
    return "cls"


def resolve_pooling(requested: str | None, config, path: str | None) -> str:
    """The pooling to use: the one saved with the model wins; ``auto``/``None`` then falls back to
    the checkpoint's native pooling; an explicit request that contradicts a saved one is refused."""
    requested = None if requested in (None, "auto") else requested
    if requested is not None and requested not in POOLINGS:
        raise TeacherError(f"pooling={requested!r} is not a pooling; valid: ['auto', 'cls', 'mean']")
    saved = saved_pooling(config)
    if saved is not None:
        if requested is not None and requested != saved:
            raise TeacherError(f"{path or 'the model'} was trained with pooling={saved!r}; it cannot be read with "
                               f"pooling={requested!r} (valid: {saved!r} or auto)")
        return saved
    return requested or native_pooling(path)
