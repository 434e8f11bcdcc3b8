"""Decompose a stacked weight tensor 𝒲 ∈ ℝ^{n×A×B} (A = input dim, B = output dim).

``decompose(tensor, variant, ranks) -> Decomposition`` in the style of tensorly: plain
functions of a tensor and ranks that return a small typed result. The variant (DESIGN §1)
is looked up once (:func:`tdlight.tensor.variants.variant_of`) and does the fit:

* ``lowrank`` (II):  W_i ≈ U_i C_i V_iᵀ, nothing shared (per-matrix truncated SVD);
* ``shared``  (III): W_i ≈ U C_i Vᵀ, U and V shared (Tucker with P = I);
* ``tucker``  (IV):  W_i ≈ U (Σ_j P_ij C_j) Vᵀ, i.e. 𝒲 ≈ 𝒞 ×₁ P ×₂ U ×₃ V.

This module adds what all of them share: input checks, slice balancing and the errors.
The HOOI solver of the shared-factor variants is :func:`tdlight.tensor.hooi.hooi`.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence

import torch

from tdlight.errors import SpecError
from tdlight.tensor.factors import Decomposition, Factors, Ranks, slice_errors
from tdlight.tensor.hooi import INIT, MAX_ITER, TOL
from tdlight.tensor.variants import variant_of

BALANCES = ("none", "slice", "type")
DEAD_BLOCK_ERROR = 0.99

__all__ = ["BALANCES", "DEAD_BLOCK_ERROR", "Decomposition", "Factors", "Ranks", "decompose", "slice_errors",
           "warn_dead_blocks"]


def _slice_scales(tensor: torch.Tensor, balance: str, labels: Sequence[str] | None) -> torch.Tensor | None:
    """Per-slice scale s_i so that 𝒲_i / s_i are balanced (equal norm per slice or per type)."""
    if balance == "none":
        return None
    norms = tensor.double().flatten(1).norm(dim=1)
    if balance == "slice":
        scales = norms
    else:
        if labels is None or len(labels) != tensor.shape[0]:
            raise SpecError("balance='type' needs one block-type label per stacked slice")
        scales = torch.empty_like(norms)
        for t in set(labels):
            sel = torch.tensor([l == t for l in labels], device=norms.device)
            scales[sel] = norms[sel].square().mean().sqrt()
    scales = scales / scales.square().mean().sqrt()  # keep the overall scale
    scales[scales == 0] = 1.0
    return scales.to(tensor.dtype)


def decompose(
    tensor: torch.Tensor,
    variant: str,
    ranks: Ranks,
    *,
    balance: str = "none",
    labels: Sequence[str] | None = None,
    init: str = INIT,
    max_iter: int = MAX_ITER,
    tol: float = TOL,
    seed: int = 0,
    callback: Callable[[int, float], None] | None = None,
) -> Decomposition:
    """Decompose a stacked tensor (n, A, B) with ``variant`` at ``ranks``.

    ``balance``: ``none`` (plain least squares, which favours high-norm slices and can
    drop low-norm block types entirely), ``slice`` (every slice scaled to equal norm
    before decomposing, scaled back after) or ``type`` (every block type, given by
    ``labels``, scaled to equal mean norm). Full rank reproduces the tensor exactly.
    """
    strategy = variant_of(variant)
    if tensor.ndim != 3:
        raise SpecError(f"expected a stacked tensor of shape (n, A, B), got shape {tuple(tensor.shape)}")
    if balance not in BALANCES:
        raise SpecError(f"unknown balance {balance!r}; valid: {list(BALANCES)}")
    strategy.check(ranks, tensor.shape)
    scales = _slice_scales(tensor, balance, labels)
    X = tensor if scales is None else tensor / scales[:, None, None]

    fit = strategy.fit_weights(X, ranks, init=init, max_iter=max_iter, tol=tol, seed=seed, callback=callback)
    f = fit.factors

    if scales is not None:  # scale back: W_i = s_i · U C′_i Vᵀ
        if f.P is not None:
            f.P = f.P * scales[:, None]
        else:
            f.core = f.core * scales[:, None, None]
    errs = slice_errors(tensor, f)
    norms2 = tensor.flatten(1).norm(dim=1).double().square().cpu()
    total = math.sqrt((errs.square() * norms2).sum().item() / norms2.sum().item()) if norms2.sum() > 0 else 0.0
    return Decomposition(f, total, errs, fit.iterations, fit.converged, fit.history)


def warn_dead_blocks(errors: dict[str, float], threshold: float = DEAD_BLOCK_ERROR) -> list[str]:
    """Warn loudly about blocks whose relative error is ≥ ``threshold`` (they became ~zero)."""
    dead = [name for name, e in errors.items() if e >= threshold]
    if dead:
        shown = ", ".join(dead[:8]) + (f" and {len(dead) - 8} more" if len(dead) > 8 else "")
        warnings.warn(
            f"{len(dead)} block(s) came back with relative error ≥ {threshold}: {shown}. "
            "Those matrices are (nearly) zero in the compressed model. The bank is too small "
            "for plain least squares to serve every block type; try compression.balance=type "
            "(or slice), a larger bank, or a larger rank.",
            RuntimeWarning,
            stacklevel=2,
        )
    return dead
