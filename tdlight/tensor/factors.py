"""The typed values every variant shares: ranks, factors, and a decomposition's result.

A stacked tensor 𝒲 ∈ ℝ^{n×A×B} (A = input dim, B = output dim) is approximated slice by
slice as Ŵ_i = U_i C′_i V_iᵀ with C′_i = Σ_j P_ij C_j. What a variant shares decides the
shapes (:mod:`tdlight.tensor.variants`); the arithmetic here only reads them.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from tdlight.errors import SpecError


@dataclass(frozen=True)
class Ranks:
    """``bank`` = k (``None`` means n), ``rank_in`` = d_in, ``rank_out`` = d_out.

    Whether a bank size may be given at all is the variant's rule
    (:meth:`tdlight.tensor.variants.Variant.check`).
    """

    rank_in: int
    rank_out: int
    bank: int | None = None

    def check_bounds(self, shape: Sequence[int]) -> None:
        """Raise :class:`SpecError` unless d_in and d_out fit ``shape`` = (n, A, B)."""
        n, a, b = shape
        for name, value, limit, mode in (
            ("rank_in", self.rank_in, a, "input dimension"),
            ("rank_out", self.rank_out, b, "output dimension"),
        ):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1 or value > limit:
                raise SpecError(
                    f"{name}={value!r} is impossible: it must be an integer in [1, {limit}] "
                    f"(the {mode} of the {n}×{a}×{b} stacked tensor)"
                )


@dataclass
class Factors:
    """The factors of one stacked tensor; shapes name n, A (in), B (out), k, a = d_in, b = d_out.

    * ``variant``: the name of the variant that made them (see :mod:`tdlight.tensor.variants`)
    * ``U``: (A, a) shared, or (n, A, a) per block
    * ``V``: (B, b) shared, or (n, B, b) per block
    * ``core``: (k, a, b); k = n when there is no bank
    * ``P``: (n, k) mixing a bank, or ``None`` (identity: one core per block)
    """

    variant: str
    U: torch.Tensor
    V: torch.Tensor
    core: torch.Tensor
    P: torch.Tensor | None = None

    @property
    def n(self) -> int:
        return self.P.shape[0] if self.P is not None else self.core.shape[0]

    @property
    def per_block(self) -> bool:
        """True when every block has its own U_i, V_i (nothing shared)."""
        return self.U.ndim == 3

    def slice_cores(self, idx: torch.Tensor | slice | None = None) -> torch.Tensor:
        """C′_i = Σ_j P_ij C_j for the selected slices: (len(idx), a, b)."""
        idx = slice(None) if idx is None else idx
        if self.P is None:
            return self.core[idx]
        k, a, b = self.core.shape
        return (self.P[idx] @ self.core.reshape(k, a * b)).reshape(-1, a, b)

    def reconstruct(self, idx: torch.Tensor | slice | None = None) -> torch.Tensor:
        """Ŵ_i = U C′_i Vᵀ for the selected slices: (len(idx), A, B)."""
        idx = slice(None) if idx is None else idx
        c = self.slice_cores(idx)
        if self.per_block:
            return self.U[idx] @ c @ self.V[idx].transpose(-1, -2)
        return self.U @ c @ self.V.t()

    def parameters(self) -> dict[str, torch.Tensor]:
        out = {"U": self.U, "V": self.V, "core": self.core}
        if self.P is not None:
            out["P"] = self.P
        return out

    def map(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> Factors:
        """The same factors with ``fn`` applied to every tensor (e.g. ``lambda t: t.detach()``)."""
        return Factors(self.variant, fn(self.U), fn(self.V), fn(self.core), None if self.P is None else fn(self.P))


@dataclass
class Decomposition:
    factors: Factors
    rel_error: float  # ‖𝒲 − 𝒲̂‖ / ‖𝒲‖
    slice_errors: torch.Tensor  # (n,) ‖W_i − Ŵ_i‖ / ‖W_i‖
    iterations: int
    converged: bool
    history: list[float] = field(default_factory=list)  # rel. error after each sweep


@dataclass
class Fit:
    """What a variant's fit returns; the caller adds the errors to make a :class:`Decomposition`."""

    factors: Factors
    iterations: int = 0
    converged: bool = True
    history: list[float] = field(default_factory=list)


def slice_errors(tensor: torch.Tensor, factors: Factors, chunk: int = 16) -> torch.Tensor:
    """Relative reconstruction error of every slice, computed explicitly in chunks: (n,)."""
    n = tensor.shape[0]
    errs = torch.empty(n, dtype=torch.float64)
    for s in range(0, n, chunk):
        idx = slice(s, min(n, s + chunk))
        x = tensor[idx]
        diff = (x - factors.reconstruct(idx)).flatten(1).norm(dim=1).double()
        base = x.flatten(1).norm(dim=1).double()
        errs[idx] = torch.where(base > 0, diff / base.clamp_min(1e-300), (diff > 0).double()).cpu()
    return errs
