"""What every compression variant answers: :class:`Variant`, and the registry's lookup."""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from typing import NamedTuple

import torch

from tdlight.errors import SpecError
from tdlight.tensor.factors import Factors, Fit, Ranks

NO_COMPRESSION = "dense"  # variant I: a valid word for "leave the weights alone", never a variant here

_REGISTRY: dict[str, Variant] = {}


class Fold(NamedTuple):
    """A grid of blocks as two GEMMs, the cores multiplied into one side (:meth:`Variant.fold`).

    ``side="right"``: ``first`` is U (A × a), applied to each of the n_in input chunks, ``second``
    the (n_out·B) × (n_in·a) matrix of the C′_jm Vᵀ. ``side="left"``: ``first`` is the
    (n_out·b) × (n_in·A) matrix of the U C′_jm, ``second`` is V (B × b), applied to each of the
    n_out output chunks. ``nn.Linear`` orientation (out × in) for the matrices built here, so each
    GEMM is one ``F.linear`` and the bias joins the last one."""

    side: str
    first: torch.Tensor
    second: torch.Tensor
    n_in: int
    n_out: int


def fold_macs(n_in: int, n_out: int, D: int, a: int, b: int) -> tuple[str, int]:
    """The cheaper folded form of an n_in × n_out grid of blocks ``U C′_jm Vᵀ`` and its MACs per token.

    Folding multiplies the mixed cores into one side once, leaving two GEMMs per forward:
    ``"right"`` — ``x_j @ U`` per input chunk, then one ``(n_in·a) × (n_out·D)`` matrix (C′Vᵀ);
    ``"left"`` — one ``(n_in·D) × (n_out·b)`` matrix (U C′), then ``@ Vᵀ`` per output chunk.
    The core product (a·b per block and token) is gone either way. :meth:`Variant.fold` builds the
    side chosen here; :mod:`tdlight.tensor.accounting` counts with it."""
    right = n_in * D * a + n_in * a * n_out * D
    left = n_in * D * n_out * b + n_out * b * D
    return ("right", right) if right <= left else ("left", left)


class Variant(ABC):
    """One compression variant: the facts that tell it apart and the math that differs.

    Its factors always have the form of :class:`~tdlight.tensor.factors.Factors`
    (W_i ≈ U_i (Σ_j P_ij C_j) V_iᵀ); the two facts below fix their shapes (:meth:`shapes`),
    hence the parameter count, the bank layout of :class:`tdlight.model.bank.FactorBank`
    and whether Q, K and V may share one ``x @ U``. The rest is the subclass's own math.
    """

    name: str  # the config value (compression.variant=<name>), also stored in saved models
    numeral: str  # its row in the paper (DESIGN §1), accepted as an alias of ``name``
    formula: str  # W_i ≈ ..., for messages and docs
    shared_factors: bool  # one U (A, a), V (B, b) for every block of a group; else U_i, V_i per block
    has_bank: bool  # a bank of k ≤ n cores mixed by P (n, k); else one core per block (k = n)
    iterative: bool  # fit_weights runs sweeps and reports each to its callback

    # --- facts derived from the two above ---

    def bank_size(self, ranks: Ranks, n: int) -> int:
        """k for a group of n blocks."""
        return ranks.bank if self.has_bank and ranks.bank is not None else n

    def check(self, ranks: Ranks, shape: Sequence[int]) -> None:
        """Raise :class:`SpecError` unless ``ranks`` are possible for ``shape`` = (n, A, B)."""
        ranks.check_bounds(shape)
        n = shape[0]
        k = ranks.bank
        if self.has_bank:
            if k is not None and (not isinstance(k, int) or isinstance(k, bool) or k < 1 or k > n):
                raise SpecError(
                    f"bank={k!r} is impossible: the bank size k must be an integer in [1, {n}] "
                    f"(n = {n} stacked matrices)"
                )
        elif k is not None and k != n:
            raise SpecError(
                f"bank={k!r} only applies to {with_bank()}; variant {self.name!r} "
                f"has one core per matrix (k = n = {n}): leave bank unset"
            )

    def shapes(self, n: int, k: int, A: int, B: int, a: int, b: int) -> dict[str, tuple[int, ...] | None]:
        """Shapes of U, V, core and P (``None``: no P) for n A×B blocks at ranks k, a, b."""
        per_block = () if self.shared_factors else (n,)
        return {"U": (*per_block, A, a), "V": (*per_block, B, b), "core": (k, a, b),
                "P": (n, k) if self.has_bank else None}

    def param_count(self, n: int, k: int, A: int, B: int, a: int, b: int) -> int:
        """Parameters of one group's factors."""
        return sum(math.prod(s) for s in self.shapes(n, k, A, B, a, b).values() if s is not None)

    # --- the math each variant does its own way ---

    @abstractmethod
    def fit_weights(self, tensor: torch.Tensor, ranks: Ranks, *, init: str, max_iter: int, tol: float,
                    seed: int, callback: Callable[[int, float], None] | None) -> Fit:
        """Factors of ``tensor`` (n, A, B) minimising the weight error (checked ranks, balanced tensor)."""

    @abstractmethod
    def fit_outputs(self, W: torch.Tensor, H: torch.Tensor, gidx: torch.Tensor, ranks: Ranks, *,
                    iters: int, cg_iters: int, tol: float, start: Factors | None,
                    callback: Callable[[int, float], None] | None) -> Fit:
        """Factors of ``W`` (n, A, B) minimising the relative output errors (:mod:`tdlight.tensor.whiten`).

        ``H`` (m, A, A) prepared Grams, ``gidx`` (n,) which Gram each block reads; all float64.
        """

    @abstractmethod
    def refit_blocks(self, factors: Factors, rows: torch.Tensor, W: torch.Tensor, H: torch.Tensor,
                     gidx: torch.Tensor, ridge: float) -> Factors:
        """``factors`` with the blocks ``rows`` refit to ``W`` (len(rows), A, B) in the output
        metric, what is shared by other blocks held fixed (W, H in float64)."""

    @abstractmethod
    def matmul(self, x: torch.Tensor, factors: Factors, blocks: torch.Tensor) -> torch.Tensor:
        """``x @ W`` for the block grid ``blocks`` (n_in, n_out) of slice indices, never forming W.

        ``x``: (…, n_in·A), input chunk j meets block row j; returns (…, n_out, B).
        """

    def fold(self, factors: Factors, blocks: torch.Tensor) -> Fold:
        """The grid ``blocks`` as two GEMMs (:class:`Fold`), for inference: fewer multiply-adds than
        :meth:`matmul` (no core product per token) at the memory of one (n_in·A or n_out·B) × rank
        matrix per grid. Only variants whose blocks share U and V have one."""
        raise SpecError(f"variant {self.name!r} has no folded form: its blocks share no factors "
                        f"(valid execution modes: factorized, dense)")

    def folded_matmul(self, x: torch.Tensor, fold: Fold, bias: torch.Tensor | None) -> torch.Tensor:
        """``x @ W + bias`` from :meth:`fold`'s two GEMMs: (…, n_out·B)."""
        raise SpecError(f"variant {self.name!r} has no folded form")

    def __repr__(self) -> str:
        return f"<variant {self.name} ({self.numeral}): {self.formula}>"


def register(*variants: Variant) -> dict[str, Variant]:
    """Make ``variants`` the ones :func:`variant_of` knows; returns them by name."""
    _REGISTRY.clear()
    _REGISTRY.update({v.name: v for v in variants})
    return _REGISTRY


def variant_of(name: str) -> Variant:
    """The variant called ``name`` (or its numeral); :class:`SpecError` naming the valid ones."""
    v = _REGISTRY.get(name)
    if v is not None:
        return v
    for v in _REGISTRY.values():
        if name == v.numeral:
            return v
    if name == NO_COMPRESSION:
        raise SpecError(f"variant {NO_COMPRESSION!r} (I) means no compression: there is nothing to decompose")
    valid = [v.name for v in _REGISTRY.values()] + [v.numeral for v in _REGISTRY.values()]
    raise SpecError(f"unknown variant {name!r}; valid: {valid} (plus {NO_COMPRESSION!r} for no compression)")


def with_bank() -> str:
    """The variants that take a bank size, for messages: ``variant 'tucker' (IV)``."""
    names = " or ".join(f"{v.name!r} ({v.numeral})" for v in _REGISTRY.values() if v.has_bank)
    return f"variant {names}"
