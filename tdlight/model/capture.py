"""Capture a BERT's pre-softmax attention scores and hidden states in one forward.

Distillation (TinyBERT-style, as in the paper) matches the student's attention *scores*
— ``Q Kᵀ / √d`` before the mask and the softmax — to the teacher's. transformers 5 routes
attention through a registry (``AttentionInterface``), so instead of copying HF's
attention code we register one more implementation, ``"tdlight_scores"``: HF's own eager
attention, which also leaves the raw scores on the attention module. It gets the eager
(additive float) mask through ``AttentionMaskInterface``. :func:`forward_with_scores`
switches a model to it for one forward and back.

A family whose attention code does not go through that registry (MPNet, DeBERTa-v2: their
relative-position terms are added inside the module; ``scores="probabilities"`` in
:mod:`tdlight.model.families`) gives its attention probabilities instead
(``output_attentions=True``), and :func:`forward_with_scores` returns their logarithm: the
pre-softmax scores up to one constant per query row, zero where the key is padding.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from tdlight.model.families import family_of, resolve
from tdlight.model.surgery import get_encoder

SCORES_IMPL = "tdlight_scores"


def _scores_attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                      attention_mask: torch.Tensor | None, scaling: float | None = None, dropout: float = 0.0,
                      **kwargs):
    from transformers.models.bert.modeling_bert import eager_attention_forward

    scale = scaling if scaling is not None else query.size(-1) ** -0.5
    module.tdlight_scores = torch.matmul(query, key.transpose(2, 3)) * scale  # (B, H, S, S)
    return eager_attention_forward(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout,
                                   **kwargs)


def register() -> None:
    """Register ``"tdlight_scores"`` with transformers (idempotent)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface

    AttentionInterface.register(SCORES_IMPL, _scores_attention)
    AttentionMaskInterface.register(SCORES_IMPL, ALL_MASK_ATTENTION_FUNCTIONS["eager"])


@dataclass
class Internals:
    """What distillation compares. Layers are numbered 1..L; ``hidden_states[0]`` is the embedding output.

    * ``hidden_states``: L + 1 tensors (B, S, D)
    * ``scores``: L tensors (B, H, S, S), pre-softmax and unmasked (``scores[l - 1]`` is layer l)
    * ``logits``: (B, C) for a classifier, else ``None``
    * ``attention_mask``: (B, S), 1 for real tokens
    """

    hidden_states: tuple[torch.Tensor, ...]
    scores: list[torch.Tensor]
    logits: torch.Tensor | None
    attention_mask: torch.Tensor


def _self_attentions(model: nn.Module) -> list[nn.Module]:
    path = family_of(model).attention
    return [resolve(layer, path) for layer in get_encoder(model).layer]


def _log_probabilities(probs: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """log p (B, H, S, S) with padding keys set to 0 (their p is 0: the loss masks them, but 0 · −inf is NaN)."""
    keys = attention_mask[:, None, None, :].bool()
    return torch.where(keys, probs.clamp_min(torch.finfo(probs.dtype).tiny).log(), torch.zeros((), dtype=probs.dtype,
                                                                                                 device=probs.device))


def forward_with_scores(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                        token_type_ids: torch.Tensor | None = None) -> Internals:
    """One forward of an HF BERT (dense or compressed) returning its :class:`Internals`."""
    register()
    config = model.config
    previous = config._attn_implementation
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    inputs = {"input_ids": input_ids, "attention_mask": attention_mask}
    if token_type_ids is not None:
        inputs["token_type_ids"] = token_type_ids
    if family_of(model).scores == "probabilities":
        out = model(**inputs, output_hidden_states=True, output_attentions=True)
        scores = [_log_probabilities(p, attention_mask) for p in out.attentions]
        return Internals(tuple(out.hidden_states), scores, getattr(out, "logits", None), attention_mask)
    modules = _self_attentions(model)
    model.set_attn_implementation(SCORES_IMPL)
    try:
        out = model(**inputs, output_hidden_states=True)
        scores = [m.__dict__.pop("tdlight_scores") for m in modules]
    finally:
        for m in modules:
            m.__dict__.pop("tdlight_scores", None)
        model.set_attn_implementation(previous)
    return Internals(tuple(out.hidden_states), scores, getattr(out, "logits", None), attention_mask)
