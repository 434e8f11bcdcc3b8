"""Exact parameter and MAC accounting for every variant and layout.

Parameters are split into encoder weights (the decomposed matrices, or the dense ones
left out of the layout's scope), encoder biases, encoder LayerNorms, and embeddings
(word + position + token type + their LayerNorm). The *encoder* is weights + biases +
LayerNorms; the compression ratio is dense encoder / compressed encoder, as in the
paper (BERT-base: 85.1M dense). A group's factors count as its variant says
(:meth:`tdlight.tensor.variants.Variant.param_count`).

MACs are per token of a forward pass, counted the way ``tdlight.model`` computes it:
``x @ U`` once per group of blocks reading the same input (Q/K/V share one, the m
FFN-input blocks share one), the m FFN-output block products summed before ``@ Vᵀ``.
The per-forward core mixing C′ = P·𝒞 (n·k·a·b, independent of the batch) is reported
separately. Attention matmuls (QKᵀ and AV: 2·S·D per token per layer) are included in
the totals; element-wise work (softmax, GELU, LayerNorm) is not.
"""

from __future__ import annotations

from tdlight.tensor.layout import ATTENTION_TYPES, FFN_TYPES, Block
from tdlight.tensor.spec import EncoderShape, ResolvedSpec


def dense_counts(shape: EncoderShape) -> dict[str, int]:
    L, D, I = shape.num_layers, shape.hidden, shape.intermediate
    weights = L * (4 * D * D + 2 * D * I)
    biases = L * (4 * D + I + D)
    norms = L * 2 * 2 * D
    emb = (shape.vocab_size + shape.max_position + shape.type_vocab) * D + 2 * D
    return {
        "encoder_weights": weights,
        "encoder_biases": biases,
        "encoder_layernorms": norms,
        "encoder": weights + biases + norms,
        "embeddings": emb,
    }


def param_counts(shape: EncoderShape, spec: ResolvedSpec) -> dict[str, float]:
    """Dense and compressed parameter counts and the encoder compression ratio."""
    dense = dense_counts(shape)
    D = shape.hidden
    lay = spec.layout
    compressed_blocks = lay.num_blocks
    weights = (dense["encoder_weights"] - compressed_blocks * D * D) + sum(
        spec.strategy.param_count(len(blocks), spec.banks[g], D, D, spec.rank_in, spec.rank_out)
        for g, blocks in lay.groups.items()
    )
    encoder = weights + dense["encoder_biases"] + dense["encoder_layernorms"]
    return {
        "dense_encoder": dense["encoder"],
        "dense_encoder_weights": dense["encoder_weights"],
        "encoder_weights": weights,
        "encoder_biases": dense["encoder_biases"],
        "encoder_layernorms": dense["encoder_layernorms"],
        "encoder": encoder,
        "embeddings": dense["embeddings"],
        "ratio": dense["encoder"] / encoder,
    }


UNIT_KINDS = ("qkv", *ATTENTION_TYPES, *FFN_TYPES)  # "qkv": Q, K and V sharing one x @ U


def unit_macs(kind: str, D: int, m: int, a: int, b: int, shared_u: bool) -> tuple[int, int]:
    """``(factorized, dense)`` MACs per token of one unit of the forward: a factorized linear of block
    type ``kind``, or ``"qkv"`` for Q, K and V computed together from one ``x @ U``. ``m``: FFN blocks."""
    block = D * a + a * b + b * D  # one x @ U @ C′ @ Vᵀ
    if kind == "qkv":
        return D * a + 3 * (a * b + b * D), 3 * D * D
    if kind in ATTENTION_TYPES:
        return block, D * D
    if kind not in FFN_TYPES:
        raise ValueError(f"unknown unit kind {kind!r}; valid: {list(UNIT_KINDS)}")
    if not shared_u:
        return m * block, m * D * D
    if kind == "ffn_in":  # (x @ U) once, m cores, m @ Vᵀ
        return D * a + m * (a * b + b * D), m * D * D
    return m * (D * a + a * b) + b * D, m * D * D  # m chunks @ U, m cores summed, one @ Vᵀ


def _linear_macs(spec: ResolvedSpec | None, D: int, m: int, group_of) -> float:
    """Linear MACs per token for one layer; ``group_of(type)`` names the type's group or None."""
    if spec is None:
        return (4 + 2 * m) * D * D
    a, b = spec.rank_in, spec.rank_out
    shared_u = spec.strategy.shared_factors  # blocks reading one input share x @ U
    qkv_groups = {group_of(t) for t in ("query", "key", "value")}
    shared_qkv = shared_u and len(qkv_groups) == 1 and None not in qkv_groups
    total = unit_macs("qkv", D, m, a, b, shared_u)[0] if shared_qkv else 0.0
    for t in ATTENTION_TYPES + FFN_TYPES:
        if group_of(t) is None:
            total += unit_macs(t, D, m, a, b, shared_u)[1]
        elif not (shared_qkv and t in ("query", "key", "value")):
            total += unit_macs(t, D, m, a, b, shared_u)[0]
    return total


def macs(shape: EncoderShape, spec: ResolvedSpec | None, seq_len: int) -> dict[str, float]:
    """Encoder MACs per token (``spec=None``: the dense teacher)."""
    L, D, m = shape.num_layers, shape.hidden, shape.ffn_blocks
    linear = 0.0
    for layer in range(L):
        if spec is None:
            group_of = None
        else:
            index = spec.layout.index

            def group_of(t, layer=layer):
                entry = index.get(Block(layer, t, 0))
                return None if entry is None else entry[0]

        linear += _linear_macs(spec, D, m, group_of)
    attention = L * 2 * seq_len * D
    mixing = 0.0
    if spec is not None and spec.strategy.has_bank:
        mixing = sum(len(bl) * spec.banks[g] * spec.rank_in * spec.rank_out for g, bl in spec.layout.groups.items())
    return {"linear": linear, "attention": attention, "per_token": linear + attention, "core_mixing_per_forward": mixing}


def predicted_speedup(shape: EncoderShape, spec: ResolvedSpec, seq_len: int, tokens: int) -> float:
    """Dense / compressed encoder MACs for a forward over ``tokens`` tokens."""
    d = macs(shape, None, seq_len)
    c = macs(shape, spec, seq_len)
    return d["per_token"] * tokens / (c["per_token"] * tokens + c["core_mixing_per_forward"])
