"""Decompositions of a stacked weight tensor 𝒲 ∈ ℝ^{n×A×B} (A = input dim, B = output dim).

``decompose(tensor, variant, ranks) -> Decomposition`` in the style of tensorly: plain
functions of a tensor and ranks that return a small typed result. Variants (DESIGN §1):

* ``lowrank`` (II):  W_i ≈ U_i C_i V_iᵀ, nothing shared (per-matrix truncated SVD);
* ``shared``  (III): W_i ≈ U C_i Vᵀ, U and V shared (Tucker with P = I);
* ``tucker``  (IV):  W_i ≈ U (Σ_j P_ij C_j) Vᵀ, i.e. 𝒲 ≈ 𝒞 ×₁ P ×₂ U ×₃ V.

The HOOI solver is written by hand rather than calling ``tensorly.decomposition.tucker``
because tensorly takes a full SVD of every unfolding each iteration; here each factor
comes from the leading eigenvectors of a small Gram matrix of the partially projected
tensor, a mode whose rank equals its size gets no factor at all (identity), and the
reconstruction error of each sweep falls out of the eigenvalues for free. tensorly stays
the reference in the tests and in ``benchmarks/decompose.py``.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from tdlight.errors import SpecError

VARIANTS = ("lowrank", "shared", "tucker")
VARIANT_ALIASES = {"II": "lowrank", "III": "shared", "IV": "tucker"}
BALANCES = ("none", "slice", "type")
INITS = ("svd", "random")
DEAD_BLOCK_ERROR = 0.99


def canonical_variant(variant: str) -> str:
    """``'IV'`` -> ``'tucker'`` etc.; raises :class:`SpecError` for an unknown name."""
    v = VARIANT_ALIASES.get(variant, variant)
    if v not in VARIANTS:
        valid = list(VARIANTS) + list(VARIANT_ALIASES)
        raise SpecError(f"unknown variant {variant!r}; valid: {valid} (plus 'dense' for no compression)")
    return v


@dataclass(frozen=True)
class Ranks:
    """``bank`` = k (tucker only; ``None`` means n), ``rank_in`` = d_in, ``rank_out`` = d_out."""

    rank_in: int
    rank_out: int
    bank: int | None = None

    def check(self, variant: str, shape: Sequence[int]) -> None:
        """Raise :class:`SpecError` unless these ranks are possible for ``shape`` = (n, A, B)."""
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
        if variant == "tucker":
            k = self.bank
            if k is not None and (not isinstance(k, int) or isinstance(k, bool) or k < 1 or k > n):
                raise SpecError(
                    f"bank={k!r} is impossible: the bank size k must be an integer in [1, {n}] "
                    f"(n = {n} stacked matrices)"
                )
        elif self.bank is not None and self.bank != n:
            raise SpecError(
                f"bank={self.bank!r} only applies to variant 'tucker' (IV); variant {variant!r} "
                f"has one core per matrix (k = n = {n}): leave bank unset"
            )


@dataclass
class Factors:
    """The factors of one stacked tensor; shapes name n, A (in), B (out), k, a = d_in, b = d_out.

    * ``U``: (A, a) shared, or (n, A, a) for ``lowrank``
    * ``V``: (B, b) shared, or (n, B, b) for ``lowrank``
    * ``core``: (k, a, b); k = n unless ``tucker``
    * ``P``: (n, k) for ``tucker``, else ``None`` (identity)
    """

    variant: str
    U: torch.Tensor
    V: torch.Tensor
    core: torch.Tensor
    P: torch.Tensor | None = None

    @property
    def n(self) -> int:
        return self.P.shape[0] if self.P is not None else self.core.shape[0]

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
        if self.variant == "lowrank":
            return self.U[idx] @ c @ self.V[idx].transpose(-1, -2)
        return self.U @ c @ self.V.t()

    def parameters(self) -> dict[str, torch.Tensor]:
        out = {"U": self.U, "V": self.V, "core": self.core}
        if self.P is not None:
            out["P"] = self.P
        return out


@dataclass
class Decomposition:
    factors: Factors
    rel_error: float  # ‖𝒲 − 𝒲̂‖ / ‖𝒲‖
    slice_errors: torch.Tensor  # (n,) ‖W_i − Ŵ_i‖ / ‖W_i‖
    iterations: int
    converged: bool
    history: list[float] = field(default_factory=list)  # rel. error after each sweep


# --- small helpers -----------------------------------------------------------------------


def _leading_eigvecs(gram: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor]:
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


def _random_orthonormal(rows: int, cols: int, gen: torch.Generator, like: torch.Tensor) -> torch.Tensor:
    g = torch.randn(rows, cols, generator=gen, dtype=torch.float64)
    q, _ = torch.linalg.qr(g)
    return q.to(dtype=like.dtype, device=like.device)


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


# --- the solvers -------------------------------------------------------------------------


def hooi(
    tensor: torch.Tensor,
    ranks: tuple[int, int, int],
    *,
    init: str = "svd",
    max_iter: int = 100,
    tol: float = 1e-4,
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
        return _leading_eigvecs(M @ M.t(), a)

    def v_step(P, W2):
        # Y = 𝒲 ×₁ Pᵀ ×₂ Uᵀ unfolded along the output mode: (k·a, B)
        Y = W2 if P is None else (P.t() @ W2.reshape(n, -1)).reshape(k, -1, B)
        M = Y.reshape(-1, B)
        return _leading_eigvecs(M.t() @ M, b)

    def p_step(W2, V):
        # Y = 𝒲 ×₂ Uᵀ ×₃ Vᵀ unfolded along the slice mode: (n, a·b)
        Y = (W2 if V is None else W2 @ V).reshape(n, -1)
        return _leading_eigvecs(Y @ Y.t(), k)

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
        P = _random_orthonormal(n, k, gen, X) if need_p else None
        U = _random_orthonormal(A, a, gen, X) if need_u else None
        V = _random_orthonormal(B, b, gen, X) if need_v else None

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


def _lowrank(tensor: torch.Tensor, a: int, b: int) -> Factors:
    """Variant II: per-slice truncated SVD; C_i = U_iᵀ W_i V_i (diagonal when a = b)."""
    # A rank above min(A, B) (only possible when A != B) needs the full bases.
    full = max(a, b) > min(tensor.shape[1:])
    u, s, vh = torch.linalg.svd(tensor, full_matrices=full)
    U = u[:, :, :a].contiguous()
    V = vh[:, :b, :].transpose(-1, -2).contiguous()
    r = min(a, b, s.shape[1])
    core = torch.zeros(tensor.shape[0], a, b, dtype=tensor.dtype, device=tensor.device)
    core[:, torch.arange(r), torch.arange(r)] = s[:, :r]
    return Factors("lowrank", U, V, core)


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
    init: str = "svd",
    max_iter: int = 100,
    tol: float = 1e-4,
    seed: int = 0,
    callback: Callable[[int, float], None] | None = None,
) -> Decomposition:
    """Decompose a stacked tensor (n, A, B) with ``variant`` at ``ranks``.

    ``balance``: ``none`` (plain least squares, which favours high-norm slices and can
    drop low-norm block types entirely), ``slice`` (every slice scaled to equal norm
    before decomposing, scaled back after) or ``type`` (every block type, given by
    ``labels``, scaled to equal mean norm). Full rank reproduces the tensor exactly.
    """
    variant = canonical_variant(variant)
    if tensor.ndim != 3:
        raise SpecError(f"expected a stacked tensor of shape (n, A, B), got shape {tuple(tensor.shape)}")
    if balance not in BALANCES:
        raise SpecError(f"unknown balance {balance!r}; valid: {list(BALANCES)}")
    ranks.check(variant, tensor.shape)
    n, A, B = tensor.shape
    scales = _slice_scales(tensor, balance, labels)
    X = tensor if scales is None else tensor / scales[:, None, None]

    if variant == "lowrank":
        f = _lowrank(X, ranks.rank_in, ranks.rank_out)
        its, conv, hist = 0, True, []
    else:
        k = n if variant == "shared" or ranks.bank is None else ranks.bank
        P, U, V, core, its, conv, hist = hooi(
            X, (k, ranks.rank_in, ranks.rank_out), init=init, max_iter=max_iter, tol=tol,
            seed=seed, callback=callback,
        )
        eye = lambda m: torch.eye(m, dtype=X.dtype, device=X.device)  # noqa: E731
        U = eye(A) if U is None else U
        V = eye(B) if V is None else V
        if variant == "tucker":
            P = eye(n) if P is None else P
        elif P is not None:  # shared: k == n so P is None
            raise AssertionError("shared variant produced a slice factor")
        f = Factors(variant, U.contiguous(), V.contiguous(), core, P)

    if scales is not None:  # scale back: W_i = s_i · U C′_i Vᵀ
        if f.P is not None:
            f.P = f.P * scales[:, None]
        else:
            f.core = f.core * scales[:, None, None]
    errs = slice_errors(tensor, f)
    norms2 = tensor.flatten(1).norm(dim=1).double().square().cpu()
    total = math.sqrt((errs.square() * norms2).sum().item() / norms2.sum().item()) if norms2.sum() > 0 else 0.0
    return Decomposition(f, total, errs, its, conv, hist)


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
