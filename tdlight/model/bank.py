"""The factor bank: U, V, 𝒞 and P of one group as trainable parameters."""

from __future__ import annotations

import torch
from torch import nn

from tdlight.tensor.decompose import Factors


class FactorBank(nn.Module):
    """Factors of n stacked D×D blocks: W_i = U (Σ_j P_ij C_j) Vᵀ.

    Shapes (a = d_in, b = d_out):

    * ``U``: (D, a) — or (n, D, a) for variant ``lowrank`` (one U_i per block)
    * ``V``: (D, b) — or (n, D, b) for ``lowrank``
    * ``core``: (k, a, b), the bank 𝒞 (k = n unless ``tucker``)
    * ``P``: (n, k) for ``tucker``; absent otherwise (identity)
    """

    def __init__(self, variant: str, n: int, k: int, hidden: int, rank_in: int, rank_out: int):
        super().__init__()
        self.variant = variant
        per_block = (n,) if variant == "lowrank" else ()
        self.U = nn.Parameter(torch.zeros(*per_block, hidden, rank_in))
        self.V = nn.Parameter(torch.zeros(*per_block, hidden, rank_out))
        self.core = nn.Parameter(torch.zeros(k, rank_in, rank_out))
        self.P = nn.Parameter(torch.zeros(n, k)) if variant == "tucker" else None

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
        """A differentiable view of the parameters as :class:`~tdlight.tensor.decompose.Factors`."""
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
