"""Variant II, ``lowrank``: W_i ≈ U_i C_i V_iᵀ, nothing shared (a truncated SVD per matrix)."""

from __future__ import annotations

import torch

from tdlight.tensor.factors import Factors, Fit, Ranks
from tdlight.tensor.variants.base import Variant


class LowRank(Variant):
    name = "lowrank"
    numeral = "II"
    formula = "W_i ≈ U_i C_i V_iᵀ"
    shared_factors = False
    has_bank = False
    iterative = False

    def fit_weights(self, tensor: torch.Tensor, ranks: Ranks, **options) -> Fit:
        """The truncated SVD of every slice; C_i = U_iᵀ W_i V_i (diagonal when a = b). Exact in one step."""
        return Fit(_svd(self.name, tensor, ranks.rank_in, ranks.rank_out))

    def fit_outputs(self, W: torch.Tensor, H: torch.Tensor, gidx: torch.Tensor, ranks: Ranks, **options) -> Fit:
        """Per block, the truncated SVD of the whitened block L_iᵀ W_i mapped back by L_i⁻ᵀ
        (SVD-LLM's solution, optimal for each block). Exact in one step."""
        return Fit(_whitened_svd(self.name, W, H, gidx, ranks.rank_in, ranks.rank_out))

    def refit_blocks(self, factors: Factors, rows: torch.Tensor, W: torch.Tensor, H: torch.Tensor,
                     gidx: torch.Tensor, ridge: float) -> Factors:
        """Each selected block gets its own new U_i, V_i and core (the whitened SVD)."""
        dt = factors.core.dtype
        a, b = factors.core.shape[-2:]
        f = _whitened_svd(self.name, W, H, gidx, a, b)
        U, V, core = factors.U.clone(), factors.V.clone(), factors.core.clone()
        U[rows], V[rows], core[rows] = f.U.to(dt), f.V.to(dt), f.core.to(dt)
        return Factors(self.name, U, V, core)

    def matmul(self, x: torch.Tensor, factors: Factors, blocks: torch.Tensor) -> torch.Tensor:
        """Every block has its own U_i, V_i: nothing to share between blocks."""
        n_in, n_out = blocks.shape
        idx = blocks.flatten()
        U = factors.U[idx].unflatten(0, blocks.shape)  # (n_in, n_out, A, a)
        V = factors.V[idx].unflatten(0, blocks.shape)  # (n_in, n_out, B, b)
        C = factors.slice_cores(idx).unflatten(0, blocks.shape)
        xs = x.unflatten(-1, (n_in, -1))  # (…, n_in, A)
        xu = torch.einsum("...jd,jmda->...jma", xs, U)
        z = torch.einsum("...jma,jmab->...jmb", xu, C)
        return torch.einsum("...jmb,jmeb->...me", z, V)  # sum over input chunks j


def _svd(name: str, tensor: torch.Tensor, a: int, b: int) -> Factors:
    # A rank above min(A, B) (only possible when A != B) needs the full bases.
    full = max(a, b) > min(tensor.shape[1:])
    u, s, vh = torch.linalg.svd(tensor, full_matrices=full)
    U = u[:, :, :a].contiguous()
    V = vh[:, :b, :].transpose(-1, -2).contiguous()
    return Factors(name, U, V, _diagonal_cores(s, tensor.shape[0], a, b, tensor))


def _whitened_svd(name: str, W: torch.Tensor, H: torch.Tensor, gidx: torch.Tensor, a: int, b: int) -> Factors:
    n, A, B = W.shape
    L = torch.linalg.cholesky(H)  # (m, A, A), H_g = L Lᵀ
    Lt = L.transpose(1, 2)[gidx]
    full = max(a, b) > min(A, B)
    u, s, vh = torch.linalg.svd(Lt @ W, full_matrices=full)
    U = torch.linalg.solve_triangular(Lt, u[:, :, :a].contiguous(), upper=True)  # L⁻ᵀ Ũ
    V = vh[:, :b, :].transpose(-1, -2).contiguous()
    return Factors(name, U, V, _diagonal_cores(s, n, a, b, W))


def _diagonal_cores(s: torch.Tensor, n: int, a: int, b: int, like: torch.Tensor) -> torch.Tensor:
    """(n, a, b) cores holding the leading singular values on their diagonals."""
    r = min(a, b, s.shape[1])
    core = torch.zeros(n, a, b, dtype=like.dtype, device=like.device)
    core[:, torch.arange(r), torch.arange(r)] = s[:, :r]
    return core
