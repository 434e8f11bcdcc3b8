"""Variant IV, ``tucker`` (the paper's method): W_i ≈ U (Σ_j P_ij C_j) Vᵀ.

That is 𝒲 ≈ 𝒞 ×₁ P ×₂ U ×₃ V: U, V and a bank 𝒞 of k ≤ n cores are shared, and each
block mixes the bank by its row of P.
It is :class:`~tdlight.tensor.variants.shared.Shared` plus the bank: the forward is the
same (the mixed cores C′_i stand where the free cores were).
"""

from __future__ import annotations

import torch

from tdlight.tensor.factors import Factors, Fit, Ranks
from tdlight.tensor.hooi import hooi, identity_if_none
from tdlight.tensor.output_fit import fit_shared, refit_mixing
from tdlight.tensor.variants.shared import Shared


class Tucker(Shared):
    name = "tucker"
    numeral = "IV"
    formula = "W_i ≈ U (Σ_j P_ij C_j) Vᵀ"
    has_bank = True

    def fit_weights(self, tensor: torch.Tensor, ranks: Ranks, **options) -> Fit:
        """Tucker HOOI to ranks (k, a, b); a mode at full rank gets the identity."""
        n, A, B = tensor.shape
        k = self.bank_size(ranks, n)
        P, U, V, core, its, converged, history = hooi(tensor, (k, ranks.rank_in, ranks.rank_out), **options)
        U, V = identity_if_none(U, A, tensor), identity_if_none(V, B, tensor)
        f = Factors(self.name, U.contiguous(), V.contiguous(), core, identity_if_none(P, n, tensor))
        return Fit(f, its, converged, history)

    def fit_outputs(self, W: torch.Tensor, H: torch.Tensor, gidx: torch.Tensor, ranks: Ranks, **options) -> Fit:
        """The shared-factor output fit with a bank of k cores (k = n: free cores, P = I)."""
        n = W.shape[0]
        U, V, P, C, its, converged, history = fit_shared(W, H, gidx, ranks.rank_in, ranks.rank_out,
                                                         self.bank_size(ranks, n), **options)
        return Fit(Factors(self.name, U, V, C, identity_if_none(P, n, W)), its, converged, history)

    def refit_blocks(self, factors: Factors, rows: torch.Tensor, W: torch.Tensor, H: torch.Tensor,
                     gidx: torch.Tensor, ridge: float) -> Factors:
        """Each selected block's row P_i (k×k solves), U, V and the bank fixed."""
        return refit_mixing(factors, rows, W, H, gidx, ridge)
