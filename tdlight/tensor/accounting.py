"""Exact parameter and MAC accounting for every variant and layout.

Parameters are split into encoder weights (the decomposed matrices, or the dense ones
left out of the layout's scope), encoder biases, encoder LayerNorms, and embeddings
(word + position + token type + their LayerNorm, and a family's relative-position tables or
embedding projection: ``EncoderShape.extra_embeddings``). The *encoder* is weights + biases +
LayerNorms; the compression ratio is dense encoder / compressed encoder, as in the
paper (BERT-base: 85.1M dense). A group's factors count as its variant says
(:meth:`tdlight.tensor.variants.Variant.param_count`). The *model* is embeddings + encoder
(the pooler and task heads, which depend on the task, are left out of both sides); the
whole-model ratio, dense / compressed model, is what the user's file sees. Word embeddings
compressed to rank r over V′ kept rows count V′·r + r·D (the id map from teacher ids to kept
rows is a buffer, not a parameter).

MACs are per token of a forward pass, counted the way ``tdlight.model`` computes it:
``x @ U`` once per group of blocks reading the same input (Q/K/V share one, the m
FFN-input blocks share one), the m FFN-output block products summed before ``@ Vᵀ``.
The per-forward core mixing C′ = P·𝒞 (n·k·a·b, independent of the batch) is reported
separately. Attention matmuls (QKᵀ and AV: 2·S·D per token per layer) are included in
the totals; element-wise work (softmax, GELU, LayerNorm) is not.

*Stored* parameters (:func:`stored_weights`) are what an execution plan keeps of the encoder
weights — what an exported graph holds: a factorized unit reads its group's bank (stored once
however many units read it), a folded or dense unit stores its own matrices.
"""

from __future__ import annotations

from tdlight.errors import SpecError
from tdlight.tensor.layout import ATTENTION_TYPES, BLOCK_TYPES, FFN_TYPES, Block
from tdlight.tensor.spec_data import EncoderShape, ResolvedSpec
from tdlight.tensor.variants.base import fold_macs  # the fold's side and cost: decided where the fold is built


def dense_counts(shape: EncoderShape) -> dict[str, int]:
    L, D, I = shape.num_layers, shape.hidden, shape.intermediate
    weights = L * (4 * D * D + 2 * D * I)
    biases = L * (4 * D + I + D)
    norms = L * 2 * 2 * D
    E = shape.embedding_dim
    emb = (shape.vocab_size + shape.max_position + shape.type_vocab) * E + 2 * E + shape.extra_embeddings
    return {
        "encoder_weights": weights,
        "encoder_biases": biases,
        "encoder_layernorms": norms,
        "encoder": weights + biases + norms,
        "embeddings": emb,
    }


def nearest_depth(shape: EncoderShape, target: float) -> int:
    """The layer count L in 0..``shape.num_layers`` whose dense encoder (``L`` of ``shape``'s layers,
    weights + biases + LayerNorms) has the parameter count nearest to ``target`` (a tie goes to the
    smaller L): the depth of the teacher cut to the size of a compressed student, its peer at equal
    size. L = 0 is the embeddings alone (an encoder of no parameters)."""
    if isinstance(target, bool) or not isinstance(target, (int, float)) or target < 0:
        raise SpecError(f"target={target!r}; valid: a parameter count ≥ 0")
    per_layer = dense_counts(EncoderShape(1, shape.hidden, shape.intermediate))["encoder"]
    return min(range(shape.num_layers + 1), key=lambda n: (abs(n * per_layer - target), n))


def embedding_counts(shape: EncoderShape, spec: ResolvedSpec | None = None) -> dict[str, int]:
    """Word-embedding and all-embedding parameters, dense and as ``spec`` compresses them.

    A restricted vocabulary whose size is not known yet (``spec.vocab_size`` None) is counted at
    the full vocabulary (an upper bound)."""
    V, D = shape.vocab_size, shape.embedding_dim
    rows = V if spec is None or spec.vocab_size is None else spec.vocab_size
    r = None if spec is None else spec.embedding_rank
    word = rows * r + r * D if r is not None else rows * D
    rest = (shape.max_position + shape.type_vocab) * D + 2 * D + shape.extra_embeddings
    return {"dense_word_embeddings": V * D, "word_embeddings": word, "dense_embeddings": V * D + rest,
            "embeddings": word + rest}


def param_counts(shape: EncoderShape, spec: ResolvedSpec) -> dict[str, float]:
    """Dense and compressed parameter counts, the encoder compression ratio (the paper's) and the
    whole-model ratio (embeddings + encoder)."""
    dense = dense_counts(shape)
    D = shape.hidden
    lay = spec.layout
    compressed_blocks = lay.num_blocks
    weights = (dense["encoder_weights"] - compressed_blocks * D * D) + sum(
        spec.strategy.param_count(len(blocks), spec.banks[g], D, D, spec.rank_in, spec.rank_out)
        for g, blocks in lay.groups.items()
    )
    encoder = weights + dense["encoder_biases"] + dense["encoder_layernorms"]
    emb = embedding_counts(shape, spec)
    return {
        "dense_encoder": dense["encoder"],
        "dense_encoder_weights": dense["encoder_weights"],
        "encoder_weights": weights,
        "encoder_biases": dense["encoder_biases"],
        "encoder_layernorms": dense["encoder_layernorms"],
        "encoder": encoder,
        "embeddings": emb["embeddings"],
        "word_embeddings": emb["word_embeddings"],
        "dense_embeddings": emb["dense_embeddings"],
        "ratio": dense["encoder"] / encoder,
        "dense_model": dense["encoder"] + emb["dense_embeddings"],
        "model": encoder + emb["embeddings"],
        "model_ratio": (dense["encoder"] + emb["dense_embeddings"]) / (encoder + emb["embeddings"]),
    }


UNIT_KINDS = ("qkv", *ATTENTION_TYPES, *FFN_TYPES)  # "qkv": Q, K and V sharing one x @ U


def unit_grid(kind: str, m: int) -> tuple[int, int]:
    """(n_in, n_out) D×D blocks of one unit: Q/K/V together 1 × 3, one attention matrix 1 × 1,
    the FFN input 1 × m, the FFN output m × 1."""
    if kind == "qkv":
        return 1, 3
    if kind in ATTENTION_TYPES:
        return 1, 1
    if kind in FFN_TYPES:
        return (1, m) if kind == "ffn_in" else (m, 1)
    raise ValueError(f"unknown unit kind {kind!r}; valid: {list(UNIT_KINDS)}")


def unit_macs(kind: str, D: int, m: int, a: int, b: int, shared_u: bool) -> dict[str, int]:
    """MACs per token of one unit of the forward in each mode it can run in: ``factorized``,
    ``folded`` (:func:`fold_macs`; only where the blocks share U and V) and ``dense``. A unit is a
    factorized linear of block type ``kind``, or ``"qkv"`` for Q, K and V computed together from
    one ``x @ U``. ``m``: FFN blocks."""
    n_in, n_out = unit_grid(kind, m)
    dense = n_in * n_out * D * D
    if not shared_u:  # every block its own x @ U_i @ C_i @ V_iᵀ
        return {"factorized": n_in * n_out * (D * a + a * b + b * D), "dense": dense}
    # x_j @ U once per input chunk, one matmul with the n_in·a × n_out·b grid of cores, @ Vᵀ once per output chunk
    factorized = n_in * D * a + n_in * n_out * a * b + n_out * b * D
    return {"factorized": factorized, "folded": fold_macs(n_in, n_out, D, a, b)[1], "dense": dense}


def unit_stored(kind: str, D: int, m: int, a: int, b: int, shared_u: bool) -> dict[str, int]:
    """Parameters one unit stores as its own in each mode it can run in: ``factorized`` 0 (it reads
    its group's bank, counted once per group by :func:`stored_weights`); ``folded`` the fold's
    per-unit matrix — (n_out·D) × (n_in·a) beside the group's U when folded into Vᵀ (``"right"``
    side of :func:`fold_macs`), (n_out·b) × (n_in·D) beside its V otherwise; ``dense``
    n_in·n_out·D². Only where the blocks share U and V is there a folded form. Biases are the same
    in every mode and not counted."""
    n_in, n_out = unit_grid(kind, m)
    dense = n_in * n_out * D * D
    if not shared_u:
        return {"factorized": 0, "dense": dense}
    side, _ = fold_macs(n_in, n_out, D, a, b)
    folded = n_out * D * n_in * a if side == "right" else n_out * b * n_in * D
    return {"factorized": 0, "folded": folded, "dense": dense}


def layer_units(spec: ResolvedSpec, layer: int) -> list[tuple[str, str | None]]:
    """(unit kind, group) of every unit of one layer, in forward order; group ``None``: a block type
    outside the layout's scope (a plain dense linear). Q, K and V form one ``qkv`` unit when their
    variant shares U and one group holds all three."""
    index = spec.layout.index
    group = {t: (index.get(Block(layer, t, 0)) or (None,))[0] for t in BLOCK_TYPES}
    qkv = {group[t] for t in ("query", "key", "value")}
    if spec.strategy.shared_factors and len(qkv) == 1 and None not in qkv:
        out = [("qkv", group["query"])]
    else:
        out = [(t, group[t]) for t in ("query", "key", "value")]
    return out + [(t, group[t]) for t in ("attn_out", *FFN_TYPES)]


def stored_weights(shape: EncoderShape, spec: ResolvedSpec, modes: dict[str, str] | None = None) -> dict[str, int]:
    """Encoder weight parameters stored under an execution plan (``modes``: unit kind → mode,
    default factorized; :mod:`tdlight.model.execution`), as an exported graph holds them:
    ``banks`` — U, V, 𝒞 and P of each group a factorized unit reads, once per group; ``shared`` —
    the U (or V) that folded units of a group without a stored bank read; ``folded`` and ``dense``
    — the units' own matrices (:func:`unit_stored`; ``dense`` includes the blocks outside the
    layout); ``total``. All factorized, ``total`` is :func:`param_counts`' ``encoder_weights``;
    all dense, the teacher's."""
    L, D, m = shape.num_layers, shape.hidden, shape.ffn_blocks
    a, b = spec.rank_in, spec.rank_out
    shared_u = spec.strategy.shared_factors
    modes = modes or {}
    banks, u_read, v_read = set(), set(), set()
    own = {"folded": 0, "dense": 0}
    for layer in range(L):
        for kind, group in layer_units(spec, layer):
            per = unit_stored(kind, D, m, a, b, shared_u)
            if group is None:
                own["dense"] += per["dense"]
                continue
            mode = modes.get(kind, "factorized")
            if mode not in per:
                raise ValueError(f"mode {mode!r} for unit kind {kind!r}; valid: {list(per)}")
            if mode == "factorized":
                banks.add(group)
                continue
            own[mode] += per[mode]
            if mode == "folded":
                side, _ = fold_macs(*unit_grid(kind, m), D, a, b)
                (u_read if side == "right" else v_read).add(group)
    bank = sum(spec.strategy.param_count(len(spec.layout.groups[g]), spec.banks[g], D, D, a, b) for g in banks)
    shared = D * a * len(u_read - banks) + D * b * len(v_read - banks)
    return {"banks": bank, "shared": shared, **own, "total": bank + shared + own["folded"] + own["dense"]}


def _linear_macs(spec: ResolvedSpec | None, D: int, m: int, group_of, modes: dict[str, str],
                 used: set[str]) -> float:
    """Linear MACs per token for one layer; ``group_of(type)`` names the type's group or None;
    ``modes``: unit kind → mode (default factorized); the modes counted are added to ``used``."""
    if spec is None:
        return (4 + 2 * m) * D * D
    a, b = spec.rank_in, spec.rank_out
    shared_u = spec.strategy.shared_factors  # blocks reading one input share x @ U

    def unit(kind: str) -> int:
        used.add(modes.get(kind, "factorized"))
        return unit_macs(kind, D, m, a, b, shared_u)[modes.get(kind, "factorized")]

    qkv_groups = {group_of(t) for t in ("query", "key", "value")}
    shared_qkv = shared_u and len(qkv_groups) == 1 and None not in qkv_groups
    total = unit("qkv") if shared_qkv else 0.0
    for t in ATTENTION_TYPES + FFN_TYPES:
        if group_of(t) is None:
            total += unit_macs(t, D, m, a, b, shared_u)["dense"]
        elif not (shared_qkv and t in ("query", "key", "value")):
            total += unit(t)
    return total


def macs(shape: EncoderShape, spec: ResolvedSpec | None, seq_len: int,
         modes: dict[str, str] | None = None) -> dict[str, float]:
    """Encoder MACs per token (``spec=None``: the dense teacher); ``modes``: an execution plan's
    unit kind → mode (:mod:`tdlight.model.execution`; default: all factorized, as trained)."""
    L, D, m = shape.num_layers, shape.hidden, shape.ffn_blocks
    modes, used = modes or {}, set()
    linear = 0.0
    for layer in range(L):
        if spec is None:
            group_of = None
        else:
            index = spec.layout.index

            def group_of(t, layer=layer):
                entry = index.get(Block(layer, t, 0))
                return None if entry is None else entry[0]

        linear += _linear_macs(spec, D, m, group_of, modes, used)
    attention = L * 2 * seq_len * D
    mixing = 0.0
    if spec is not None and spec.strategy.has_bank and "factorized" in used:  # folded / dense: mixed once, cached
        mixing = sum(len(bl) * spec.banks[g] * spec.rank_in * spec.rank_out for g, bl in spec.layout.groups.items())
    return {"linear": linear, "attention": attention, "per_token": linear + attention, "core_mixing_per_forward": mixing}


def predicted_speedup(shape: EncoderShape, spec: ResolvedSpec, seq_len: int, tokens: int,
                      modes: dict[str, str] | None = None) -> float:
    """Dense / compressed encoder MACs for a forward over ``tokens`` tokens (``modes``: see :func:`macs`)."""
    d = macs(shape, None, seq_len)
    c = macs(shape, spec, seq_len, modes)
    return d["per_token"] * tokens / (c["per_token"] * tokens + c["core_mixing_per_forward"])
