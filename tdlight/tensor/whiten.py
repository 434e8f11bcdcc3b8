"""Function-preserving decomposition: fit each block's *outputs* on calibration inputs, not its weights.

In the ``y = x @ W`` orientation block i (W_i ∈ ℝ^{A×B}) reads inputs with second moment
H_i = XᵀX / T ∈ ℝ^{A×A} = L_i L_iᵀ. The output error of an approximation Ŵ_i on those
inputs is ‖X (W_i − Ŵ_i)‖² / T = ‖L_iᵀ (W_i − Ŵ_i)‖² = tr(Eᵀ H_i E). We minimise

    f = Σ_i α_i ‖L_iᵀ (W_i − U G_i Vᵀ)‖²,   G_i = Σ_j P_ij C_j,   α_i = 1 / ‖L_iᵀ W_i‖²

so every block counts by its relative output error (after SVD-LLM's whitening and Basis
Sharing; DESIGN §6). ``decompose_whitened(tensor, grams, variant, ranks) -> Decomposition``
reads like :func:`tdlight.tensor.decompose.decompose`; its ``rel_error`` and
``slice_errors`` are the *output* errors ‖L_iᵀ(W_i − Ŵ_i)‖ / ‖L_iᵀ W_i‖.

* ``lowrank`` (II): per block, the truncated SVD of the whitened block L_iᵀ W_i, mapped back
  by L_i⁻ᵀ (SVD-LLM's solution, optimal for each block).
* ``shared`` (III) / ``tucker`` (IV), closed-form start: V (output factor) = the leading
  eigenvectors of Σ α_i W_iᵀ H_i W_i (a PCA of the pooled outputs); U (input factor) from
  the SVD of the blocks whitened by the pooled Gram H̄ (exact when all blocks share one
  input); the bank by a weighted PCA of the block cores. Then block-coordinate descent,
  every step an exact minimiser of f in its variables (so f never rises):

  - G_i given U, V (V orthonormal): G*_i = S_i⁻¹ Y_i, S_i = Uᵀ H_i U, Y_i = Uᵀ H_i W_i V;
  - bank (tucker, k < n) given U, V: f = const + Σ α_i ‖(G_i − G*_i)‖²_{S_i}: P row by row
    (k×k solves), 𝒞 by preconditioned conjugate gradients on its normal equations;
  - U given G, V: Σ_g H_g U K_g = R with K_g = Σ_{i∈g} α_i G_i G_iᵀ (a generalised Sylvester
    equation; PCG, preconditioned by its Kronecker approximation H̄ U K̄);
  - V given U, G: one direct solve V = (Σ α_i Wᵀ H_i U G_i)(Σ α_i G_iᵀ S_i G_i)⁻¹ (the output
    side is not whitened), then re-orthonormalised with its R folded into the cores.

Blocks that read the same input (Q, K, V of a layer; the FFN-input blocks) share one Gram:
``grams`` holds the m distinct Grams and ``gram_index`` says which one each block reads.
All the work runs in float64. Plain torch.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable

import torch

from tdlight.errors import SpecError
from tdlight.tensor.decompose import (
    Decomposition,
    Factors,
    Ranks,
    _leading_eigvecs,
    canonical_variant,
)
from tdlight.tensor.layout import FFN_TYPES, Layout

DEFAULT_DAMP = 1e-2

# --- Grams -------------------------------------------------------------------------------------


def prepare_gram(gram: torch.Tensor, damp: float = DEFAULT_DAMP, name: str = "block") -> torch.Tensor:
    """A usable input Gram (A, A) in float64: symmetrised, scaled to mean diagonal 1, damped.

    ``damp`` adds ``damp`` × the mean diagonal to the diagonal. A Gram that is not finite,
    is zero, or stays numerically singular (Cholesky fails even after raising the damping
    to 1) falls back to the identity (plain weight error for that block) with a warning.
    The overall scale of H_i does not change the fit (α_i absorbs it).
    """
    if damp < 0 or not math.isfinite(damp):
        raise SpecError(f"damp={damp!r}; valid: a finite number ≥ 0 (e.g. {DEFAULT_DAMP})")
    A = gram.shape[0]
    eye = torch.eye(A, dtype=torch.float64, device=gram.device)
    H = gram.double()
    H = (H + H.t()) / 2
    scale = H.diagonal().mean().item() if H.numel() else 0.0
    if not torch.isfinite(H).all() or not math.isfinite(scale) or scale <= 0:
        warnings.warn(f"input Gram of {name} is zero or not finite; fitting its weights instead "
                      f"(identity Gram)", RuntimeWarning, stacklevel=2)
        return eye
    H = H / scale
    d = damp
    for _ in range(4):
        Hd = H + d * eye
        _, info = torch.linalg.cholesky_ex(Hd)
        if info.item() == 0:
            return Hd
        d = max(10 * d, 1e-6)
        if d > 1:
            break
        warnings.warn(f"input Gram of {name} is numerically singular at damping {d / 10:g}; "
                      f"retrying with damping {d:g}", RuntimeWarning, stacklevel=2)
    warnings.warn(f"input Gram of {name} stays singular; fitting its weights instead (identity Gram)",
                  RuntimeWarning, stacklevel=2)
    return eye


def block_grams(layout: Layout, group: str, input_grams: dict[tuple[int, str], torch.Tensor],
                damp: float = DEFAULT_DAMP) -> tuple[torch.Tensor, torch.Tensor]:
    """The distinct block Grams of one layout group: ``(grams (m, D, D), gram_index (n,))``.

    ``input_grams[(layer, type)]`` is the Gram of the full input of that linear (the
    ``nn.Linear``'s ``in_features`` square). FFN-output block p reads input chunk p, so its
    Gram is the p-th D×D diagonal block; Q, K and V (and the FFN-input blocks) share the
    Gram of their one input. Each distinct Gram is prepared (:func:`prepare_gram`) once.
    """
    D = layout.hidden
    keys: dict[tuple, int] = {}
    grams: list[torch.Tensor] = []
    index = []
    for blk in layout.groups[group]:
        if blk.type in ("query", "key", "value"):
            src, key = (blk.layer, "query"), (blk.layer, "attn_in", 0)
        elif blk.type == "ffn_out":
            src, key = (blk.layer, "ffn_out"), (blk.layer, "ffn_out", blk.part)
        else:  # attn_out, ffn_in (all its blocks read the same input)
            src, key = (blk.layer, blk.type), (blk.layer, blk.type, 0)
        if key not in keys:
            full = input_grams.get(src)
            if full is None and blk.type in ("key", "value"):
                full = input_grams.get((blk.layer, blk.type))
            if full is None:
                raise SpecError(f"no input Gram for layer {src[0]} {src[1]} (block {blk.name})")
            part = blk.part if blk.type in FFN_TYPES and blk.type == "ffn_out" else 0
            h = full[part * D:(part + 1) * D, part * D:(part + 1) * D] if full.shape[0] > D else full
            keys[key] = len(grams)
            grams.append(prepare_gram(h, damp, name=blk.name))
        index.append(keys[key])
    return torch.stack(grams), torch.tensor(index)


def corrected_target(weight: torch.Tensor, gram: torch.Tensor, cross: torch.Tensor,
                     damp: float = DEFAULT_DAMP) -> torch.Tensor:
    """The weight to fit when the student's inputs X̃ differ from the teacher's X (float64).

    ``weight``: the teacher's ``nn.Linear.weight`` W (out × in); ``gram`` H̃ = X̃ᵀX̃ / T (the
    student's input second moment); ``cross`` C = X̃ᵀX / T. Returns W' (out × in) with
    ‖X̃Ŵᵀ − XWᵀ‖² / T = tr((Ŵ − W') H̃ (Ŵ − W')ᵀ) + const for every Ŵ, i.e. W'ᵀ = H̃⁻¹ C Wᵀ —
    so the best student weight is the whitened fit (in H̃) of W'. Damped as in
    :func:`prepare_gram` (λ = ``damp`` × the mean diagonal of H̃), the objective is
    ‖X̃Ŵᵀ − XWᵀ‖² / T + λ‖Ŵ − W‖² (the damping pulls towards the teacher's weight, not
    towards 0), so W'ᵀ = (H̃ + λI)⁻¹ (C + λI) Wᵀ and the fit in the prepared H̃ is its exact
    minimiser; with X̃ = X, W' = W exactly.
    """
    H = gram.double()
    H = (H + H.t()) / 2
    scale = H.diagonal().mean().clamp_min(1e-300)
    eye = torch.eye(H.shape[0], dtype=H.dtype, device=H.device)
    Hd = H / scale + damp * eye
    rhs = (cross.double().to(H.device) / scale + damp * eye) @ weight.double().t().to(H.device)
    return _spd_solve(Hd, rhs).t()


def refit_bias(bias: torch.Tensor | None, weight: torch.Tensor, fitted: torch.Tensor,
               mean_teacher: torch.Tensor, mean_student: torch.Tensor) -> torch.Tensor:
    """The bias b̂ = b + W μ − Ŵ μ̃ that makes the student's mean output the teacher's.

    ``weight`` W / ``fitted`` Ŵ: teacher / student ``nn.Linear.weight`` (out × in);
    ``mean_teacher`` μ / ``mean_student`` μ̃: their mean inputs over the calibration tokens.
    Given Ŵ it is the least-squares optimal bias (the mean of the teacher's output minus
    the mean of the student's weight product); exact for a pure mean shift.
    """
    W, Wf = weight.double(), fitted.double().to(weight.device)
    b = W @ mean_teacher.double().to(W.device) - Wf @ mean_student.double().to(W.device)
    return b if bias is None else b + bias.double().to(W.device)


# --- objective ---------------------------------------------------------------------------------


def whitened_errors(tensor: torch.Tensor, factors: Factors, grams: torch.Tensor,
                    gram_index: torch.Tensor | None = None) -> torch.Tensor:
    """Relative output error of every block, ‖L_iᵀ(W_i − Ŵ_i)‖ / ‖L_iᵀ W_i‖: (n,) float64."""
    n = tensor.shape[0]
    idx = torch.arange(n) if gram_index is None else gram_index.cpu()
    errs = torch.empty(n, dtype=torch.float64)
    for s in range(0, n, 16):
        sl = slice(s, min(n, s + 16))
        W = tensor[sl].double()
        E = W - factors.reconstruct(sl).double()
        H = grams[idx[sl]].double().to(W.device)
        num = (E * (H @ E)).sum((1, 2)).clamp_min(0).sqrt()
        den = (W * (H @ W)).sum((1, 2)).clamp_min(0).sqrt()
        errs[sl] = torch.where(den > 0, num / den.clamp_min(1e-300), (num > 0).double()).cpu()
    return errs


def _summary(errs: torch.Tensor) -> float:
    """RMS over blocks of the relative output errors (= sqrt(f / n))."""
    return errs.square().mean().sqrt().item() if errs.numel() else 0.0


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


def _spd_solve(M: torch.Tensor, rhs: torch.Tensor, ridge: float = 1e-10) -> torch.Tensor:
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
            out[idx] = _spd_solve(S[g], Y[idx])
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
            P[idx] = _spd_solve(Qg, R[idx].t()).t()
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
        return _spd_solve(N, T.t()).t()


def _lowrank_whitened(W: torch.Tensor, H: torch.Tensor, gidx: torch.Tensor, a: int, b: int) -> Factors:
    """Variant II: per block, the truncated SVD of L_iᵀ W_i mapped back by L_i⁻ᵀ (SVD-LLM)."""
    n, A, B = W.shape
    L = torch.linalg.cholesky(H)  # (m, A, A), H_g = L Lᵀ
    Lt = L.transpose(1, 2)[gidx]
    full = max(a, b) > min(A, B)
    u, s, vh = torch.linalg.svd(Lt @ W, full_matrices=full)
    U = torch.linalg.solve_triangular(Lt, u[:, :, :a].contiguous(), upper=True)  # L⁻ᵀ Ũ
    V = vh[:, :b, :].transpose(-1, -2).contiguous()
    r = min(a, b, s.shape[1])
    core = torch.zeros(n, a, b, dtype=W.dtype, device=W.device)
    core[:, torch.arange(r), torch.arange(r)] = s[:, :r]
    return Factors("lowrank", U, V, core)


def decompose_whitened(
    tensor: torch.Tensor,
    grams: torch.Tensor,
    variant: str,
    ranks: Ranks,
    *,
    gram_index: torch.Tensor | None = None,
    iters: int = 10,
    cg_iters: int = 8,
    tol: float = 1e-5,
    start: Factors | None = None,
    callback: Callable[[int, float], None] | None = None,
) -> Decomposition:
    """Fit ``tensor`` (n, A, B) by ``variant`` at ``ranks`` minimising the relative output errors.

    ``grams``: (m, A, A) prepared input Grams (:func:`prepare_gram` / :func:`block_grams`);
    ``gram_index``: (n,) which Gram each block reads (default: block i reads Gram i, m = n).
    ``iters``: sweeps of the alternation (0 = the closed-form start only); stops early when
    the error changes by less than ``tol``. ``start``: optional factors (e.g. HOOI's) to start
    from instead when their output error is lower. ``callback(sweep, rel_error)`` after every
    sweep. Returns factors in ``tensor``'s dtype; ``rel_error`` = RMS over blocks of the
    relative output errors and ``slice_errors`` the per-block ones. Full rank is exact.
    """
    variant = canonical_variant(variant)
    if tensor.ndim != 3:
        raise SpecError(f"expected a stacked tensor of shape (n, A, B), got shape {tuple(tensor.shape)}")
    n, A, B = tensor.shape
    ranks.check(variant, tensor.shape)
    if gram_index is None:
        gram_index = torch.arange(grams.shape[0])
    if grams.ndim != 3 or grams.shape[1:] != (A, A) or gram_index.shape != (n,) \
            or int(gram_index.min()) < 0 or int(gram_index.max()) >= grams.shape[0]:
        raise SpecError(f"grams {tuple(grams.shape)} with gram_index {tuple(gram_index.shape)} do not fit the "
                        f"{n}×{A}×{B} tensor: need (m, {A}, {A}) Grams and one index in [0, m) per block")
    if not isinstance(iters, int) or iters < 0:
        raise SpecError(f"iters={iters!r}; valid: an integer ≥ 0")
    dev = tensor.device
    W = tensor.double()
    H = grams.double().to(dev)
    gidx = gram_index.long().to(dev)
    a, b = ranks.rank_in, ranks.rank_out

    if variant == "lowrank":
        f64 = _lowrank_whitened(W, H, gidx, a, b)
        f = Factors("lowrank", f64.U.to(tensor.dtype), f64.V.to(tensor.dtype), f64.core.to(tensor.dtype))
        errs = whitened_errors(tensor, f, grams, gram_index)
        return Decomposition(f, _summary(errs), errs, 0, True, [])

    k = n if variant == "shared" or ranks.bank is None else ranks.bank
    use_bank = k < n
    fit = _Fit(W, H, gidx, k if use_bank else None)
    eye = lambda m: torch.eye(m, dtype=W.dtype, device=dev)  # noqa: E731
    need_u, need_v = a < A, b < B

    # closed-form start: V from the pooled outputs, U from the pooled-whitened blocks, then cores
    if need_v:
        M = (fit.alpha[:, None, None] * W.transpose(1, 2) @ fit.HW).sum(0)  # Σ α_i W_iᵀ H_i W_i
        V, _ = _leading_eigvecs(M, b)
    else:
        V = eye(B)
    if need_u:
        Hbar = H.mean(0)
        Lbar = torch.linalg.cholesky(Hbar)
        Yw = Lbar.t() @ (W @ V)  # pooled-whitened blocks (n, A, b)
        Mu = (fit.alpha[:, None, None] * Yw @ Yw.transpose(1, 2)).sum(0)
        Ut, _ = _leading_eigvecs(Mu, a)
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

    dt = tensor.dtype
    if variant == "tucker":
        P = eye(n) if P is None else P
        f = Factors("tucker", U.to(dt).contiguous(), V.to(dt).contiguous(), C.to(dt).contiguous(), P.to(dt))
    else:
        f = Factors("shared", U.to(dt).contiguous(), V.to(dt).contiguous(), C.to(dt).contiguous())
    errs = whitened_errors(tensor, f, grams, gram_index)
    return Decomposition(f, _summary(errs), errs, it, converged, history)


def _bank_start(fit: _Fit, U: torch.Tensor, Gs: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A weighted PCA of the free cores in the pooled metric S̄ = mean S_i: (P (n, k), 𝒞 (k, a, b))."""
    n, a, b = Gs.shape
    S = fit.S(U)[fit.gidx]
    Sbar = (fit.alpha[:, None, None] * S).sum(0) / fit.alpha.sum().clamp_min(1e-300)
    Rb = torch.linalg.cholesky(Sbar).t()  # S̄ = Rbᵀ Rb
    w = fit.alpha.sqrt()
    M = (w[:, None, None] * (Rb @ Gs)).reshape(n, -1)  # (n, a·b)
    E, _ = _leading_eigvecs(M @ M.t(), k)  # (n, k)
    Ct = (E.t() @ M).reshape(k, a, b)
    C = torch.linalg.solve_triangular(Rb, Ct, upper=True)
    P = E / w.clamp_min(1e-300)[:, None]
    norms = C.flatten(1).norm(dim=1).clamp_min(1e-300)
    return P * norms, C / norms[:, None, None]


def _from_factors(f: Factors, W: torch.Tensor, use_bank: bool, eye, need_u: bool, need_v: bool):
    """(U, V, P, 𝒞) in float64 from given shared/tucker factors, U and V orthonormalised."""
    if f.variant == "lowrank":
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


def refit_blocks(factors: Factors, rows: torch.Tensor, tensor: torch.Tensor, grams: torch.Tensor,
                 gram_index: torch.Tensor | None = None, ridge: float = 1e-8) -> Factors:
    """Refit only the blocks ``rows`` of ``factors`` to ``tensor`` (len(rows), A, B), the bank fixed.

    Each selected block i minimises its output error ‖L_iᵀ(W_i − Ŵ_i)‖² exactly over what is
    its own: ``tucker`` with a bank, its row P_i (k×k solve, Q[j, l] = tr(C_jᵀ S C_l VᵀV),
    S = Uᵀ H_i U); ``shared`` / ``tucker`` without a bank, its core (S⁻¹ Uᵀ H_i W_i V (VᵀV)⁻¹);
    ``lowrank``, its own U_i, V_i, core (the whitened SVD). ``grams`` (m, A, A) prepared,
    ``gram_index`` (len(rows),) which Gram each selected block reads. Returns new factors
    (the other blocks and the shared factors unchanged), in ``factors``' dtype.
    """
    rows = torch.as_tensor(rows).long().flatten()
    if gram_index is None:
        gram_index = torch.arange(len(rows))
    dt = factors.core.dtype
    dev = factors.core.device
    W = tensor.double().to(dev)
    H = grams.double().to(dev)
    gidx = gram_index.long().to(dev)
    if factors.variant == "lowrank":
        a, b = factors.core.shape[-2:]
        f = _lowrank_whitened(W, H, gidx, a, b)
        U, V, core = factors.U.clone(), factors.V.clone(), factors.core.clone()
        U[rows], V[rows], core[rows] = f.U.to(dt), f.V.to(dt), f.core.to(dt)
        return Factors("lowrank", U, V, core)
    U, V, C = factors.U.double(), factors.V.double(), factors.core.double()
    VtV = V.t() @ V
    S = U.t() @ H @ U  # (m, a, a)
    Y = U.t() @ H[gidx] @ W @ V  # (n_sel, a, b): Uᵀ H_i W_i V
    if factors.P is None:  # one free core per block
        G = _spd_solve(S[gidx], Y)
        G = _spd_solve(VtV, G.transpose(1, 2)).transpose(1, 2)
        core = factors.core.clone()
        core[rows.to(dev)] = G.to(dt)
        return Factors(factors.variant, factors.U, factors.V, core, None)
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
