"""The factor bank: U, V, 𝒞 and P of one group as trainable parameters."""

from __future__ import annotations

import torch
from torch import nn

from tdlight.tensor.factors import Factors
from tdlight.tensor.variants import Variant, variant_of


class FactorBank(nn.Module):
    """Factors of n stacked D×D blocks: W_i = U (Σ_j P_ij C_j) Vᵀ.

    Shapes (a = d_in, b = d_out) are the variant's
    (:meth:`~tdlight.tensor.variants.Variant.shapes`):

    * ``U``: (D, a) — or (n, D, a) when the variant shares no factors (one U_i per block)
    * ``V``: (D, b) — or (n, D, b) likewise
    * ``core``: (k, a, b), the bank 𝒞 (k = n for a variant without a bank)
    * ``P``: (n, k) for a variant with a bank; absent otherwise (identity)
    """

    def __init__(self, variant: str, n: int, k: int, hidden: int, rank_in: int, rank_out: int):
        super().__init__()
        self.variant = variant
        shapes = self.strategy.shapes(n, k, hidden, hidden, rank_in, rank_out)
        self.U = nn.Parameter(torch.zeros(shapes["U"]))
        self.V = nn.Parameter(torch.zeros(shapes["V"]))
        self.core = nn.Parameter(torch.zeros(shapes["core"]))
        self.P = nn.Parameter(torch.zeros(shapes["P"])) if shapes["P"] is not None else None

    @property
    def strategy(self) -> Variant:
        """The variant's strategy object (its forward, refit, facts)."""
        return variant_of(self.variant)

    @classmethod
    def from_factors(cls, f: Factors) -> FactorBank:
        k, a, b = f.core.shape
        bank = cls(f.variant, f.n, k, f.U.shape[-2], a, b)
        bank.load_factors(f)
        return bank

    @torch.no_grad()
    def load_factors(self, f: Factors) -> None:
        self.U.copy_(f.U)
        self.V.copy_(f.V)
        self.core.copy_(f.core)
        if self.P is not None:
            self.P.copy_(f.P)

    def factors(self) -> Factors:
        """A differentiable view of the parameters as :class:`~tdlight.tensor.factors.Factors`."""
        return Factors(self.variant, self.U, self.V, self.core, self.P)

    def slice_cores(self, idx: torch.Tensor) -> torch.Tensor:
        """C′_i = Σ_j P_ij C_j for the blocks ``idx``: (len(idx), a, b)."""
        return self.factors().slice_cores(idx)

    def reconstruct(self, idx: torch.Tensor) -> torch.Tensor:
        """The D×D blocks W_i (``x @ W`` orientation) for ``idx``: (len(idx), D, D)."""
        return self.factors().reconstruct(idx)

    def extra_repr(self) -> str:
        k, a, b = self.core.shape
        n = self.P.shape[0] if self.P is not None else k
        return f"variant={self.variant}, n={n}, k={k}, hidden={self.U.shape[-2]}, rank_in={a}, rank_out={b}"
