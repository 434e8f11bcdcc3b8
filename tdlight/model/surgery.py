"""Surgery on HF encoder models: swap the encoder's linears for factorized ones and back.

Works on every encoder family of :mod:`tdlight.model.families` (BERT, RoBERTa, ELECTRA,
DistilBERT, MPNet, DeBERTa-v2/v3), base models and sequence classifiers alike: the family
declares where each layer's Q, K, V, attention-output and FFN linears live. The model keeps
its class; attention code, ``output_hidden_states``, ``output_attentions`` and heads are
untouched. The banks live in ``encoder.factor_banks`` (``encoder``: the module holding the
layer list, e.g. DistilBERT's ``transformer``; one bank per layout group) and the
resolved spec in ``encoder.compression``. When the spec compresses the word embeddings too
(``embedding_rank``, ``vocab``), ``embeddings.word_embeddings`` becomes a
:class:`~tdlight.model.embedding.FactorizedEmbedding` (:mod:`tdlight.model.embedding`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from tdlight.errors import SpecError, TeacherError
from tdlight.model.bank import FactorBank
from tdlight.model.embedding import (FactorizedEmbedding, check_untied, compress_embeddings, densify_embeddings,
                                     word_embeddings)
from tdlight.model.families import BLOCK_TYPES, Family, family_of
from tdlight.model.families import resolve as resolve_path
from tdlight.model.linear import MODES, FactorizedLinear, SharedInput
from tdlight.tensor.decompose import decompose, warn_dead_blocks
from tdlight.tensor.embedding import TokenStats
from tdlight.tensor.factors import Decomposition, Factors
from tdlight.tensor.layout import stack
from tdlight.tensor.spec import CompressionSpec, EncoderShape, ResolvedSpec, resolve

def get_encoder(model: nn.Module) -> nn.Module:
    """The module holding ``model``'s encoder layers (``.layer``), as its family declares it: BERT's
    ``encoder``, DistilBERT's ``transformer`` (a base model or one with a head)."""
    fam = family_of(model)
    base = getattr(model, "base_model", model)
    encoder = resolve_path(base, fam.encoder)
    if encoder is None or not isinstance(getattr(encoder, "layer", None), nn.ModuleList):
        raise TeacherError(
            f"{type(model).__name__} is not BERT-shaped: expected `base_model.{fam.encoder}.layer` "
            f"(a ModuleList of {fam.name} layers)"
        )
    return encoder


def _get_linear(layer: nn.Module, type_: str, index: int, fam: Family) -> tuple[nn.Module, str, nn.Module]:
    """(parent module, attribute, the linear) of block type ``type_`` in encoder layer ``index``."""
    *parents, attr = fam.path(type_)
    obj = resolve_path(layer, tuple(parents)) if parents else layer
    if obj is None:
        raise TeacherError(
            f"encoder layer {index} has no `{'.'.join(parents)}`: not BERT-shaped "
            f"(a {fam.name} layer has {sorted(fam.linears.values())})"
        )
    module = getattr(obj, attr, None)
    if module is None:
        raise TeacherError(f"encoder layer {index} has no `{fam.linears[type_]}`: not BERT-shaped")
    return obj, attr, module


def linears(model: nn.Module) -> dict[tuple[int, str], nn.Module]:
    """``{(layer, type): module}`` for every encoder linear of ``model`` (dense or factorized)."""
    fam = family_of(model)
    return {(i, t): _get_linear(layer, t, i, fam)[2]
            for i, layer in enumerate(get_encoder(model).layer) for t in BLOCK_TYPES}


def encoder_shape(model: nn.Module) -> EncoderShape:
    """Sizes read from the model's modules (checked for BERT shape)."""
    encoder = get_encoder(model)
    fam = family_of(model)
    if len(encoder.layer):
        _, _, q = _get_linear(encoder.layer[0], "query", 0, fam)
        _, _, f = _get_linear(encoder.layer[0], "ffn_in", 0, fam)
        D, I = q.in_features, f.out_features
    else:  # a teacher cut to no layer (cut_layers): its sizes are its config's
        config = getattr(model, "config", None)
        D, I = getattr(config, "hidden_size", None), getattr(config, fam.intermediate_key, None)
        if not (isinstance(D, int) and isinstance(I, int)):
            raise TeacherError("the encoder has no layers and its config no hidden_size / intermediate_size")
    emb = getattr(getattr(model, "base_model", model), "embeddings", None)

    def rows(name):
        m = getattr(emb, name, None) if emb is not None else None
        return m.num_embeddings if isinstance(m, (nn.Embedding, FactorizedEmbedding)) else 0

    word = getattr(emb, "word_embeddings", None)
    width = word.embedding_dim if isinstance(word, (nn.Embedding, FactorizedEmbedding)) else D
    extra = sum(p.numel() for p in _unique(p for m in _embedding_extras(model) for p in m.parameters()))
    return EncoderShape(len(encoder.layer), D, I, rows("word_embeddings"), rows("position_embeddings"),
                        rows("token_type_embeddings"), 0 if width == D else width, extra)


def _embedding_extras(model: nn.Module) -> list[nn.Module]:
    """The modules outside the layers that ``model``'s family counts with the embeddings (present ones)."""
    base = getattr(model, "base_model", model)
    found = (resolve_path(base, p) for p in family_of(model).embedding_extras)
    return [m for m in found if m is not None]


def _unique(params):
    seen = {}
    for p in params:
        seen.setdefault(id(p), p)
    return list(seen.values())


def encoder_weights(model: nn.Module) -> dict[tuple[int, str], torch.Tensor]:
    """``{(layer, type): nn.Linear.weight}`` for every encoder linear, checking BERT shape."""
    shape = encoder_shape(model)
    D, I = shape.hidden, shape.intermediate
    expected = {"query": (D, D), "key": (D, D), "value": (D, D), "attn_out": (D, D), "ffn_in": (I, D), "ffn_out": (D, I)}
    fam = family_of(model)
    out = {}
    for i, layer in enumerate(get_encoder(model).layer):
        for t, want in expected.items():
            _, _, lin = _get_linear(layer, t, i, fam)
            w = getattr(lin, "weight", None)
            if not isinstance(w, torch.Tensor) or w.ndim != 2:
                raise TeacherError(f"layer {i} {fam.linears[t]} is a {type(lin).__name__}, not a linear: not BERT-shaped")
            if tuple(w.shape) != want:
                raise TeacherError(
                    f"layer {i} {fam.linears[t]} has weight shape {tuple(w.shape)}, expected {want} "
                    f"for hidden size {D} and FFN width {I}: not BERT-shaped"
                )
            out[(i, t)] = w.detach()
    if I % D:
        raise TeacherError(f"FFN width {I} is not a multiple of hidden size {D}: the FFN cannot be cut into D×D blocks")
    return out


SELECTS = ("first", "even")  # which of the teacher's layers a cut keeps (layer_choice)


def layer_choice(num_layers: int, count: int, select: str = "first") -> list[int]:
    """The 0-based indices of the ``count`` layers of a ``num_layers``-layer encoder that a cut keeps:
    ``first`` the first ``count`` (the bottom of the stack: the cut computes exactly the teacher's
    first layers), ``even`` evenly spaced from the first to the last (DistilBERT's initialisation,
    one layer in two, generalised; a single layer is the first)."""
    if select not in SELECTS:
        raise SpecError(f"select={select!r}; valid: {list(SELECTS)}")
    if isinstance(count, bool) or not isinstance(count, int) or not 0 <= count <= num_layers:
        raise SpecError(f"layers={count!r}; valid: an integer in [0, {num_layers}] (the teacher has {num_layers} layers)")
    if select == "first" or count < 2:
        return list(range(count))
    return [round(j * (num_layers - 1) / (count - 1)) for j in range(count)]


def cut_layers(model: nn.Module, layers: list[int]) -> nn.Module:
    """Keep only the encoder layers ``layers`` (0-based indices, increasing) of a dense BERT-family
    ``model``, in place: the teacher cut to fewer layers, the peer of a compressed student of the same
    size. Embeddings, pooler and head stay; ``config.num_hidden_layers`` follows, so the model saves
    and loads as any HF model of that depth. An empty list leaves the embeddings only (HF's encoder
    runs with no layer: its last hidden state is the embedding output)."""
    if is_compressed(model):
        raise SpecError("cut_layers needs a dense model; a compressed one shares its factors across layers")
    encoder = get_encoder(model)
    n = len(encoder.layer)
    if any(isinstance(i, bool) or not isinstance(i, int) for i in layers) or any(not 0 <= i < n for i in layers) \
            or list(layers) != sorted(set(layers)):
        raise SpecError(f"layers={list(layers)!r}; valid: increasing distinct indices in [0, {n - 1}]")
    encoder.layer = nn.ModuleList([encoder.layer[i] for i in layers])
    for new, layer in enumerate(encoder.layer):  # (a decoder's cache is indexed by layer_idx)
        for m in layer.modules():
            if getattr(m, "layer_idx", None) is not None:
                m.layer_idx = new
    model.config.num_hidden_layers = len(layers)
    return model


@dataclass
class CompressionReport:
    spec: ResolvedSpec
    decompositions: dict[str, Decomposition] = field(default_factory=dict)
    block_errors: dict[str, float] = field(default_factory=dict)  # block name -> relative error
    type_errors: dict[str, float] = field(default_factory=dict)  # block type -> relative error
    rel_error: float = 0.0
    dead_blocks: list[str] = field(default_factory=list)
    embedding: dict = field(default_factory=dict)  # the word-embedding fit (tdlight.model.embedding); {} if dense


def is_compressed(model: nn.Module) -> bool:
    return hasattr(get_encoder(model), "factor_banks")


def compress(
    model: nn.Module,
    spec: CompressionSpec | ResolvedSpec,
    *,
    init_from_weights: bool = True,
    callback: Callable[[str, int, float], None] | None = None,
    tokens: TokenStats | None = None,
) -> CompressionReport:
    """Replace the encoder linears of ``model`` (in place) by factorized ones, and its word
    embeddings by a compressed table when the spec asks (``embedding_rank``, ``vocab``).

    With ``init_from_weights`` the factors come from decomposing the model's weights
    (the report carries the errors); without it the structure is built with zero
    factors, ready for ``load_state_dict`` (used when loading a saved model).
    ``callback(group, sweep, rel_error)`` reports HOOI progress. ``tokens``
    (``tdlight.data.vocab.token_stats``): the text's token counts, needed to fit a restricted
    vocabulary (its kept ids) or a ``frequency``-weighted embedding.
    """
    if is_compressed(model):
        raise SpecError("this model is already compressed; densify it first or load the teacher again")
    shape = encoder_shape(model)
    weights = encoder_weights(model)
    rspec = spec if isinstance(spec, ResolvedSpec) else resolve(spec, shape)
    if rspec.compresses_embeddings:  # refused before any work: a tied LM head, a table already compressed
        check_untied(model)
        if not isinstance(word_embeddings(model)[1], nn.Embedding):
            raise SpecError("the word embeddings are already compressed; load the teacher again")
    layout = rspec.layout
    encoder = get_encoder(model)
    ref = next(iter(weights.values()))
    embedding_report = {}
    if rspec.compresses_embeddings:
        rspec, embedding_report = compress_embeddings(model, rspec, tokens, init_from_weights=init_from_weights)
    report = CompressionReport(rspec, embedding=embedding_report)

    banks = nn.ModuleDict()
    if init_from_weights:
        tensors = stack(layout, weights)
        type_sq_err: dict[str, float] = {}
        type_sq_norm: dict[str, float] = {}
        for g, blocks in layout.groups.items():
            cb = (lambda it, e, g=g: callback(g, it, e)) if callback else None
            x = tensors[g].float()
            dec = decompose(
                x, rspec.variant, rspec.ranks(g), balance=rspec.balance, labels=[b.type for b in blocks],
                init=rspec.init, max_iter=rspec.max_iter, tol=rspec.tol, seed=rspec.seed, callback=cb,
            )
            report.decompositions[g] = dec
            banks[g] = FactorBank.from_factors(dec.factors).to(dtype=ref.dtype, device=ref.device)
            norms2 = x.flatten(1).norm(dim=1).double().square().tolist()
            for blk, e, n2 in zip(blocks, dec.slice_errors.tolist(), norms2):
                report.block_errors[blk.name] = e
                type_sq_err[blk.type] = type_sq_err.get(blk.type, 0.0) + e * e * n2
                type_sq_norm[blk.type] = type_sq_norm.get(blk.type, 0.0) + n2
        report.type_errors = {t: (type_sq_err[t] / type_sq_norm[t]) ** 0.5 if type_sq_norm[t] else 0.0
                              for t in type_sq_err}
        total = sum(type_sq_norm.values())
        report.rel_error = (sum(type_sq_err.values()) / total) ** 0.5 if total else 0.0
        report.dead_blocks = warn_dead_blocks(report.block_errors)
    else:
        for g, blocks in layout.groups.items():
            k = rspec.banks[g]
            banks[g] = FactorBank(rspec.variant, len(blocks), k, shape.hidden, rspec.rank_in, rspec.rank_out).to(
                dtype=ref.dtype, device=ref.device
            )

    # Swap the linears. Q/K/V of a layer share one x @ U when they are in one group and U is shared.
    share_qkv = rspec.strategy.shared_factors and "query" in layout.types
    fam = family_of(model)
    for i, layer in enumerate(encoder.layer):
        qkv_groups = {layout.index[b][0] for t in ("query", "key", "value") if t in layout.types
                      for b in layout.blocks_of(i, t)}
        shared = SharedInput() if share_qkv and len(qkv_groups) == 1 else None
        for t in layout.types:
            parent, attr, lin = _get_linear(layer, t, i, fam)
            blks = layout.blocks_of(i, t)
            group = layout.index[blks[0]][0]
            idx = torch.tensor([layout.index[b][1] for b in blks], device="cpu")  # FactorizedLinear moves it
            grid = idx.view(1, -1) if t == "ffn_in" else idx.view(-1, 1)
            new = FactorizedLinear(banks[group], grid, lin.bias,
                                   shared if t in ("query", "key", "value") else None, kind=t)
            setattr(parent, attr, new)
    encoder.factor_banks = banks
    encoder.compression = rspec
    return report


@torch.no_grad()
def load_factors(model: nn.Module, factors: dict[str, Factors]) -> None:
    """Copy new factors (e.g. a function-preserving refit) into a compressed model's banks, by group."""
    banks = get_encoder(model).factor_banks
    for g, f in factors.items():
        if g not in banks:
            raise SpecError(f"no factor bank {g!r} in this model; valid: {list(banks)}")
        bank = banks[g]
        if f.variant != bank.variant or f.core.shape != bank.core.shape or f.U.shape != bank.U.shape:
            raise SpecError(f"factors for group {g!r} ({f.variant}, core {tuple(f.core.shape)}) do not fit its "
                            f"bank ({bank.variant}, core {tuple(bank.core.shape)})")
        bank.load_factors(f)


def set_mode(model: nn.Module, mode: str) -> None:
    """Switch every factorized linear to one forward mode (``tdlight.model.linear.MODES``); per-module
    choices: :mod:`tdlight.model.execution`."""
    if mode not in MODES:
        raise SpecError(f"unknown forward mode {mode!r}; valid: {list(MODES)}")
    for m in model.modules():
        if isinstance(m, FactorizedLinear):
            m.mode = mode


@torch.no_grad()
def densify(model: nn.Module) -> nn.Module:
    """Turn a compressed model back into a plain HF model with dense ``nn.Linear`` (in place), and a
    compressed word-embedding table back into an ``nn.Embedding`` of the teacher's full vocabulary."""
    encoder = get_encoder(model)
    densify_embeddings(model)
    if not hasattr(encoder, "factor_banks"):
        return model
    fam = family_of(model)
    for i, layer in enumerate(encoder.layer):
        for t in BLOCK_TYPES:
            parent, attr, lin = _get_linear(layer, t, i, fam)
            if isinstance(lin, FactorizedLinear):
                W = lin.weight
                dense = nn.Linear(lin.in_features, lin.out_features, bias=lin.bias is not None,
                                  device=W.device, dtype=W.dtype)
                dense.weight.copy_(W)
                if lin.bias is not None:
                    dense.bias.copy_(lin.bias)
                setattr(parent, attr, dense)
    del encoder.factor_banks
    del encoder.compression
    return model


def count_parameters(model: nn.Module) -> dict[str, int]:
    """Measured parameter counts by part: encoder weights/biases/LayerNorms (the layers and the factor
    banks), embeddings (with the family's relative-position tables and projection,
    ``Family.embedding_extras``), other (pooler, heads)."""
    encoder = get_encoder(model)
    base = getattr(model, "base_model", model)
    emb = getattr(base, "embeddings", None)
    banks = getattr(encoder, "factor_banks", None)
    enc_ids = {id(p) for m in (encoder.layer, banks) if m is not None for p in m.parameters()}
    emb_ids = {id(p) for m in ([emb] if emb is not None else []) + _embedding_extras(model) for p in m.parameters()}
    out = {"encoder_weights": 0, "encoder_biases": 0, "encoder_layernorms": 0, "embeddings": 0, "other": 0}
    seen = set()
    for name, p in model.named_parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        if id(p) in enc_ids:
            if "LayerNorm" in name or "layer_norm" in name:
                out["encoder_layernorms"] += p.numel()
            elif name.endswith("bias"):
                out["encoder_biases"] += p.numel()
            else:
                out["encoder_weights"] += p.numel()
        elif id(p) in emb_ids:
            out["embeddings"] += p.numel()
        else:
            out["other"] += p.numel()
    out["encoder"] = out["encoder_weights"] + out["encoder_biases"] + out["encoder_layernorms"]
    return out


def set_dropout(model: nn.Module, p: float) -> None:
    """Set the probability of every ``nn.Dropout`` in ``model`` (and the config's, for saving)."""
    if not 0.0 <= p < 1.0:
        raise SpecError(f"dropout={p!r}; valid: a probability in [0, 1)")
    for m in model.modules():
        if isinstance(m, nn.Dropout):
            m.p = p
    cfg = getattr(model, "config", None)
    for key in family_of(model).dropout_keys if cfg is not None else ():
        if cfg is not None and hasattr(cfg, key):
            setattr(cfg, key, p)


def nonfinite_tensors(module: nn.Module) -> list[str]:
    """Names of ``module``'s floating-point parameters and buffers holding a NaN or an infinity."""
    return [name for name, t in (*module.named_parameters(), *module.named_buffers())
            if t.is_floating_point() and not bool(torch.isfinite(t).all())]
