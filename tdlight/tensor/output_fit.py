"""The output fit of the shared-factor variants (``shared`` III, ``tucker`` IV), and their block refits.

Minimises f = Σ_i α_i ‖L_iᵀ (W_i − U G_i Vᵀ)‖², G_i = Σ_j P_ij C_j, α_i = 1 / ‖L_iᵀ W_i‖²
(the objective of :mod:`tdlight.tensor.whiten`; H_i = L_i L_iᵀ is block i's input Gram).

Closed-form start: V (output factor) = the leading eigenvectors of Σ α_i W_iᵀ H_i W_i (a PCA
of the pooled outputs); U (input factor) from the SVD of the blocks whitened by the pooled
Gram H̄ (exact when all blocks share one input); the bank by a weighted PCA of the block
cores. Then block-coordinate descent, every step an exact minimiser of f in its variables
(so f never rises):

- G_i given U, V (V orthonormal): G*_i = S_i⁻¹ Y_i, S_i = Uᵀ H_i U, Y_i = Uᵀ H_i W_i V;
- bank (k < n) given U, V: f = const + Σ α_i ‖(G_i − G*_i)‖²_{S_i}: P row by row
  (k×k solves), 𝒞 by preconditioned conjugate gradients on its normal equations;
- U given G, V: Σ_g H_g U K_g = R with K_g = Σ_{i∈g} α_i G_i G_iᵀ (a generalised Sylvester
  equation; PCG, preconditioned by its Kronecker approximation H̄ U K̄);
- V given U, G: one direct solve V = (Σ α_i Wᵀ H_i U G_i)(Σ α_i G_iᵀ S_i G_i)⁻¹ (the output
  side is not whitened), then re-orthonormalised with its R folded into the cores.

Variant-free: the variants (:mod:`tdlight.tensor.variants`) choose k and assemble the
factors. All the work runs in float64. Plain torch.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from tdlight.tensor.factors import Factors
from tdlight.tensor.hooi import leading_eigvecs


# --- linear algebra helpers --------------------------------------------------------------------


def _pcg(apply: Callable, precond: Callable, b: torch.Tensor, x: torch.Tensor, iters: int,
         tol: float = 1e-10) -> torch.Tensor:
    """Preconditioned conjugate gradients for a symmetric PSD operator, warm-started at ``x``.

    Every iterate minimises the quadratic over a space containing the start, so the
    objective never rises, however few ``iters``.
    """
    r = b - apply(x)
    bnorm = b.norm().item() or 1.0
    z = precond(r)
    p = z.clone()
    rz = (r * z).sum()
    for _ in range(iters):
        if r.norm().item() <= tol * bnorm:
            break
        Ap = apply(p)
        pAp = (p * Ap).sum()
        if not pAp > 0:
            break
        step = rz / pAp
        x = x + step * p
        r = r - step * Ap
        z = precond(r)
        rz_new = (r * z).sum()
        p = z + (rz_new / rz) * p
        rz = rz_new
    return x


def spd_solve(M: torch.Tensor, rhs: torch.Tensor, ridge: float = 1e-10) -> torch.Tensor:
    """Solve M X = rhs for (batched) symmetric PSD M, with a tiny relative ridge for safety."""
    a = M.shape[-1]
    eye = torch.eye(a, dtype=M.dtype, device=M.device)
    scale = M.diagonal(dim1=-2, dim2=-1).mean(-1).clamp_min(1e-300)[..., None, None]
    L, info = torch.linalg.cholesky_ex(M + ridge * scale * eye)
    if (info > 0).any():  # rank-deficient (e.g. an all-zero core): least squares instead
        return torch.linalg.lstsq(M + ridge * scale * eye, rhs).solution
    return torch.cholesky_solve(rhs, L)


def _orthonormalize(F: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """F = Q R with Q orthonormal (columns), sign fixed so that diag(R) ≥ 0."""
    Q, R = torch.linalg.qr(F)
    s = R.diagonal().sign()
    s[s == 0] = 1
    return Q * s, R * s[:, None]


# --- the fit -----------------------------------------------------------------------------------


class _Fit:
    """State of the shared/tucker fit: U (A, a), V (B, b) orthonormal, P (n, k) / C (k, a, b)."""

    def __init__(self, W: torch.Tensor, H: torch.Tensor, gidx: torch.Tensor, bank: int | None):
        self.W, self.H, self.gidx = W, H, gidx
        self.n, self.A, self.B = W.shape
        self.m = H.shape[0]
        self.members = [torch.nonzero(gidx == g).flatten() for g in range(self.m)]
        self.HW = torch.empty_like(W)
        for g, idx in enumerate(self.members):
            self.HW[idx] = H[g] @ W[idx]
        t = (W * self.HW).sum((1, 2))
        self.t = t
        self.alpha = torch.where(t > 0, 1 / t.clamp_min(1e-300), torch.zeros_like(t))
        self.k = bank  # None: one free core per block

    # the cores of every block
    def G(self, P, C) -> torch.Tensor:
        if P is None:
            return C
        k, a, b = C.shape
        return (P @ C.reshape(k, -1)).reshape(-1, a, b)

    def S(self, U) -> torch.Tensor:
        """S_g = Uᵀ H_g U: (m, a, a)."""
        return U.t() @ self.H @ U

    def Y(self, U, V) -> torch.Tensor:
        """Y_i = Uᵀ H_i W_i V: (n, a, b)."""
        return U.t() @ self.HW @ V

    def objective(self, U, V, P, C) -> torch.Tensor:
        """Per-block relative output errors squared, α_i f_i: (n,)."""
        G = self.G(P, C)
        S = self.S(U)[self.gidx]
        Y = self.Y(U, V)
        f = self.t - 2 * (Y * G).sum((1, 2)) + (G * (S @ G)).sum((1, 2))
        return (self.alpha * f).clamp_min(0)

    # --- steps (each an exact minimiser in its variables) ---
    def free_cores(self, U, V) -> torch.Tensor:
        """G*_i = S_i⁻¹ Y_i: (n, a, b)."""
        S = self.S(U)
        Y = self.Y(U, V)
        out = torch.empty_like(Y)
        for g, idx in enumerate(self.members):
            out[idx] = spd_solve(S[g], Y[idx])
        return out

    def bank_step(self, U, V, P, C, cg_iters: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(P, 𝒞) minimising Σ α_i ‖G_i − G*_i‖²_{S_i}: P row by row, then 𝒞 by PCG."""
        S = self.S(U)
        Y = self.Y(U, V)  # = S_i G*_i
        k, a, b = C.shape
        al = self.alpha
        # P: for block i, Q_i p = r_i with Q_i[j, l] = ⟨C_j, S_i C_l⟩, r_i[j] = ⟨C_j, Y_i⟩
        Cf = C.reshape(k, -1)
        R = Y.reshape(self.n, -1) @ Cf.t()  # (n, k)
        P = torch.empty(self.n, k, dtype=C.dtype, device=C.device)
        for g, idx in enumerate(self.members):
            Qg = Cf @ (S[g] @ C).reshape(k, -1).t()
            P[idx] = spd_solve(Qg, R[idx].t()).t()
        # 𝒞: Σ_i α_i P_ij S_i (Σ_l P_il C_l) = Σ_i α_i P_ij Y_i for every j
        Sb = S[self.gidx]
        rhs = (P.t() * al) @ Y.reshape(self.n, -1)

        def apply(Cv):
            G = (P @ Cv).reshape(self.n, a, b)
            return (P.t() * al) @ (Sb @ G).reshape(self.n, -1)

        w = al * P.square().sum(1)
        Sbar = (w[:, None, None] * Sb).sum(0) / w.sum().clamp_min(1e-300)
        Mk = (P.t() * al) @ P  # (k, k)
        eye_k = torch.eye(k, dtype=C.dtype, device=C.device)
        Mk_inv = torch.linalg.inv(Mk + 1e-10 * Mk.diagonal().mean().clamp_min(1e-300) * eye_k)
        Sbar_inv = torch.linalg.inv(Sbar)

        def precond(Rv):
            return (Mk_inv @ (Sbar_inv @ Rv.reshape(k, a, b)).reshape(k, -1))

        C = _pcg(apply, precond, rhs, C.reshape(k, -1), cg_iters).reshape(k, a, b)
        # keep the bank well scaled: unit-norm slices, their norms moved into P
        norms = C.flatten(1).norm(dim=1).clamp_min(1e-300)
        return P * norms, C / norms[:, None, None]

    def u_step(self, U, V, G, cg_iters: int) -> torch.Tensor:
        """U solving Σ_g H_g U K_g = R (K_g = Σ_{i∈g} α_i G_i G_iᵀ, R = Σ α_i H_i W_i V G_iᵀ)."""
        aG = self.alpha[:, None, None] * G
        K = torch.stack([(aG[idx] @ G[idx].transpose(1, 2)).sum(0) for idx in self.members])  # (m, a, a)
        R = ((self.HW @ V) @ aG.transpose(1, 2)).sum(0)  # (A, a)

        def apply(X):
            return (self.H @ X @ K).sum(0)

        c = K.diagonal(dim1=1, dim2=2).sum(1)
        Hbar = (c[:, None, None] * self.H).sum(0) / c.sum().clamp_min(1e-300)
        Kbar = K.sum(0)
        Hbar_inv = torch.linalg.inv(Hbar)
        a = Kbar.shape[0]
        Kbar_inv = torch.linalg.inv(Kbar + 1e-10 * Kbar.diagonal().mean().clamp_min(1e-300)
                                    * torch.eye(a, dtype=K.dtype, device=K.device))

        def precond(X):
            return Hbar_inv @ X @ Kbar_inv

        return _pcg(apply, precond, R, U, cg_iters)

    def v_step(self, U, G) -> torch.Tensor:
        """V = (Σ α_i W_iᵀ H_i U G_i)(Σ α_i G_iᵀ S_i G_i)⁻¹ (direct: the output side is not whitened)."""
        S = self.S(U)[self.gidx]
        aG = self.alpha[:, None, None] * G
        N = (aG.transpose(1, 2) @ S @ G).sum(0)  # (b, b)
        T = (self.HW.transpose(1, 2) @ U @ aG).sum(0)  # (B, b)
        return spd_solve(N, T.t()).t()


def fit_shared(
    W: torch.Tensor,
    H: torch.Tensor,
    gidx: torch.Tensor,
    a: int,
    b: int,
    k: int,
    *,
    iters: int,
    cg_iters: int,
    tol: float,
    start: Factors | None = None,
    callback: Callable[[int, float], None] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor, int, bool, list[float]]:
    """Fit shared U (A, a), V (B, b) and k cores to ``W`` (n, A, B) in the output metric, float64.

    ``H`` (m, A, A) prepared Grams, ``gidx`` (n,) which Gram each block reads. ``k`` < n fits a
    bank 𝒞 (k, a, b) mixed by P (n, k); ``k`` = n one free core per block (P is ``None``).
    ``start``: shared-factor factors to start from when their objective is lower than the
    closed-form start's. Returns ``(U, V, P, C, iterations, converged, history)``.
    """
    n, A, B = W.shape
    dev = W.device
    use_bank = k < n
    fit = _Fit(W, H, gidx, k if use_bank else None)
    eye = lambda m: torch.eye(m, dtype=W.dtype, device=dev)  # noqa: E731
    need_u, need_v = a < A, b < B

    # closed-form start: V from the pooled outputs, U from the pooled-whitened blocks, then cores
    if need_v:
        M = (fit.alpha[:, None, None] * W.transpose(1, 2) @ fit.HW).sum(0)  # Σ α_i W_iᵀ H_i W_i
        V, _ = leading_eigvecs(M, b)
    else:
        V = eye(B)
    if need_u:
        Hbar = H.mean(0)
        Lbar = torch.linalg.cholesky(Hbar)
        Yw = Lbar.t() @ (W @ V)  # pooled-whitened blocks (n, A, b)
        Mu = (fit.alpha[:, None, None] * Yw @ Yw.transpose(1, 2)).sum(0)
        Ut, _ = leading_eigvecs(Mu, a)
        U, _ = _orthonormalize(torch.linalg.solve_triangular(Lbar.t(), Ut, upper=True))
    else:
        U = eye(A)
    Gs = fit.free_cores(U, V)
    if use_bank:
        P, C = _bank_start(fit, U, Gs, k)
        P, C = fit.bank_step(U, V, P, C, cg_iters)
    else:
        P, C = None, Gs
    best = (fit.objective(U, V, P, C).sum().item(), U, V, P, C)

    if start is not None:  # e.g. HOOI's factors, made orthonormal with R folded into the cores
        cand = _from_factors(start, W, use_bank, eye, need_u, need_v)
        if cand is not None:
            obj = fit.objective(*cand).sum().item()
            if obj < best[0]:
                best = (obj, *cand)
    _, U, V, P, C = best
    history: list[float] = [math.sqrt(best[0] / n)]
    converged = iters == 0
    it = 0
    for it in range(1, iters + 1):
        if need_u:
            U, Ru = _orthonormalize(fit.u_step(U, V, fit.G(P, C), cg_iters))
            C = Ru @ C  # U_old G = U_new (R G)
        if need_v:
            Vn = fit.v_step(U, fit.G(P, C))
            V, Rv = _orthonormalize(Vn)
            C = C @ Rv.t()
        if use_bank:
            P, C = fit.bank_step(U, V, P, C, cg_iters)
        else:
            C = fit.free_cores(U, V)
        err = math.sqrt(fit.objective(U, V, P, C).sum().item() / n)
        history.append(err)
        if callback is not None:
            callback(it, err)
        if abs(history[-2] - history[-1]) < tol:
            converged = True
            break
    return U, V, P, C, it, converged, history


def _bank_start(fit: _Fit, U: torch.Tensor, Gs: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A weighted PCA of the free cores in the pooled metric S̄ = mean S_i: (P (n, k), 𝒞 (k, a, b))."""
    n, a, b = Gs.shape
    S = fit.S(U)[fit.gidx]
    Sbar = (fit.alpha[:, None, None] * S).sum(0) / fit.alpha.sum().clamp_min(1e-300)
    Rb = torch.linalg.cholesky(Sbar).t()  # S̄ = Rbᵀ Rb
    w = fit.alpha.sqrt()
    M = (w[:, None, None] * (Rb @ Gs)).reshape(n, -1)  # (n, a·b)
    E, _ = leading_eigvecs(M @ M.t(), k)  # (n, k)
    Ct = (E.t() @ M).reshape(k, a, b)
    C = torch.linalg.solve_triangular(Rb, Ct, upper=True)
    P = E / w.clamp_min(1e-300)[:, None]
    norms = C.flatten(1).norm(dim=1).clamp_min(1e-300)
    return P * norms, C / norms[:, None, None]


def _from_factors(f: Factors, W: torch.Tensor, use_bank: bool, eye, need_u: bool, need_v: bool):
    """(U, V, P, 𝒞) in float64 from given shared/tucker factors, U and V orthonormalised."""
    if f.per_block:  # per-block U_i, V_i cannot start a shared fit
        return None
    U, V, C = f.U.double().to(W.device), f.V.double().to(W.device), f.core.double().to(W.device)
    P = f.P.double().to(W.device) if f.P is not None else None
    Uq, Ru = _orthonormalize(U) if need_u else (eye(U.shape[0]), U)
    Vq, Rv = _orthonormalize(V) if need_v else (eye(V.shape[0]), V)
    if Uq.shape[1] != U.shape[1] or Vq.shape[1] != V.shape[1]:
        return None
    C = Ru @ C @ Rv.t()
    if not use_bank:
        C = C if P is None else (P @ C.reshape(C.shape[0], -1)).reshape(-1, *C.shape[1:])
        P = None
    elif P is None:
        return None
    return Uq, Vq, P, C


# --- refitting some blocks, the shared factors fixed (W, H, gidx in float64) --------------------


def refit_cores(factors: Factors, rows: torch.Tensor, W: torch.Tensor, H: torch.Tensor,
                gidx: torch.Tensor) -> Factors:
    """One free core per block: core_i = S⁻¹ Uᵀ H_i W_i V (VᵀV)⁻¹ for the blocks ``rows``."""
    dt, dev = factors.core.dtype, factors.core.device
    U, V = factors.U.double(), factors.V.double()
    VtV = V.t() @ V
    S = U.t() @ H @ U  # (m, a, a)
    Y = U.t() @ H[gidx] @ W @ V  # (n_sel, a, b): Uᵀ H_i W_i V
    G = spd_solve(S[gidx], Y)
    G = spd_solve(VtV, G.transpose(1, 2)).transpose(1, 2)
    core = factors.core.clone()
    core[rows.to(dev)] = G.to(dt)
    return Factors(factors.variant, factors.U, factors.V, core, factors.P)


def refit_mixing(factors: Factors, rows: torch.Tensor, W: torch.Tensor, H: torch.Tensor,
                 gidx: torch.Tensor, ridge: float = 1e-8) -> Factors:
    """A bank: the rows P_i of the blocks ``rows`` (k×k solves, Q[j, l] = tr(C_jᵀ S C_l VᵀV), S = Uᵀ H_i U)."""
    dt, dev = factors.core.dtype, factors.core.device
    U, V, C = factors.U.double(), factors.V.double(), factors.core.double()
    VtV = V.t() @ V
    S = U.t() @ H @ U  # (m, a, a)
    Y = U.t() @ H[gidx] @ W @ V  # (n_sel, a, b): Uᵀ H_i W_i V
    k, a, b = C.shape
    Cf = C.reshape(k, -1)
    P = factors.P.clone()
    R = Y.reshape(len(rows), -1) @ Cf.t()  # (n_sel, k): r_j = tr(C_jᵀ Y_i)
    for g in torch.unique(gidx).tolist():
        sel = torch.nonzero(gidx == g).flatten()
        Q = Cf @ ((S[g] @ C) @ VtV).reshape(k, -1).t()  # (k, k)
        Q = (Q + Q.t()) / 2
        scale = Q.diagonal().mean().clamp_min(1e-300)
        p = torch.linalg.solve(Q + ridge * scale * torch.eye(k, dtype=Q.dtype, device=dev), R[sel].t()).t()
        P[rows.to(dev)[sel]] = p.to(dt)
    return Factors(factors.variant, factors.U, factors.V, factors.core, P)
