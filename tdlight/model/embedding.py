"""A compressed word-embedding table: low rank, a restricted vocabulary, or both.

:class:`FactorizedEmbedding` replaces ``base_model.embeddings.word_embeddings`` (an
``nn.Embedding`` of the teacher's V token ids) and reads like one, its lookup being

    row = id_map[input_ids]              teacher id -> kept row (restricted vocabulary only)
    x   = weight[row]                    (…, r)  or (…, D) at full rank
    y   = x @ projection                 (…, D)  (low rank only)

``weight`` is A (V′×r) and ``projection`` B (r×D) when low rank (``weight`` is V′×D rows when only
the vocabulary is restricted). ``id_map`` is a persistent int32 buffer over all V teacher ids: the
ids of dropped tokens read the unknown token's row, the id-level twin of a tokenizer mapping an
out-of-vocabulary word to [UNK]. The tokenizer and the input ids stay the teacher's, so teacher
and student read the same batches in distillation. A gather, another gather and a matmul: ONNX
traces it as it is.

:func:`compress_embeddings` swaps it in (fitted from the teacher's table, or the bare structure for
loading a saved model), :func:`densify_embeddings` swaps back a full-vocabulary ``nn.Embedding``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from tdlight.errors import SpecError, TeacherError
from tdlight.tensor.embedding import TokenStats, embedding_error, fit_embedding, row_weights


class FactorizedEmbedding(nn.Module):
    """``nn.Embedding``-like lookup of ``num_embeddings`` teacher ids into ``embedding_dim`` features.

    ``rows``: kept rows V′ (= ``num_embeddings`` without a restriction); ``rank``: r, or None for
    dense rows; ``restricted``: whether an ``id_map`` (``num_embeddings``,) int32 buffer maps ids to
    rows; ``padding_idx``: the teacher's padding id (its row gets no gradient, as in ``nn.Embedding``).
    """

    def __init__(self, num_embeddings: int, embedding_dim: int, rows: int, rank: int | None = None, *,
                 restricted: bool = False, padding_idx: int | None = None, device=None, dtype=None):
        super().__init__()
        if not restricted and rows != num_embeddings:
            raise SpecError(f"{rows} rows for {num_embeddings} ids needs a restricted vocabulary (an id map)")
        self.num_embeddings, self.embedding_dim, self.rows, self.rank = num_embeddings, embedding_dim, rows, rank
        self.padding_idx = padding_idx
        self.weight = nn.Parameter(torch.zeros(rows, rank or embedding_dim, device=device, dtype=dtype))
        self.projection = (nn.Parameter(torch.zeros(rank, embedding_dim, device=device, dtype=dtype))
                           if rank is not None else None)
        if restricted:
            self.register_buffer("id_map", torch.zeros(num_embeddings, dtype=torch.int32, device=device))
        else:
            self.id_map = None

    def extra_repr(self) -> str:
        return (f"{self.num_embeddings} ids -> {self.rows} rows, {self.embedding_dim}"
                + (f", rank={self.rank}" if self.rank is not None else "")
                + (f", padding_idx={self.padding_idx}" if self.padding_idx is not None else ""))

    def _padding_row(self) -> int | None:
        if self.padding_idx is None:
            return None
        return int(self.id_map[self.padding_idx]) if self.id_map is not None else self.padding_idx

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        rows = self.id_map[input_ids] if self.id_map is not None else input_ids
        x = F.embedding(rows, self.weight, padding_idx=self._padding_row())
        return x if self.projection is None else x @ self.projection

    @torch.no_grad()
    def dense_weight(self) -> torch.Tensor:
        """The (num_embeddings × embedding_dim) table this lookup equals (dropped ids: the [UNK] row)."""
        table = self.weight if self.projection is None else self.weight @ self.projection
        return table[self.id_map.long()] if self.id_map is not None else table.clone()


def word_embeddings(model: nn.Module) -> tuple[nn.Module, nn.Module]:
    """``(base_model.embeddings, its word_embeddings)``; a model without them is not BERT-shaped."""
    emb = getattr(getattr(model, "base_model", model), "embeddings", None)
    word = getattr(emb, "word_embeddings", None)
    if word is None:
        raise TeacherError(f"{type(model).__name__} has no `base_model.embeddings.word_embeddings`: its word "
                           "embeddings cannot be compressed (expected a BERT-shaped model)")
    return emb, word


def check_untied(model: nn.Module) -> None:
    """Refuse a model whose output embeddings are tied to the word embeddings (a masked-LM head)."""
    out = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    config = getattr(model, "config", None)
    if out is not None and getattr(config, "tie_word_embeddings", True):
        raise SpecError(
            f"{type(model).__name__} ties its output embeddings (the LM head's decoder) to the word embeddings; "
            "compressing them would leave the tie broken. Valid: compress the encoder it wraps "
            f"(`model.{getattr(model, 'base_model_prefix', 'bert')}`) or a sequence classifier, or leave "
            "compression.embedding_rank and compression.vocab null")


@torch.no_grad()
def compress_embeddings(model: nn.Module, spec, tokens: TokenStats | None = None, *,
                        init_from_weights: bool = True) -> tuple[object, dict]:
    """Swap the word embeddings of ``model`` for a :class:`FactorizedEmbedding` as ``spec`` (a
    :class:`~tdlight.tensor.spec.ResolvedSpec`) asks; returns the spec (its ``vocab_size`` filled in
    from ``tokens`` when it was open) and a report of the fit.

    With ``init_from_weights`` the rows come from the teacher's table: the kept ids are
    ``tokens.kept_ids()`` (a restricted vocabulary needs ``tokens``), the low-rank fit weights its
    rows by ``tokens.counts`` under ``frequency`` weighting. Without it the structure is built with
    zeros (``spec.vocab_size`` must be known), ready for ``load_state_dict``.
    """
    from dataclasses import replace

    _, word = word_embeddings(model)
    if not isinstance(word, nn.Embedding):
        raise SpecError(f"the word embeddings are a {type(word).__name__}, not an nn.Embedding: already compressed?")
    check_untied(model)
    V, D = word.weight.shape
    restricted = spec.vocab is not None
    frequency = spec.embedding_weighting == "frequency"
    if init_from_weights and (restricted or frequency):
        if tokens is None:
            raise SpecError(f"{'vocab=' + repr(spec.vocab) if restricted else 'embedding_weighting=frequency'} needs "
                            "the token statistics of its text: pass tokens=tdlight.data.vocab.token_stats(...)")
        if tokens.vocab_size != V:
            raise SpecError(f"token counts over {tokens.vocab_size} ids for a vocabulary of {V}")
    report: dict = {"ids": V, "rank": spec.embedding_rank, "weighting": spec.embedding_weighting or "uniform"}
    if restricted:
        kept = tokens.kept_ids() if init_from_weights else None
        if kept is not None:
            if spec.vocab_size is None:
                spec = replace(spec, vocab_size=int(kept.numel()))
            elif spec.vocab_size != kept.numel():
                raise SpecError(f"vocab_size={spec.vocab_size} but the text keeps {kept.numel()} tokens")
            if tokens.unk_id is None:
                raise SpecError(f"vocab={spec.vocab!r}: the tokenizer has no unknown token for the dropped ids to "
                                "read; valid: a tokenizer with an [UNK] token, or vocab=null")
        elif spec.vocab_size is None:
            raise SpecError(f"vocab={spec.vocab!r} without vocab_size: the structure needs the kept rows' count")
        rows = spec.vocab_size
    else:
        kept, rows = None, V
    new = FactorizedEmbedding(V, D, rows, spec.embedding_rank, restricted=restricted, padding_idx=word.padding_idx,
                              device=word.weight.device, dtype=word.weight.dtype)
    report["rows"] = rows
    if init_from_weights:
        E = word.weight.detach()
        table = E[kept.to(E.device)] if kept is not None else E
        counts = None if tokens is None else (tokens.counts[kept.cpu()] if kept is not None else tokens.counts)
        if spec.embedding_rank is None:
            new.weight.copy_(table)
            report["rel_error"] = 0.0
        else:
            fit = fit_embedding(table, spec.embedding_rank, row_weights(counts) if frequency else None)
            new.weight.copy_(fit.A)
            new.projection.copy_(fit.B)
            report["rel_error"] = fit.rel_error  # over the kept rows, every row alike
        if counts is not None:  # the error as the text reads the rows: each row weighted by its count
            approx = new.weight if new.projection is None else new.weight @ new.projection
            report["token_rel_error"] = embedding_error(table, approx, counts)
        if kept is not None:
            id_map = torch.full((V,), -1, dtype=torch.int64)
            id_map[kept.cpu()] = torch.arange(rows)
            unk_row = int(id_map[tokens.unk_id])
            new.id_map.copy_(torch.where(id_map < 0, unk_row, id_map).to(torch.int32))
            report["source"] = tokens.source
    _set_word_embeddings(model, new)
    return spec, report


def _set_word_embeddings(model: nn.Module, module: nn.Module) -> None:
    emb, _ = word_embeddings(model)
    emb.word_embeddings = module


@torch.no_grad()
def densify_embeddings(model: nn.Module) -> nn.Module:
    """Turn a :class:`FactorizedEmbedding` back into a full-vocabulary ``nn.Embedding`` (in place)."""
    emb = getattr(getattr(model, "base_model", model), "embeddings", None)
    word = getattr(emb, "word_embeddings", None)
    if isinstance(word, FactorizedEmbedding):
        W = word.dense_weight()
        dense = nn.Embedding(word.num_embeddings, word.embedding_dim, padding_idx=word.padding_idx,
                             device=W.device, dtype=W.dtype)
        dense.weight.copy_(W)
        _set_word_embeddings(model, dense)
    return model


def train_compressed_embeddings(model: nn.Module) -> None:
    """Let a compressed word-embedding table train (its factors are part of what the student learns back),
    even where the dense embedding matrices stay frozen."""
    _, word = word_embeddings(model)
    if isinstance(word, FactorizedEmbedding):
        word.requires_grad_(True)
