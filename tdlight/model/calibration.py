"""Calibration statistics of a BERT encoder on text: the input Gram of every linear, and output errors.

:func:`collect_grams` registers forward pre-hooks on the encoder linears (the attribute
paths of :data:`tdlight.model.surgery.LINEAR_PATHS`) and accumulates, over the real tokens
of the given batches (``attention_mask`` = 1), each linear's input second moment
H = XᵀX / T in float64. Q, K and V read one input, so they get one Gram (the same tensor
object). :func:`output_errors` measures a compressed student against its teacher on
held-out batches, per layer and for the last hidden state. :func:`fit_outputs` refits a
compressed model's banks to its teacher's block outputs (DESIGN §6). No Lightning, no data imports:
batches are plain dicts of tensors.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch
from torch import nn

from tdlight.model.surgery import LINEAR_PATHS, _get_linear, get_encoder, load_factors
from tdlight.tensor.decompose import Decomposition, Factors, slice_errors
from tdlight.tensor.layout import stack
from tdlight.tensor.whiten import DEFAULT_DAMP, block_grams, decompose_whitened, whitened_errors

MODEL_INPUTS = ("input_ids", "attention_mask", "token_type_ids")


def _inputs(batch: dict, device: torch.device) -> dict[str, torch.Tensor]:
    out = {k: batch[k].to(device) for k in MODEL_INPUTS if k in batch}
    if "attention_mask" not in out:
        out["attention_mask"] = torch.ones_like(out["input_ids"])
    return out


@torch.no_grad()
def collect_grams(model: nn.Module, batches: Iterable[dict]) -> tuple[dict[tuple[int, str], torch.Tensor], int]:
    """Input Grams of every encoder linear over the real tokens of ``batches``.

    Returns ``({(layer, type): H}, T)``: H is (in_features, in_features) float64 on the
    model's device, the mean of x xᵀ over the T real tokens (FFN-output: the 4D×4D Gram of
    its whole input; block p's Gram is its p-th D×D diagonal block). ``key`` and ``value``
    map to the very tensor of ``query``.
    """
    encoder = get_encoder(model)
    device = next(model.parameters()).device
    sums: dict[tuple[int, str], torch.Tensor] = {}
    state = {"mask": None}
    handles = []

    def hook(key):
        def pre(module, args):
            x = args[0]
            m = state["mask"]
            x = x[m] if m is not None and m.shape == x.shape[:-1] else x.reshape(-1, x.shape[-1])
            x = x.double()
            g = x.t() @ x
            if key in sums:
                sums[key] += g
            else:
                sums[key] = g
        return pre

    for i, layer in enumerate(encoder.layer):
        for t in LINEAR_PATHS:
            if t in ("key", "value"):
                continue  # they read the query's input
            _, _, lin = _get_linear(layer, t, i)
            handles.append(lin.register_forward_pre_hook(hook((i, t))))
    tokens = 0
    mode = model.training
    model.eval()
    try:
        for batch in batches:
            inputs = _inputs(batch, device)
            state["mask"] = inputs["attention_mask"].bool()
            tokens += int(state["mask"].sum())
            model(**inputs)
    finally:
        for h in handles:
            h.remove()
        model.train(mode)
    if tokens == 0:
        return {}, 0
    grams = {}
    for (i, t), g in sums.items():
        grams[(i, t)] = g / tokens
        if t == "query":
            grams[(i, "key")] = grams[(i, "value")] = grams[(i, t)]
    return grams, tokens


@torch.no_grad()
def output_errors(student: nn.Module, teacher: nn.Module, batches: Iterable[dict]) -> dict:
    """Relative output errors of ``student`` against ``teacher`` over the real tokens of ``batches``.

    * ``layer_errors`` (L,): layer l of the student fed the teacher's input h_{l-1}, its
      output against the teacher's h_l — the error each compressed layer adds by itself;
    * ``hidden_errors`` (L,): the student's own h_l against the teacher's (errors compound);
    * ``last_hidden``: ``hidden_errors[-1]``, the last hidden state.

    Each is ‖ĥ − h‖ / ‖h‖ with the norms summed over every batch.
    """
    device = next(student.parameters()).device
    layers = get_encoder(student).layer
    L = len(layers)
    iso_num = torch.zeros(L, dtype=torch.float64)
    e2e_num = torch.zeros(L, dtype=torch.float64)
    den = torch.zeros(L, dtype=torch.float64)
    modes = student.training, teacher.training
    student.eval()
    teacher.eval()
    try:
        for batch in batches:
            inputs = _inputs(batch, device)
            w = inputs["attention_mask"][..., None].to(torch.float64)
            t = teacher(**inputs, output_hidden_states=True).hidden_states
            s = student(**inputs, output_hidden_states=True).hidden_states
            outs: list[torch.Tensor] = []
            handles = []
            for i, layer in enumerate(layers):
                def pre(module, args, kwargs, i=i):
                    if args:
                        return (t[i], *args[1:]), kwargs
                    return args, {**kwargs, "hidden_states": t[i]}

                def post(module, args, kwargs, out):
                    outs.append(out[0] if isinstance(out, tuple) else out)

                handles.append(layer.register_forward_pre_hook(pre, with_kwargs=True))
                handles.append(layer.register_forward_hook(post, with_kwargs=True))
            try:
                student(**inputs)
            finally:
                for h in handles:
                    h.remove()
            for l in range(L):
                ref = t[l + 1].double()
                den[l] += (ref * w).square().sum().cpu()
                e2e_num[l] += ((s[l + 1].double() - ref) * w).square().sum().cpu()
                iso_num[l] += ((outs[l].double() - ref) * w).square().sum().cpu()
    finally:
        student.train(modes[0])
        teacher.train(modes[1])
    d = den.clamp_min(1e-300)
    hidden = (e2e_num / d).sqrt().tolist()
    return {"layer_errors": (iso_num / d).sqrt().tolist(), "hidden_errors": hidden, "last_hidden": hidden[-1]}


@dataclass
class OutputFit:
    """What :func:`fit_outputs` did, by block name (``layer0.query``, ``layer3.ffn_out.2``).

    ``output_errors`` / ``start_output_errors``: relative output error on the calibration
    inputs ‖L_iᵀ(W_i − Ŵ_i)‖ / ‖L_iᵀ W_i‖ of the fit and of the factors it started from;
    ``block_errors`` / ``type_errors`` / ``rel_error``: the fit's relative *weight* errors.
    """

    decompositions: dict[str, Decomposition] = field(default_factory=dict)
    output_errors: dict[str, float] = field(default_factory=dict)
    start_output_errors: dict[str, float] = field(default_factory=dict)
    block_errors: dict[str, float] = field(default_factory=dict)
    type_errors: dict[str, float] = field(default_factory=dict)
    rel_error: float = 0.0


@torch.no_grad()
def fit_outputs(model: nn.Module, weights: dict[tuple[int, str], torch.Tensor],
                grams: dict[tuple[int, str], torch.Tensor], *, damp: float = DEFAULT_DAMP, iters: int = 10,
                callback: Callable[[str, int, float], None] | None = None) -> OutputFit:
    """Refit the factor banks of the compressed ``model`` (in place) to the teacher's block outputs.

    ``weights``: the teacher's ``{(layer, type): nn.Linear.weight}``
    (:func:`~tdlight.model.surgery.encoder_weights` of the uncompressed model); ``grams``:
    its input Grams (:func:`collect_grams`). Each group is fitted by
    :func:`~tdlight.tensor.whiten.decompose_whitened`, started from the model's current
    factors where they are better than the closed-form start. ``callback(group, sweep,
    rel_error)`` reports progress.
    """
    encoder = get_encoder(model)
    rspec = encoder.compression
    layout = rspec.layout
    tensors = stack(layout, weights)
    out = OutputFit()
    type_sq_err: dict[str, float] = {}
    type_sq_norm: dict[str, float] = {}
    new: dict[str, Factors] = {}
    for g, blocks in layout.groups.items():
        bank = encoder.factor_banks[g]
        x = tensors[g].to(bank.U.device, torch.float32)
        H, index = block_grams(layout, g, grams, damp)
        H = H.to(x.device)
        start = bank.factors()
        start = Factors(start.variant, *(t.detach().float() if t is not None else None
                                         for t in (start.U, start.V, start.core, start.P)))
        cb = (lambda it, e, g=g: callback(g, it, e)) if callback else None
        dec = decompose_whitened(x, H, rspec.variant, rspec.ranks(g), gram_index=index, iters=iters,
                                 start=start, callback=cb)
        out.decompositions[g] = dec
        new[g] = dec.factors
        before = whitened_errors(x, start, H, index).tolist()
        werr = slice_errors(x, dec.factors).tolist()
        norms2 = x.flatten(1).norm(dim=1).double().square().tolist()
        for blk, e_out, e0, e, n2 in zip(blocks, dec.slice_errors.tolist(), before, werr, norms2):
            out.output_errors[blk.name] = e_out
            out.start_output_errors[blk.name] = e0
            out.block_errors[blk.name] = e
            type_sq_err[blk.type] = type_sq_err.get(blk.type, 0.0) + e * e * n2
            type_sq_norm[blk.type] = type_sq_norm.get(blk.type, 0.0) + n2
    load_factors(model, {g: f for g, f in new.items()})
    out.type_errors = {t: (type_sq_err[t] / type_sq_norm[t]) ** 0.5 if type_sq_norm[t] else 0.0 for t in type_sq_err}
    total = sum(type_sq_norm.values())
    out.rel_error = (sum(type_sq_err.values()) / total) ** 0.5 if total else 0.0
    return out
