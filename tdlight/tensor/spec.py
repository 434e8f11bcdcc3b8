"""The compression spec: what the user asks for, and its resolution to concrete ranks.

A :class:`CompressionSpec` may state ranks absolutely (``rank``, ``rank_in``, ``rank_out``,
``bank``), as fractions of the teacher (``rank_ratio`` = d/D, ``bank_ratio`` = k/n of a
group) so that presets apply to any teacher size, or as a ``target_ratio`` of the encoder
(the largest rank whose encoder compression ratio still reaches the target). ``group_banks``
sets k of the groups it names (``{attention: 24, ffn: 12}`` under ``grouping=type``): with
``target_ratio``, a lower ratio for one block type at the same total ratio. When several
are set, the most explicit wins: rank_in/rank_out > rank > target_ratio > rank_ratio, and
group_banks > bank > bank_ratio; so ``compression.rank=64`` overrides a preset's ratio.
:func:`resolve` turns it into a :class:`ResolvedSpec` of integers for one encoder shape.
The types (:class:`CompressionSpec`, :class:`ResolvedSpec`, :class:`EncoderShape`) are plain data
defined in :mod:`tdlight.tensor.spec_data`, below the accounting that reads them; import them from
either module.

Whole-model compression (the word embeddings, :mod:`tdlight.tensor.embedding`): ``embedding_rank``
r factorizes the word-embedding table as A (V×r) B (r×D) (None: dense); ``vocab`` keeps only the
rows of the tokens a text uses (None: the full vocabulary; a corpus path, or ``task``: the task's
training text), every other id reading the unknown token's row; ``embedding_weighting`` fits the
rows ``uniform`` ly or by their ``frequency`` on that text (or the calibration text). The kept
vocabulary's size is known once the text is tokenized: :attr:`ResolvedSpec.vocab_size`.
"""

from __future__ import annotations

import math

from tdlight.errors import SpecError
from tdlight.tensor.accounting import param_counts
from tdlight.tensor.decompose import BALANCES
from tdlight.tensor.hooi import INITS
from tdlight.tensor.layout import Layout
from tdlight.tensor.spec_data import (
    EMBEDDING_KEYS,
    TASK_VOCAB,
    CompressionSpec,
    EncoderShape,
    ResolvedSpec,
    check_bank,
    check_embedding,
)
from tdlight.tensor.variants import variant_of, with_bank

__all__ = ["EMBEDDING_KEYS", "TASK_VOCAB", "CompressionSpec", "EncoderShape", "ResolvedSpec", "resolve"]


def _check_ratio(name: str, value, lo: float, hi: float) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (lo < value <= hi):
        raise SpecError(f"{name}={value!r} is impossible: it must be a number in ({lo}, {hi}]")


def _apply_group_banks(banks: dict[str, int], spec: CompressionSpec, layout: Layout, has_bank: bool) -> None:
    """Set the bank of every group ``spec.group_banks`` names, each checked against the layout."""
    sizes = {g: len(blocks) for g, blocks in layout.groups.items()}
    valid = ", ".join(f"{g} (n={n})" for g, n in sizes.items())
    if not isinstance(spec.group_banks, dict):
        raise SpecError(f"group_banks={spec.group_banks!r}; valid: a mapping of group name to bank size k, "
                        f"over the groups of grouping={layout.grouping!r}: {valid}")
    if not has_bank:
        raise SpecError(f"group_banks={spec.group_banks!r} only applies to {with_bank()}; variant "
                        f"{spec.variant!r} has one core per matrix: leave it unset")
    for g, k in spec.group_banks.items():
        if g not in sizes:
            hint = "" if layout.grouping != "none" else " (set grouping=type or layers to have several groups)"
            raise SpecError(f"group_banks names group {g!r}, which grouping={layout.grouping!r} does not have; "
                            f"valid groups: {valid}{hint}")
        check_bank(f"group_banks[{g!r}]={k!r}", k, sizes[g])
        banks[g] = k


def resolve(spec: CompressionSpec, shape: EncoderShape, *, vocab_size: int | None = None) -> ResolvedSpec:
    """Concrete ranks for ``shape``; raises :class:`SpecError` naming any impossible value.

    ``vocab_size``: the number of rows a ``vocab`` restriction keeps, once its text is tokenized
    (``tdlight.data.vocab``); without it the resolved spec's ``vocab_size`` stays None and
    :func:`tdlight.model.surgery.compress` fills it in from the token statistics it is given."""
    strategy = variant_of(spec.variant)  # the one place a spec's variant name is looked up
    if spec.balance not in BALANCES:
        raise SpecError(f"unknown balance {spec.balance!r}; valid: {list(BALANCES)}")
    if spec.init not in INITS:
        raise SpecError(f"unknown init {spec.init!r}; valid: {list(INITS)}")
    if not isinstance(spec.max_iter, int) or spec.max_iter < 1:
        raise SpecError(f"max_iter={spec.max_iter!r} must be a positive integer")
    if shape.intermediate % shape.hidden:
        raise SpecError(
            f"intermediate size {shape.intermediate} is not a multiple of hidden size {shape.hidden}: "
            "the FFN matrices cannot be cut into D×D blocks"
        )
    layout = Layout(shape.num_layers, shape.hidden, shape.ffn_blocks, spec.scope, spec.grouping, spec.layers_per_group)
    D = shape.hidden
    check_embedding(spec.embedding_rank, spec.vocab, spec.embedding_weighting, shape)
    if vocab_size is not None and spec.vocab is None:
        raise SpecError(f"vocab_size={vocab_size} given for a spec without a vocab restriction")
    if vocab_size is not None and (isinstance(vocab_size, bool) or not isinstance(vocab_size, int)
                                   or not 1 <= vocab_size <= max(1, shape.vocab_size)):
        raise SpecError(f"vocab_size={vocab_size!r}; valid: an integer in [1, {shape.vocab_size}]")
    embedding = {"embedding_rank": spec.embedding_rank, "vocab": spec.vocab, "vocab_size": vocab_size,
                 "embedding_weighting": spec.embedding_weighting}
    _check_ratio("rank_ratio", spec.rank_ratio, 0.0, 1.0)
    _check_ratio("bank_ratio", spec.bank_ratio, 0.0, 1.0)
    if spec.target_ratio is not None:
        _check_ratio("target_ratio", spec.target_ratio, 1.0, math.inf)

    # Bank size per group.
    banks: dict[str, int] = {}
    for g, blocks in layout.groups.items():
        n = len(blocks)
        if not strategy.has_bank:
            if spec.bank is not None or spec.bank_ratio is not None:
                raise SpecError(
                    f"bank / bank_ratio only apply to {with_bank()}; variant {spec.variant!r} "
                    "has one core per matrix: leave them unset"
                )
            banks[g] = n
        elif spec.bank is not None:  # an absolute bank size wins over bank_ratio
            banks[g] = spec.bank
        elif spec.bank_ratio is not None:
            banks[g] = max(1, round(spec.bank_ratio * n))
        else:
            banks[g] = n
    if spec.group_banks is not None:
        _apply_group_banks(banks, spec, layout, strategy.has_bank)

    # Ranks of the two factor modes. Precedence (so that a command-line override beats a
    # preset's ratio): rank_in / rank_out > rank > target_ratio > rank_ratio.
    d_in = spec.rank_in if spec.rank_in is not None else spec.rank
    d_out = spec.rank_out if spec.rank_out is not None else spec.rank
    solve = spec.target_ratio is not None and d_in is None and d_out is None
    if not solve and spec.rank_ratio is not None:
        d_in = max(1, round(spec.rank_ratio * D)) if d_in is None else d_in
        d_out = max(1, round(spec.rank_ratio * D)) if d_out is None else d_out

    def make(di, do) -> ResolvedSpec:
        r = ResolvedSpec(strategy.name, layout, di, do, banks, spec.balance, spec.init, spec.max_iter, spec.tol,
                         spec.seed, **embedding)
        for g, blocks in layout.groups.items():
            strategy.check(r.ranks(g), (len(blocks), D, D))
        return r

    if solve:
        best = None
        for d in range(1, D + 1):  # ratio falls monotonically with d
            r = make(d, d)
            if param_counts(shape, r)["ratio"] >= spec.target_ratio:
                best = r
            else:
                break
        if best is None:
            smallest = param_counts(shape, make(1, 1))["ratio"]
            raise SpecError(
                f"target_ratio={spec.target_ratio} is out of reach for this teacher and bank: "
                f"even rank 1 gives ratio {smallest:.1f}"
            )
        return best
    if d_in is None or d_out is None:
        raise SpecError(
            "no rank given: set compression.rank (or rank_in and rank_out), rank_ratio or target_ratio"
        )
    return make(d_in, d_out)
