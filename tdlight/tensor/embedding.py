"""Whole-model compression of the word embeddings: the math, on plain torch tensors.

A word-embedding table E (V×D) is fitted by a low-rank product E ≈ A B, A (V×r) and B (r×D),
optionally on a restricted set of rows (the tokens a corpus or a task uses). With row weights w
(token frequencies: what a row costs is how often it is read) the best B is the top-r right
singular vectors of diag(√w) E, and for any orthonormal B the best A is E Bᵀ, whatever the
weights (each row is its own least-squares problem). At r = D the fit is exact.

:class:`TokenStats` carries what the text says about the vocabulary (token counts, the special
tokens that are always kept, the unknown token): ``tdlight.data.vocab`` builds it with a
tokenizer, :mod:`tdlight.model.embedding` applies it; this module only holds numbers.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tdlight.errors import SpecError

WEIGHTINGS = ("uniform", "frequency")
# Row weight of a token under frequency weighting: its count on the text plus this pseudo-count
# (add-one smoothing), so a token never seen there still counts a little.
SMOOTHING = 1.0


@dataclass(frozen=True)
class TokenStats:
    """Token counts of a text in a teacher's vocabulary.

    ``counts``: (V,) float64, occurrences of each token id; ``special_ids``: ids always kept in a
    restricted vocabulary ([CLS], [SEP], [PAD], [MASK], [UNK]); ``unk_id``: the row dropped ids
    read (the tokenizer's unknown token), None if it has none; ``source``: what was read."""

    counts: torch.Tensor
    special_ids: tuple[int, ...] = ()
    unk_id: int | None = None
    source: str = ""

    @property
    def vocab_size(self) -> int:
        return int(self.counts.numel())

    def kept_ids(self) -> torch.Tensor:
        """Sorted ids of the tokens seen in the text, plus the special tokens (int64)."""
        keep = self.counts > 0
        for i in self.special_ids:
            keep[i] = True
        if self.unk_id is not None:
            keep[self.unk_id] = True
        return keep.nonzero().flatten()


def row_weights(counts: torch.Tensor, smoothing: float = SMOOTHING) -> torch.Tensor:
    """Frequency weights of embedding rows from token counts: ``counts + smoothing``, normalised to mean 1."""
    if counts.ndim != 1 or (counts < 0).any():
        raise SpecError(f"token counts must be a 1-D tensor of non-negative numbers, got shape {tuple(counts.shape)}")
    w = counts.double() + smoothing
    return w / w.mean()


@dataclass(frozen=True)
class EmbeddingFit:
    """E ≈ A B: ``A`` (V×r), ``B`` (r×D, orthonormal rows); ``rel_error`` = ‖E − AB‖_F / ‖E‖_F
    over the rows, ``weighted_rel_error`` the same with every row weighted (None: no weights given)."""

    A: torch.Tensor
    B: torch.Tensor
    rel_error: float
    weighted_rel_error: float | None = None


def embedding_error(E: torch.Tensor, approx: torch.Tensor, weights: torch.Tensor | None = None) -> float:
    """Relative error ‖(E − approx)‖ / ‖E‖ with every row i weighted by ``weights[i]`` (squared norms)."""
    diff = (E.double() - approx.double()).square().sum(1)
    norm = E.double().square().sum(1)
    if weights is not None:
        w = weights.double().to(diff.device)
        diff, norm = diff * w, norm * w
    total = float(norm.sum())
    return (float(diff.sum()) / total) ** 0.5 if total > 0 else 0.0


def fit_embedding(E: torch.Tensor, rank: int, weights: torch.Tensor | None = None) -> EmbeddingFit:
    """Truncated (row-weighted) SVD of the table ``E`` (V×D) at ``rank``: B = top-``rank`` right
    singular vectors of diag(√w) E, A = E Bᵀ. In float64; returned in E's dtype."""
    if E.ndim != 2:
        raise SpecError(f"an embedding table is a V×D matrix, got shape {tuple(E.shape)}")
    V, D = E.shape
    if isinstance(rank, bool) or not isinstance(rank, int) or not 1 <= rank <= D:
        raise SpecError(f"embedding_rank={rank!r}; valid: an integer in [1, {D}] (the hidden size)")
    X = E.detach().double()
    if weights is not None:
        if weights.shape != (V,) or (weights < 0).any():
            raise SpecError(f"row weights must be {V} non-negative numbers, got shape {tuple(weights.shape)}")
        M = X * weights.double().to(X.device).sqrt()[:, None]
    else:
        M = X
    # right singular vectors of M = eigenvectors of the D×D Gram MᵀM (V ≫ D: far cheaper than the SVD of M)
    evals, evecs = torch.linalg.eigh(M.T @ M)
    B = evecs[:, evals.argsort(descending=True)[:rank]].T.contiguous()  # (r, D), orthonormal rows
    A = X @ B.T
    approx = A @ B
    return EmbeddingFit(A.to(E.dtype), B.to(E.dtype), embedding_error(X, approx),
                        None if weights is None else embedding_error(X, approx, weights))
