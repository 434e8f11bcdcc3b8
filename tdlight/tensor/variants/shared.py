"""Variant III, ``shared``: W_i ≈ U C_i Vᵀ, U and V shared by the group, one core per matrix."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from tdlight.tensor.factors import Factors, Fit, Ranks
from tdlight.tensor.hooi import hooi, identity_if_none
from tdlight.tensor.output_fit import fit_shared, refit_cores
from tdlight.tensor.variants.base import Fold, Variant, fold_macs


class Shared(Variant):
    name = "shared"
    numeral = "III"
    formula = "W_i ≈ U C_i Vᵀ"
    shared_factors = True
    has_bank = False
    iterative = True

    def fit_weights(self, tensor: torch.Tensor, ranks: Ranks, **options) -> Fit:
        """Tucker HOOI with the slice mode at full rank (k = n: no P)."""
        n, A, B = tensor.shape
        _, U, V, core, its, converged, history = hooi(tensor, (n, ranks.rank_in, ranks.rank_out), **options)
        U, V = identity_if_none(U, A, tensor), identity_if_none(V, B, tensor)
        return Fit(Factors(self.name, U.contiguous(), V.contiguous(), core), its, converged, history)

    def fit_outputs(self, W: torch.Tensor, H: torch.Tensor, gidx: torch.Tensor, ranks: Ranks, **options) -> Fit:
        """The shared-factor output fit (:func:`~tdlight.tensor.output_fit.fit_shared`), one free core per block."""
        U, V, _, C, its, converged, history = fit_shared(W, H, gidx, ranks.rank_in, ranks.rank_out, W.shape[0],
                                                         **options)
        return Fit(Factors(self.name, U, V, C), its, converged, history)

    def refit_blocks(self, factors: Factors, rows: torch.Tensor, W: torch.Tensor, H: torch.Tensor,
                     gidx: torch.Tensor, ridge: float) -> Factors:
        """Each selected block's own core, U and V fixed."""
        return refit_cores(factors, rows, W, H, gidx)

    def matmul(self, x: torch.Tensor, factors: Factors, blocks: torch.Tensor) -> torch.Tensor:
        """``x_j @ U`` once per input chunk, one matmul with the mixed cores laid out as an
        (n_in·a) × (n_out·b) grid, ``@ Vᵀ`` once per output chunk."""
        n_in, n_out = blocks.shape
        cores = factors.slice_cores(blocks.flatten())  # (n_in·n_out, a, b)
        a, b = cores.shape[-2:]
        if n_in == 1:
            xu = x @ factors.U
        else:
            xu = x.unflatten(-1, (n_in, -1)) @ factors.U  # (…, n_in, a)
        # row (j, a), column (m, b)
        grid = cores.view(n_in, n_out, a, b).permute(0, 2, 1, 3).reshape(n_in * a, -1)
        z = (xu.flatten(-2) if n_in > 1 else xu) @ grid  # (no sizes read from x: traced graphs stay dynamic)
        return z.unflatten(-1, (n_out, b)) @ factors.V.t()  # (…, n_out, B)

    def fold(self, factors: Factors, blocks: torch.Tensor) -> Fold:
        """The cores multiplied into the cheaper side (:func:`~tdlight.tensor.variants.base.fold_macs`):
        into Vᵀ when the grid has one input chunk (Q/K/V, the FFN input: one ``x @ U`` then one
        GEMM for all outputs), into U when it has one output chunk (the FFN output: one GEMM over
        the whole input, then one ``@ Vᵀ``)."""
        n_in, n_out = blocks.shape
        cores = factors.slice_cores(blocks.flatten())  # (n_in·n_out, a, b)
        (A, a), (B, b) = factors.U.shape, factors.V.shape
        grid = cores.view(n_in, n_out, a, b)
        side, _ = fold_macs(n_in, n_out, A, a, b)  # (blocks are D × D: A = B)
        if side == "right":  # rows (m, B), columns (j, a): block (m, j) = (C′_jm Vᵀ)ᵀ = V C′_jmᵀ
            second = torch.einsum("eb,jmab->meja", factors.V, grid).reshape(n_out * B, n_in * a)
            return Fold("right", factors.U, second.contiguous(), n_in, n_out)
        # rows (m, b), columns (j, A): block (m, j) = (U C′_jm)ᵀ = C′_jmᵀ Uᵀ
        first = torch.einsum("jmab,ea->mbje", grid, factors.U).reshape(n_out * b, n_in * A)
        return Fold("left", first.contiguous(), factors.V, n_in, n_out)

    def folded_matmul(self, x: torch.Tensor, fold: Fold, bias: torch.Tensor | None) -> torch.Tensor:
        """Two ``F.linear`` (``addmm``), the bias fused into the second; no sizes read from ``x``."""
        if fold.side == "right":  # x_j @ U per input chunk, then one GEMM with the C′Vᵀ matrix
            xu = F.linear(x if fold.n_in == 1 else x.unflatten(-1, (fold.n_in, -1)), fold.first.t())
            return F.linear(xu if fold.n_in == 1 else xu.flatten(-2), fold.second, bias)
        z = F.linear(x, fold.first)  # one GEMM with the U C′ matrix, then @ Vᵀ per output chunk
        if fold.n_out == 1:
            return F.linear(z, fold.second, bias)
        y = F.linear(z.unflatten(-1, (fold.n_out, -1)), fold.second).flatten(-2)
        return y if bias is None else y + bias
