"""What tdlight needs to know of one encoder family: where its linears live (:class:`Family`).

A family is a declaration, not code: the attribute path from the base model to the module that
holds the layer list, the attribute path of each of the six linears of DESIGN §1 inside one layer
(Q, K, V, attention output, FFN input, FFN output), the attention module and how its scores are
read, and the config keys that differ between families. Surgery, calibration (the output fit and
refit), execution plans, save/load, the HF-native directories and ONNX export all reach a model's
linears through :func:`family_of`, never through a hard-coded path.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

from torch import nn

from tdlight.errors import TeacherError

BLOCK_TYPES = ("query", "key", "value", "attn_out", "ffn_in", "ffn_out")
# how distillation reads a layer's attention scores (tdlight.model.capture):
#   interface      the pre-softmax scores Q Kᵀ/√d, through transformers' AttentionInterface (the
#                  family's attention calls ALL_ATTENTION_FUNCTIONS with HF's eager semantics)
#   probabilities  the log of the attention probabilities (``output_attentions=True``): the
#                  scores up to one constant per query row, for families whose attention code does
#                  not go through the interface (relative position terms inside the module)
SCORE_SOURCES = ("interface", "probabilities")


@dataclass(frozen=True)
class Family:
    """One encoder family's module layout, as attribute paths (dotted strings)."""

    name: str  # tdlight's name for it, e.g. "distilbert"
    model_types: tuple[str, ...]  # the HF ``config.model_type`` values it covers
    linears: dict[str, str]  # block type -> path inside one layer, e.g. "attention.q_lin"
    attention: str  # path inside one layer of the module the attention interface is called on
    encoder: str = "encoder"  # path from the base model to the module holding ``layer``
    scores: str = "interface"  # one of SCORE_SOURCES
    intermediate_key: str = "intermediate_size"  # the config key of the FFN width
    dropout_keys: tuple[str, ...] = ("hidden_dropout_prob", "attention_probs_dropout_prob")
    # modules outside the layers (paths from the base model) counted with the embeddings: relative-
    # position tables the layers share, an embedding projection; never compressed
    embedding_extras: tuple[str, ...] = ()
    # the module of a *ForSequenceClassification that receives the last hidden states (B, S, D) and
    # reads their first token (RoBERTa's `classifier`, DeBERTa's `pooler`): mean pooling feeds it the
    # masked mean instead (tdlight.model.pooling). None: the classifier reads base_model.pooler (BERT)
    # or slices the first token itself (DistilBERT: mean pooling is refused)
    first_token_head: str | None = None
    # positions are numbered from the padding index + 1 (RoBERTa, MPNet): the position table holds
    # that many fewer tokens than max_position_embeddings
    positions_after_padding: bool = False
    # a config this layout cannot compress exactly (returns why, or None); checked at lookup
    refuse: Callable[[object], str | None] | None = None

    def __post_init__(self):
        if set(self.linears) != set(BLOCK_TYPES):
            raise ValueError(f"family {self.name!r} declares {sorted(self.linears)}; it needs {list(BLOCK_TYPES)}")
        if self.scores not in SCORE_SOURCES:
            raise ValueError(f"family {self.name!r}: scores={self.scores!r}; valid: {list(SCORE_SOURCES)}")

    def path(self, type_: str) -> tuple[str, ...]:
        return tuple(self.linears[type_].split("."))


REGISTRY: dict[str, Family] = {}  # model_type -> family


def register(families: Iterable[Family]) -> dict[str, Family]:
    """Add families to the registry (one model type belongs to one family); returns them by name."""
    out = {}
    for fam in families:
        for t in fam.model_types:
            if t in REGISTRY and REGISTRY[t] is not fam:
                raise ValueError(f"model type {t!r} is declared by families {REGISTRY[t].name!r} and {fam.name!r}")
            REGISTRY[t] = fam
        out[fam.name] = fam
    return out


def supported() -> list[str]:
    return sorted(REGISTRY)


def _model_type(config) -> str | None:
    t = getattr(config, "model_type", None)
    return t.removeprefix("tdlight_") if isinstance(t, str) else None  # (tdlight.model.native's prefix)


def family_of(model_or_config) -> Family:
    """The :class:`Family` of an HF model (or its config), by ``config.model_type``; anything else is
    refused with the list of what is supported."""
    config = getattr(model_or_config, "config", model_or_config)
    t = _model_type(config)
    fam = REGISTRY.get(t)
    name = type(model_or_config).__name__
    if fam is None:
        raise TeacherError(
            f"{name} (model_type {t!r}) is not BERT-shaped: tdlight compresses encoders whose layers have "
            f"separate Q, K, V, attention-output and two FFN linears; supported model types: {supported()}. "
            "(ModernBERT is not: its fused Wqkv and gated FFN are another block grid, see the README.)")
    if fam.refuse is not None:
        why = fam.refuse(config)
        if why:
            raise TeacherError(f"{name} ({fam.name}): {why}")
    return fam


def resolve(root: nn.Module, path: str | tuple[str, ...]) -> nn.Module | None:
    """``root.a.b.c`` for the path ``a.b.c``; None where an attribute is missing."""
    obj = root
    for p in (path.split(".") if isinstance(path, str) else path):
        obj = getattr(obj, p, None)
        if obj is None:
            return None
    return obj


def max_tokens(config) -> int | None:
    """The longest sequence ``config``'s position table holds (None: the config does not say)."""
    limit = getattr(config, "max_position_embeddings", None)
    if not isinstance(limit, int) or not limit:
        return None
    if REGISTRY.get(_model_type(config)) is not None and family_of(config).positions_after_padding:
        limit -= (getattr(config, "pad_token_id", None) or 0) + 1
    return limit
