"""Tucker HOOI of a stacked tensor 𝒲 ∈ ℝ^{n×A×B}: the weight fit of the shared-factor variants.

Written by hand rather than calling ``tensorly.decomposition.tucker`` because tensorly
takes a full SVD of every unfolding each iteration; here each factor comes from the
leading eigenvectors of a small Gram matrix of the partially projected tensor, a mode
whose rank equals its size gets no factor at all (identity), and the reconstruction error
of each sweep falls out of the eigenvalues for free. tensorly stays the reference in the
tests and in ``benchmarks/decompose.py``. Variant-free: :mod:`tdlight.tensor.variants`
decides the ranks and what a missing factor means.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from tdlight.errors import SpecError

INITS = ("svd", "random")
# the stopping rule's defaults, here once: compression.init / max_iter / tol and every caller read them
INIT, MAX_ITER, TOL = "svd", 100, 1e-4


def leading_eigvecs(gram: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-r eigenpairs of a symmetric PSD Gram matrix, with a deterministic sign.

    The eigen-solve runs in float64 (the Gram is at most a few thousand wide, so this
    costs little next to forming it) to keep float32 inputs accurate.
    """
    evals, evecs = torch.linalg.eigh(gram.double())
    vals = evals[-r:].flip(0)
    vecs = evecs[:, -r:].flip(1)
    pivot = vecs.abs().argmax(0)
    sign = vecs[pivot, torch.arange(r, device=vecs.device)].sign()
    sign[sign == 0] = 1
    return (vecs * sign).to(gram.dtype), vals.clamp_min(0)


def random_orthonormal(rows: int, cols: int, gen: torch.Generator, like: torch.Tensor) -> torch.Tensor:
    g = torch.randn(rows, cols, generator=gen, dtype=torch.float64)
    q, _ = torch.linalg.qr(g)
    return q.to(dtype=like.dtype, device=like.device)


def identity_if_none(factor: torch.Tensor | None, size: int, like: torch.Tensor) -> torch.Tensor:
    """``factor``, or the identity (size × size) that :func:`hooi` leaves out at full rank."""
    return torch.eye(size, dtype=like.dtype, device=like.device) if factor is None else factor


def hooi(
    tensor: torch.Tensor,
    ranks: tuple[int, int, int],
    *,
    init: str = INIT,
    max_iter: int = MAX_ITER,
    tol: float = TOL,
    seed: int = 0,
    callback: Callable[[int, float], None] | None = None,
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None, torch.Tensor, int, bool, list[float]]:
    """Tucker HOOI of ``tensor`` (n, A, B) to ranks (k, a, b).

    Returns ``(P, U, V, core, iterations, converged, history)``; a factor is ``None``
    when its rank equals the mode size (it would be the identity). Stops when the
    relative error changes by less than ``tol`` between sweeps. ``callback(sweep,
    rel_error)`` is called after every sweep.
    """
    if init not in INITS:
        raise SpecError(f"unknown init {init!r}; valid: {list(INITS)}")
    n, A, B = tensor.shape
    k, a, b = ranks
    X = tensor
    norm2 = _sq_norm(X)
    need_p, need_u, need_v = k < n, a < A, b < B

    def rel(core_norm2: float) -> float:
        return math.sqrt(max(norm2 - core_norm2, 0.0) / norm2) if norm2 > 0 else 0.0

    def u_step(P, V):
        # Y = 𝒲 ×₁ Pᵀ ×₃ Vᵀ unfolded along the input mode: (A, k·b). Project first,
        # so that the one transposing copy is of the small projected tensor.
        Y = X if V is None else (X.reshape(n * A, B) @ V).reshape(n, A, -1)
        if P is not None:
            Y = (P.t() @ Y.reshape(n, -1)).reshape(k, A, -1)
        M = Y.transpose(0, 1).reshape(A, -1)
        return leading_eigvecs(M @ M.t(), a)

    def v_step(P, W2):
        # Y = 𝒲 ×₁ Pᵀ ×₂ Uᵀ unfolded along the output mode: (k·a, B)
        Y = W2 if P is None else (P.t() @ W2.reshape(n, -1)).reshape(k, -1, B)
        M = Y.reshape(-1, B)
        return leading_eigvecs(M.t() @ M, b)

    def p_step(W2, V):
        # Y = 𝒲 ×₂ Uᵀ ×₃ Vᵀ unfolded along the slice mode: (n, a·b)
        Y = (W2 if V is None else W2 @ V).reshape(n, -1)
        return leading_eigvecs(Y @ Y.t(), k)

    P = U = V = None
    history: list[float] = []
    if not (need_p or need_u or need_v):  # full rank: the tensor is its own core
        return None, None, None, X.clone(), 0, True, [0.0]
    if init == "svd":
        # Sequentially truncated HOSVD: output mode from the raw tensor, input mode from
        # the tensor projected on it, slice mode from the tensor projected on both.
        if need_v:
            V, _ = v_step(None, X)
        if need_u:
            U, _ = u_step(None, V)
        if need_p:
            P, _ = p_step(X if U is None else torch.matmul(U.t(), X), V)
    else:
        gen = torch.Generator().manual_seed(seed)
        P = random_orthonormal(n, k, gen, X) if need_p else None
        U = random_orthonormal(A, a, gen, X) if need_u else None
        V = random_orthonormal(B, b, gen, X) if need_v else None

    converged = False
    it = 0
    for it in range(1, max_iter + 1):
        if need_u:
            U, ev = u_step(P, V)
        W2 = X if U is None else torch.matmul(U.t(), X)  # (n, a, B) = 𝒲 ×₂ Uᵀ
        if need_v:
            V, ev = v_step(P, W2)
        if need_p:
            P, ev = p_step(W2, V)
        # The last step's kept eigenvalues sum to ‖𝒞‖², and ‖𝒲 − 𝒲̂‖² = ‖𝒲‖² − ‖𝒞‖².
        err = rel(ev.sum().item())
        history.append(err)
        if callback is not None:
            callback(it, err)
        if len(history) > 1 and abs(history[-2] - history[-1]) < tol:
            converged = True
            break

    core = X if U is None else torch.matmul(U.t(), X)
    if V is not None:
        core = core @ V
    if P is not None:
        core = (P.t() @ core.reshape(n, -1)).reshape(k, core.shape[1], core.shape[2])
    return P, U, V, core.contiguous(), it, converged, history


def _sq_norm(x: torch.Tensor) -> float:
    """‖x‖² accumulated in float64 over per-slice float32 norms (fast and accurate)."""
    return x.flatten(1).norm(dim=1).double().square().sum().item()
