"""The compression spec as data: the encoder's sizes, what the user asks for, and its resolution.

:class:`EncoderShape` (the sizes of a teacher), :class:`CompressionSpec` (the request, its fields
documented in :mod:`tdlight.tensor.spec`, which turns it into numbers with
:func:`~tdlight.tensor.spec.resolve`) and :class:`ResolvedSpec` (the integers for one encoder, and
its round trip through a saved model's ``tdlight.json``). Each choice's vocabulary lives where the
choice is implemented: variants in :mod:`tdlight.tensor.variants`, scopes and groupings in
:mod:`tdlight.tensor.layout`, balances in :mod:`tdlight.tensor.decompose`, inits in
:mod:`tdlight.tensor.hooi`, embedding weightings in :mod:`tdlight.tensor.embedding`.

Below :mod:`tdlight.tensor.spec` and :mod:`tdlight.tensor.accounting`, which read these types: it
imports only the leaf modules that define the values it holds (layout, factors, embedding, variants, hooi).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from tdlight.errors import SpecError
from tdlight.tensor.embedding import WEIGHTINGS
from tdlight.tensor.factors import Ranks
from tdlight.tensor.hooi import INIT, MAX_ITER, TOL
from tdlight.tensor.layout import Layout
from tdlight.tensor.variants import VARIANTS, Variant, variant_of


@dataclass(frozen=True)
class EncoderShape:
    """Sizes of a BERT-family model that the accounting needs.

    ``embedding_width``: the width of the embedding tables where it is not ``hidden`` (ELECTRA's
    ``embedding_size``; 0 = ``hidden``). ``extra_embeddings``: dense parameters counted with the
    embeddings beyond the word/position/token-type tables and their LayerNorm — relative-position
    tables outside the layers (MPNet, DeBERTa) and a narrower embedding's projection (ELECTRA),
    as the family declares them (:mod:`tdlight.model.families`); never compressed."""

    num_layers: int
    hidden: int
    intermediate: int
    vocab_size: int = 0
    max_position: int = 0
    type_vocab: int = 0
    embedding_width: int = 0
    extra_embeddings: int = 0

    @property
    def embedding_dim(self) -> int:
        return self.embedding_width or self.hidden

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
    group_banks: dict[str, int] | None = None  # k of the groups it names (tucker), over bank / bank_ratio
    rank_ratio: float | None = None  # d / D
    bank_ratio: float | None = None  # k / n of each group
    target_ratio: float | None = None  # encoder compression ratio to reach
    balance: str = "none"  # none | slice | type
    init: str = INIT  # svd | random
    max_iter: int = MAX_ITER
    tol: float = TOL
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
    init: str = INIT
    max_iter: int = MAX_ITER
    tol: float = TOL
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
            check_bank(f"bank of group {g!r} = {k!r}", k, len(groups[g]))
        check_embedding(out.embedding_rank, out.vocab, out.embedding_weighting, shape)
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


def check_bank(what: str, k, n: int) -> None:
    """A group's bank size k: an integer in [1, n] (its blocks), else refused as ``what`` says."""
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= n:
        raise SpecError(f"{what}; valid: an integer in [1, {n}]")


def check_embedding(rank, vocab, weighting, shape: EncoderShape) -> None:
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
