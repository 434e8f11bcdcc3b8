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

Families whose classifier has no base-model pooler but a head that reads the first token of the
last hidden states (RoBERTa's and ELECTRA's and MPNet's ``classifier``, DeBERTa's ``pooler``:
``Family.first_token_head``) pool by mean through a forward pre-hook on that head instead: it
is handed the masked mean as its one "token", so its own weights read the sentence embedding
(nothing is dropped, so ``cls`` can be set back). A bare encoder of such a family records the
choice in its config for the classifier built on it.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from tdlight.errors import TeacherError
from tdlight.model.families import family_of, resolve

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


class _HeadMean:
    """The forward pre-hook of a first-token head under mean pooling: (B, S, D) -> its masked mean as
    one token, (B, 1, D). The mask comes from a pre-hook on the base model, as for :class:`MeanPooler`."""

    def __init__(self) -> None:
        self.pooler = MeanPooler()  # (its forward only: not registered as a submodule, no parameters)

    def remove(self, *modules: nn.Module) -> None:
        """Unhook it from ``modules`` (found by identity, so a deep copy of the model unhooks its own)."""
        for m in modules:
            for key in [k for k, f in m._forward_pre_hooks.items() if getattr(f, "__self__", None) is self]:
                del m._forward_pre_hooks[key]
                m._forward_pre_hooks_with_kwargs.pop(key, None)

    def on_base(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        mask = _attention_mask(module, args, kwargs)
        self.pooler.mask = mask if mask is None or mask.ndim == 2 else None

    def on_head(self, module: nn.Module, args: tuple):
        return (self.pooler(args[0])[:, None, :], *args[1:])


def _head_path(model: nn.Module) -> str | None:
    """Where the family's classifier keeps its first-token head (``Family.first_token_head``); None if it
    has none or the model belongs to no family."""
    try:
        return family_of(model).first_token_head
    except TeacherError:
        return None


def _first_token_head(model: nn.Module) -> nn.Module | None:
    """The classifier head that reads the first token, for a family that declares one (None for a bare
    encoder, or a family whose classifier reads base_model.pooler)."""
    if getattr(model, "base_model", model) is model:
        return None
    path = _head_path(model)
    return resolve(model, path) if path else None


def pooling_of(model: nn.Module) -> str:
    """The pooling a (tdlight-loaded) model's classifier reads: ``cls`` or ``mean``."""
    base = getattr(model, "base_model", model)
    if isinstance(getattr(base, "pooler", None), MeanPooler):
        return "mean"
    head = _first_token_head(model)
    if head is not None:
        return "mean" if getattr(head, "_tdlight_mean", None) is not None else "cls"
    if base is model and getattr(base, "pooler", None) is None:  # a bare encoder that pools in its head
        return getattr(getattr(model, "config", None), CONFIG_KEY, None) or "cls"
    return "cls"


def set_pooling(model: nn.Module, pooling: str) -> nn.Module:
    """Make ``model`` (a classifier or a bare BERT-family encoder) pool by ``pooling``; in place.

    ``mean`` needs a base model with a ``pooler`` that its classifier reads (BERT), or a head
    that reads the first token (``Family.first_token_head``: RoBERTa, ELECTRA, MPNet, DeBERTa);
    ``cls`` on a BERT that already pools by mean is refused, because its [CLS] pooler weights are
    gone. Records the choice in ``model.config``.
    """
    if pooling not in POOLINGS:
        raise TeacherError(f"pooling={pooling!r} is not a pooling; valid: {list(POOLINGS)}")
    base = getattr(model, "base_model", model)
    current = pooling_of(model)
    head = _first_token_head(model)
    if pooling == current:
        pass
    elif head is not None:  # a head that reads the first token: hooked, or unhooked
        if pooling == "mean":
            hook = _HeadMean()
            base.register_forward_pre_hook(hook.on_base, with_kwargs=True)
            head.register_forward_pre_hook(hook.on_head)
            head._tdlight_mean = hook
        else:
            head._tdlight_mean.remove(base, head)
            head._tdlight_mean = None
        setattr(model.config, CONFIG_KEY, pooling)
        return model
    elif pooling == "mean":
        if getattr(base, "pooler", None) is None:
            if base is model and _head_path(model):  # recorded for the classifier built on it
                setattr(model.config, CONFIG_KEY, pooling)
                return model
            raise TeacherError(f"pooling='mean' needs a model whose classifier reads base_model.pooler or the "
                               f"first token of the last hidden states; {type(model).__name__} reads neither "
                               "(DistilBERT slices its first token inside its forward); valid for it: pooling='cls'")
        base.pooler = MeanPooler()
    elif base is model and getattr(base, "pooler", None) is None:  # a bare encoder without a pooler
        setattr(model.config, CONFIG_KEY, pooling)
        return model
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
