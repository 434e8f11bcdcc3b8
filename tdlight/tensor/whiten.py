"""Function-preserving decomposition: fit each block's *outputs* on calibration inputs, not its weights.

In the ``y = x @ W`` orientation block i (W_i ∈ ℝ^{A×B}) reads inputs with second moment
H_i = XᵀX / T ∈ ℝ^{A×A} = L_i L_iᵀ. The output error of an approximation Ŵ_i on those
inputs is ‖X (W_i − Ŵ_i)‖² / T = ‖L_iᵀ (W_i − Ŵ_i)‖² = tr(Eᵀ H_i E). We minimise

    f = Σ_i α_i ‖L_iᵀ (W_i − U G_i Vᵀ)‖²,   G_i = Σ_j P_ij C_j,   α_i = 1 / ‖L_iᵀ W_i‖²

so every block counts by its relative output error (after SVD-LLM's whitening and Basis
Sharing; DESIGN §6). ``decompose_whitened(tensor, grams, variant, ranks) -> Decomposition``
reads like :func:`tdlight.tensor.decompose.decompose`; its ``rel_error`` and
``slice_errors`` are the *output* errors ‖L_iᵀ(W_i − Ŵ_i)‖ / ‖L_iᵀ W_i‖. The variant does
the fit (:meth:`~tdlight.tensor.variants.Variant.fit_outputs`):

* ``lowrank`` (II): per block, the truncated SVD of the whitened block L_iᵀ W_i, mapped back
  by L_i⁻ᵀ (SVD-LLM's solution, optimal for each block);
* ``shared`` (III) / ``tucker`` (IV): a closed-form start, then block-coordinate descent in
  which every step is an exact minimiser of f (:mod:`tdlight.tensor.output_fit`).

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
from tdlight.tensor.factors import Decomposition, Factors, Ranks
from tdlight.tensor.layout import FFN_TYPES, Layout
from tdlight.tensor.output_fit import spd_solve
from tdlight.tensor.variants import variant_of

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
    return spd_solve(Hd, rhs).t()


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


# --- the fits ----------------------------------------------------------------------------------


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
    strategy = variant_of(variant)
    if tensor.ndim != 3:
        raise SpecError(f"expected a stacked tensor of shape (n, A, B), got shape {tuple(tensor.shape)}")
    n, A, B = tensor.shape
    strategy.check(ranks, tensor.shape)
    if gram_index is None:
        gram_index = torch.arange(grams.shape[0])
    if grams.ndim != 3 or grams.shape[1:] != (A, A) or gram_index.shape != (n,) \
            or int(gram_index.min()) < 0 or int(gram_index.max()) >= grams.shape[0]:
        raise SpecError(f"grams {tuple(grams.shape)} with gram_index {tuple(gram_index.shape)} do not fit the "
                        f"{n}×{A}×{B} tensor: need (m, {A}, {A}) Grams and one index in [0, m) per block")
    if not isinstance(iters, int) or iters < 0:
        raise SpecError(f"iters={iters!r}; valid: an integer ≥ 0")
    dev = tensor.device
    fit = strategy.fit_outputs(tensor.double(), grams.double().to(dev), gram_index.long().to(dev), ranks,
                               iters=iters, cg_iters=cg_iters, tol=tol, start=start, callback=callback)
    f = fit.factors.map(lambda t: t.to(tensor.dtype).contiguous())
    errs = whitened_errors(tensor, f, grams, gram_index)
    return Decomposition(f, _summary(errs), errs, fit.iterations, fit.converged, fit.history)


def refit_blocks(factors: Factors, rows: torch.Tensor, tensor: torch.Tensor, grams: torch.Tensor,
                 gram_index: torch.Tensor | None = None, ridge: float = 1e-8) -> Factors:
    """Refit only the blocks ``rows`` of ``factors`` to ``tensor`` (len(rows), A, B), the bank fixed.

    Each selected block i minimises its output error ‖L_iᵀ(W_i − Ŵ_i)‖² exactly over what is
    its own, as its variant says (:meth:`~tdlight.tensor.variants.Variant.refit_blocks`):
    ``tucker``, its row P_i; ``shared``, its core; ``lowrank``, its own U_i, V_i, core.
    ``grams`` (m, A, A) prepared, ``gram_index`` (len(rows),) which Gram each selected block
    reads. Returns new factors (the other blocks and the shared factors unchanged), in
    ``factors``' dtype.
    """
    rows = torch.as_tensor(rows).long().flatten()
    if gram_index is None:
        gram_index = torch.arange(len(rows))
    dev = factors.core.device
    W = tensor.double().to(dev)
    H = grams.double().to(dev)
    gidx = gram_index.long().to(dev)
    return variant_of(factors.variant).refit_blocks(factors, rows, W, H, gidx, ridge)
