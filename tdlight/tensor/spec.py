"""The compression spec: what the user asks for, and its resolution to concrete ranks.

A :class:`CompressionSpec` may state ranks absolutely (``rank``, ``rank_in``, ``rank_out``,
``bank``), as fractions of the teacher (``rank_ratio`` = d/D, ``bank_ratio`` = k/n of a
group) so that presets apply to any teacher size, or as a ``target_ratio`` of the encoder
(the largest rank whose encoder compression ratio still reaches the target). When several
are set, the most explicit wins: rank_in/rank_out > rank > target_ratio > rank_ratio, and
bank > bank_ratio; so ``compression.rank=64`` overrides a preset's ratio.
:func:`resolve` turns it into a :class:`ResolvedSpec` of integers for one encoder shape.

Whole-model compression (the word embeddings, :mod:`tdlight.tensor.embedding`): ``embedding_rank``
r factorizes the word-embedding table as A (V×r) B (r×D) (None: dense); ``vocab`` keeps only the
rows of the tokens a text uses (None: the full vocabulary; a corpus path, or ``task``: the task's
training text), every other id reading the unknown token's row; ``embedding_weighting`` fits the
rows ``uniform`` ly or by their ``frequency`` on that text (or the calibration text). The kept
vocabulary's size is known once the text is tokenized: :attr:`ResolvedSpec.vocab_size`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from tdlight.errors import SpecError
from tdlight.tensor.decompose import BALANCES
from tdlight.tensor.embedding import WEIGHTINGS
from tdlight.tensor.factors import Ranks
from tdlight.tensor.hooi import INITS
from tdlight.tensor.layout import Layout
from tdlight.tensor.variants import VARIANTS, Variant, variant_of, with_bank


@dataclass(frozen=True)
class EncoderShape:
    """Sizes of a BERT-family model that the accounting needs."""

    num_layers: int
    hidden: int
    intermediate: int
    vocab_size: int = 0
    max_position: int = 0
    type_vocab: int = 0

    @property
    def ffn_blocks(self) -> int:
        return self.intermediate // self.hidden


@dataclass(frozen=True)
class CompressionSpec:
    variant: str = "tucker"  # dense | a name in tdlight.tensor.variants.VARIANTS (or its numeral)
    scope: str = "all"  # all | attention | ffn
    grouping: str = "none"  # none | type | layers
    layers_per_group: int | None = None
    rank: int | None = None  # d for both modes
    rank_in: int | None = None
    rank_out: int | None = None
    bank: int | None = None  # k per group (tucker)
    rank_ratio: float | None = None  # d / D
    bank_ratio: float | None = None  # k / n of each group
    target_ratio: float | None = None  # encoder compression ratio to reach
    balance: str = "none"  # none | slice | type
    init: str = "svd"  # svd | random
    max_iter: int = 100
    tol: float = 1e-4
    seed: int = 0
    embedding_rank: int | None = None  # r of the word-embedding table A (V×r) B (r×D); None: dense
    vocab: str | None = None  # None: the full vocabulary | a corpus path | task: the task's training text
    embedding_weighting: str | None = None  # uniform (None) | frequency: rows weighted by token counts


@dataclass(frozen=True)
class ResolvedSpec:
    """Integers for one encoder: ``banks[group]`` is k of that group (n for a variant without a bank).

    ``variant`` is the registered name; :attr:`strategy` is its :class:`~tdlight.tensor.variants.Variant`.
    The word embeddings: ``embedding_rank`` (None: dense rows), ``vocab`` (the restriction's source as
    given, None: full vocabulary) and ``vocab_size`` (the kept rows; None until the source is tokenized),
    ``embedding_weighting`` (how the low-rank fit weighted the rows).
    """

    variant: str
    layout: Layout
    rank_in: int
    rank_out: int
    banks: dict[str, int] = field(default_factory=dict)
    balance: str = "none"
    init: str = "svd"
    max_iter: int = 100
    tol: float = 1e-4
    seed: int = 0
    embedding_rank: int | None = None
    vocab: str | None = None
    vocab_size: int | None = None
    embedding_weighting: str | None = None

    @property
    def compresses_embeddings(self) -> bool:
        return self.embedding_rank is not None or self.vocab is not None

    @property
    def strategy(self) -> Variant:
        """What the variant does (its parameter count, fits and forward); ask it, not the name."""
        return variant_of(self.variant)

    def ranks(self, group: str) -> Ranks:
        return Ranks(self.rank_in, self.rank_out, self.banks[group] if self.strategy.has_bank else None)

    def to_dict(self) -> dict:
        lay = self.layout
        return {
            "variant": self.variant,
            "scope": lay.scope,
            "grouping": lay.grouping,
            "layers_per_group": lay.layers_per_group,
            "rank_in": self.rank_in,
            "rank_out": self.rank_out,
            "banks": dict(self.banks),
            "balance": self.balance,
            "init": self.init,
            "max_iter": self.max_iter,
            "tol": self.tol,
            "seed": self.seed,
            # the embedding keys only when set: an encoder-only spec's dict (and cache key) is unchanged
            **{k: getattr(self, k) for k in EMBEDDING_KEYS if getattr(self, k) is not None},
        }

    @classmethod
    def from_dict(cls, d: dict, shape: EncoderShape) -> ResolvedSpec:
        """The inverse of :meth:`to_dict`, checked: the dict comes from a file (``tdlight.json``)."""
        layout = Layout(shape.num_layers, shape.hidden, shape.ffn_blocks, d["scope"], d["grouping"], d["layers_per_group"])
        keys = ("balance", "init", "max_iter", "tol", "seed")
        out = cls(d["variant"], layout, d["rank_in"], d["rank_out"], dict(d["banks"]), **{k: d[k] for k in keys},
                  **{k: d.get(k) for k in EMBEDDING_KEYS})
        if out.variant not in VARIANTS:
            raise SpecError(f"variant={out.variant!r}; valid: {', '.join(VARIANTS)}")
        for name, r in (("rank_in", out.rank_in), ("rank_out", out.rank_out)):
            if isinstance(r, bool) or not isinstance(r, int) or not 1 <= r <= shape.hidden:
                raise SpecError(f"{name}={r!r}; valid: an integer in [1, {shape.hidden}]")
        groups = layout.groups
        if set(out.banks) != set(groups):
            raise SpecError(f"banks for groups {sorted(out.banks)}; valid: one per group {sorted(groups)}")
        for g, k in out.banks.items():
            if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= len(groups[g]):
                raise SpecError(f"bank of group {g!r} = {k!r}; valid: an integer in [1, {len(groups[g])}]")
        _check_embedding(out.embedding_rank, out.vocab, out.embedding_weighting, shape)
        if out.vocab is not None:
            v = out.vocab_size
            if isinstance(v, bool) or not isinstance(v, int) or not 1 <= v <= max(1, shape.vocab_size):
                raise SpecError(f"vocab_size={v!r}; valid: an integer in [1, {shape.vocab_size}] (the kept rows of "
                                f"the restricted vocabulary {out.vocab!r})")
        elif out.vocab_size is not None:
            raise SpecError(f"vocab_size={out.vocab_size!r} without a vocab restriction; valid: null")
        return out


EMBEDDING_KEYS = ("embedding_rank", "vocab", "vocab_size", "embedding_weighting")
TASK_VOCAB = "task"  # compression.vocab=task: the task's own training text


def _check_embedding(rank, vocab, weighting, shape: EncoderShape) -> None:
    """The word-embedding settings of a spec, each named with what is valid when impossible."""
    D = shape.hidden
    if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int) or not 1 <= rank <= D):
        raise SpecError(f"embedding_rank={rank!r}; valid: an integer in [1, {D}] (the hidden size), "
                        "or null (dense word embeddings)")
    if vocab is not None and (not isinstance(vocab, str) or not vocab.strip()):
        raise SpecError(f"vocab={vocab!r}; valid: null (the full vocabulary), {TASK_VOCAB} (the task's training "
                        "text) or the path of a text file (or directory or glob) whose tokens are kept")
    if weighting is not None:
        if weighting not in WEIGHTINGS:
            raise SpecError(f"embedding_weighting={weighting!r}; valid: {', '.join(WEIGHTINGS)} (or null: uniform)")
        if rank is None:
            raise SpecError(f"embedding_weighting={weighting!r} weights the rows of a low-rank fit: it needs "
                            "embedding_rank; valid: set embedding_rank, or leave embedding_weighting null")


def _check_ratio(name: str, value, lo: float, hi: float) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (lo < value <= hi):
        raise SpecError(f"{name}={value!r} is impossible: it must be a number in ({lo}, {hi}]")


def resolve(spec: CompressionSpec, shape: EncoderShape, *, vocab_size: int | None = None) -> ResolvedSpec:
    """Concrete ranks for ``shape``; raises :class:`SpecError` naming any impossible value.

    ``vocab_size``: the number of rows a ``vocab`` restriction keeps, once its text is tokenized
    (``tdlight.data.vocab``); without it the resolved spec's ``vocab_size`` stays None and
    :func:`tdlight.model.surgery.compress` fills it in from the token statistics it is given."""
    from tdlight.tensor.accounting import param_counts  # accounting imports this module

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
    _check_embedding(spec.embedding_rank, spec.vocab, spec.embedding_weighting, shape)
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
