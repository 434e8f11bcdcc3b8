"""Calibration statistics of a BERT encoder on text: the input Gram of every linear, and output errors.

:func:`collect_grams` registers forward pre-hooks on the encoder linears (where the model's
family declares them, :mod:`tdlight.model.families`) and accumulates, over the real tokens
of the given batches (``attention_mask`` = 1), each linear's input second moment
H = XᵀX / T in float64. Q, K and V read one input, so they get one Gram (the same tensor
object). :func:`output_errors` measures a compressed student against its teacher on
held-out batches, per layer and for the last hidden state. :func:`fit_outputs` refits a
compressed model's banks to its teacher's block outputs (DESIGN §6); :func:`refit_outputs`
then refits them on the compressed model's *own* inputs (:func:`collect_pair_stats`: the
student's input Gram and its cross-Gram with the teacher's input on the same tokens), pass
by pass, with the biases refit in closed form, so that errors do not compound. No Lightning, no data imports:
batches are plain dicts of tensors.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch
from torch import nn

from tdlight.model.surgery import encoder_weights, get_encoder, linears, load_factors
from tdlight.tensor.factors import Decomposition, Factors, slice_errors
from tdlight.tensor.layout import Block, linear_to_blocks, stack
from tdlight.tensor.whiten import (
    DEFAULT_DAMP,
    block_grams,
    corrected_target,
    decompose_whitened,
    prepare_gram,
    refit_bias,
    refit_blocks,
    whitened_errors,
)

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
    device = next(model.parameters()).device
    sums: dict[tuple[int, str], torch.Tensor] = {}
    state = {"mask": None}

    def on_input(key, x):
        m = state["mask"]
        x = x[m] if m is not None and m.shape == x.shape[:-1] else x.reshape(-1, x.shape[-1])
        x = x.double()
        g = x.t() @ x
        if key in sums:
            sums[key] += g
        else:
            sums[key] = g

    taps = _Taps(model, range(len(get_encoder(model).layer)), on_input)
    tokens = 0
    mode = model.training
    model.eval()
    try:
        for batch in batches:
            inputs = _inputs(batch, device)
            state["mask"] = inputs["attention_mask"].bool()
            tokens += int(state["mask"].sum())
            taps.reset()
            model(**inputs)
    finally:
        taps.remove()
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
        start = bank.factors().map(lambda t: t.detach().float())
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


# --- refit on the student's own inputs ---------------------------------------------------------

REFIT_MODES = ("layerwise", "global", "both")
STAT_TYPES = ("query", "attn_out", "ffn_in", "ffn_out")  # key / value read the query's input


@dataclass
class PairStats:
    """Input statistics of one linear over T calibration tokens, student X̃ vs teacher X.

    ``gram`` X̃ᵀX̃ / T and ``cross`` X̃ᵀX / T (float64, centred when collected with
    ``center=True``: then of X̃ − μ̃ and X − μ), ``mean_student`` μ̃ and ``mean_teacher`` μ.
    """

    gram: torch.Tensor
    cross: torch.Tensor
    mean_student: torch.Tensor
    mean_teacher: torch.Tensor
    tokens: int


class _Stop(Exception):
    pass


class _Taps:
    """Forward pre-hooks ``fn((layer, type), x)`` on the linears of ``layers`` that read distinct inputs
    (:data:`STAT_TYPES`), each seeing only its linear's first call since :meth:`reset`: the token
    states. (DeBERTa's Q and K projections are called a second time in the same forward, on the
    relative position embeddings; that call is not a token input.)"""

    def __init__(self, model: nn.Module, layers: Iterable[int], fn):
        self.seen: set = set()
        lins = linears(model)

        def pre(module, args, key):
            if key not in self.seen:
                self.seen.add(key)
                fn(key, args[0])

        self.handles = [lins[(i, t)].register_forward_pre_hook(lambda m, a, key=(i, t): pre(m, a, key))
                        for i in layers for t in STAT_TYPES]

    def reset(self) -> None:
        self.seen.clear()

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def _run_upto(model: nn.Module, inputs: dict, last: int) -> None:
    """Forward ``model`` on ``inputs``, stopping after encoder layer ``last`` (nothing later is needed)."""
    layers = get_encoder(model).layer
    h = None
    if last < len(layers) - 1:
        def stop(module, args, out):
            raise _Stop
        h = layers[last].register_forward_hook(stop)
    try:
        model(**inputs)
    except _Stop:
        pass
    finally:
        if h is not None:
            h.remove()


@torch.no_grad()
def collect_pair_stats(student: nn.Module, teacher: nn.Module, batches: Iterable[dict], *,
                       layers: Iterable[int] | None = None, center: bool = True) -> dict[tuple[int, str], PairStats]:
    """:class:`PairStats` of every encoder linear of ``layers`` (default: all) over the real tokens.

    Runs ``teacher`` and ``student`` on each batch (the student's linears are read at the
    same attribute paths); ``key`` / ``value`` map to the ``query``'s stats. Each forward
    stops after the last layer asked for.
    """

    L = len(get_encoder(student).layer)
    layers = sorted(set(range(L) if layers is None else layers))
    if not layers:
        return {}
    device = next(student.parameters()).device
    sums: dict[tuple[int, str], list] = {}
    captured: dict[tuple[int, str], torch.Tensor] = {}
    state = {"mask": None}

    def rows(x):
        m = state["mask"]
        return (x[m] if m is not None and m.shape == x.shape[:-1] else x.reshape(-1, x.shape[-1])).double()

    def on_teacher(key, x):
        captured[key] = rows(x)

    def on_student(key, x):
        xs, xt = rows(x), captured[key]
        acc = sums.get(key)
        if acc is None:
            sums[key] = [xs.t() @ xs, xs.t() @ xt, xs.sum(0), xt.sum(0)]
        else:
            acc[0] += xs.t() @ xs
            acc[1] += xs.t() @ xt
            acc[2] += xs.sum(0)
            acc[3] += xt.sum(0)

    modes = student.training, teacher.training
    student.eval()
    teacher.eval()
    taps = _Taps(teacher, layers, on_teacher), _Taps(student, layers, on_student)
    tokens = 0
    try:
        for batch in batches:
            inputs = _inputs(batch, device)
            state["mask"] = inputs["attention_mask"].bool()
            tokens += int(state["mask"].sum())
            for tap, model in zip(taps, (teacher, student)):
                tap.reset()
                _run_upto(model, inputs, layers[-1])
            captured.clear()
    finally:
        for tap in taps:
            tap.remove()
        student.train(modes[0])
        teacher.train(modes[1])
    out = {}
    if tokens == 0:
        return out
    for (i, t), (hs, c, ss, st) in sums.items():
        ms, mt = ss / tokens, st / tokens
        H, C = hs / tokens, c / tokens
        if center:
            H = H - torch.outer(ms, ms)
            C = C - torch.outer(ms, mt)
        out[(i, t)] = PairStats(H, C, ms, mt, tokens)
        if t == "query":
            out[(i, "key")] = out[(i, "value")] = out[(i, t)]
    return out


@torch.no_grad()
def refit_biases(student: nn.Module, teacher: nn.Module, stats: dict[tuple[int, str], PairStats]) -> None:
    """Set every student bias (of the linears in ``stats``) to :func:`~tdlight.tensor.whiten.refit_bias`."""
    s_lin, t_lin = linears(student), linears(teacher)
    for key, st in stats.items():
        ls, lt = s_lin[key], t_lin[key]
        if ls.bias is None:
            continue
        b = refit_bias(lt.bias, lt.weight, ls.weight, st.mean_teacher, st.mean_student)
        ls.bias.copy_(b.to(ls.bias.dtype))


@torch.no_grad()
def refit_outputs(student: nn.Module, teacher: nn.Module, batches: list[dict], heldout: list[dict], *,
                  passes: int = 2, damp: float = DEFAULT_DAMP, iters: int = 10, bias: bool = True,
                  mode: str = "layerwise",
                  callback: Callable[[int, str, int, float], None] | None = None) -> list[dict]:
    """Refit the compressed ``student`` (in place) on its own inputs, ``passes`` times.

    ``mode``: ``layerwise`` (each pass: :func:`refit_layerwise`, every linear in forward
    order on its exact own inputs, the shared factors fixed), ``global`` (each pass as below,
    every factor refit at once on stale inputs) or ``both`` (global, then layerwise).
    A global pass runs teacher and student side by side on ``batches``
    (:func:`collect_pair_stats`, centred when ``bias``), replaces every teacher weight W by
    the corrected target W' (:func:`~tdlight.tensor.whiten.corrected_target`: the best
    student weight for the student's inputs X̃ is the whitened fit of W' in H̃), refits every
    group (:func:`fit_outputs`, warm-started from the current factors) and, with ``bias``,
    every bias in closed form (b̂ = b + Wμ − Ŵμ̃; with the centred Grams this is the joint
    optimum). A pass is kept only if the held-out last-hidden-state error improves;
    otherwise the student is restored and the refit stops. ``callback(pass, group, sweep,
    rel_error)`` reports progress. Returns one record per pass, the first (pass 0) for the
    student as given: ``{pass, kept, last_hidden, hidden_errors, layer_errors,
    calibration_output_error}`` (the last: RMS over blocks on the pass's calibration inputs).
    """
    if not isinstance(passes, int) or passes < 0:
        raise ValueError(f"passes={passes!r}; valid: an integer ≥ 0")
    if mode not in REFIT_MODES:
        raise ValueError(f"mode={mode!r}; valid: {', '.join(REFIT_MODES)}")
    weights = {k: w.double() for k, w in encoder_weights(teacher).items()}
    best = output_errors(student, teacher, heldout)
    records = [{"pass": 0, "kept": True, **best, "calibration_output_error": None}]
    for p in range(1, passes + 1):
        saved = {k: v.detach().clone() for k, v in student.state_dict().items()}
        cal = {}
        if mode in ("global", "both"):
            stats = collect_pair_stats(student, teacher, batches, center=bias)
            targets = {k: corrected_target(weights[k], st.gram, st.cross, damp) for k, st in stats.items()}
            grams = {k: st.gram for k, st in stats.items()}
            cb = (lambda g, it, e, p=p: callback(p, g, it, e)) if callback else None
            cal = fit_outputs(student, targets, grams, damp=damp, iters=iters, callback=cb).output_errors
            if bias:
                refit_biases(student, teacher, stats)
        if mode in ("layerwise", "both"):
            cal = refit_layerwise(student, teacher, batches, damp=damp, bias=bias)
        errs = output_errors(student, teacher, heldout)
        cal = cal.values()
        rec = {"pass": p, "kept": errs["last_hidden"] < best["last_hidden"], **errs,
               "calibration_output_error": (sum(e * e for e in cal) / max(1, len(cal))) ** 0.5}
        records.append(rec)
        if not rec["kept"]:
            student.load_state_dict(saved)
            break
        best = errs
    return records



def _layer_inputs(model: nn.Module, inputs: dict) -> tuple[torch.Tensor, tuple, dict]:
    """The hidden state entering encoder layer 0 and the rest of that call (masks), without running it."""
    got = {}

    def pre(module, args, kwargs):
        got["args"], got["kwargs"] = args, kwargs
        raise _Stop

    h = get_encoder(model).layer[0].register_forward_pre_hook(pre, with_kwargs=True)
    try:
        model(**inputs)
    except _Stop:
        pass
    finally:
        h.remove()
    args, kwargs = got["args"], dict(got["kwargs"])
    if args:
        return args[0], tuple(args[1:]), kwargs
    return kwargs.pop("hidden_states"), (), kwargs


def _call_layer(layer: nn.Module, hidden: torch.Tensor, rest: tuple, kwargs: dict) -> torch.Tensor:
    out = layer(hidden, *rest, **kwargs)
    return out[0] if isinstance(out, tuple) else out


@torch.no_grad()
def refit_layerwise(student: nn.Module, teacher: nn.Module, batches: list[dict], *, damp: float = DEFAULT_DAMP,
                    bias: bool = True) -> dict[str, float]:
    """Refit the student (in place) linear by linear, in forward order, on its exact own inputs.

    Layer by layer and, within a layer, Q/K/V -> attention output -> FFN input -> FFN output:
    the student's inputs X̃ of that linear (everything before it already refit) and the
    teacher's X on the same tokens give the corrected target W'
    (:func:`~tdlight.tensor.whiten.corrected_target`, centred when ``bias``); its blocks are
    refit with the shared factors fixed (:func:`~tdlight.tensor.whiten.refit_blocks`: P rows,
    own cores) and, with ``bias``, its bias in closed form. Each step minimises that linear's
    output error on its true inputs exactly, so errors do not compound. Returns each block's
    relative output error on those inputs after the refit (by block name).
    """
    enc_s, enc_t = get_encoder(student), get_encoder(teacher)
    layout = enc_s.compression.layout
    D = layout.hidden
    weights = {k: w.double() for k, w in encoder_weights(teacher).items()}
    s_lin, t_lin = linears(student), linears(teacher)
    device = next(student.parameters()).device
    modes = student.training, teacher.training
    student.eval()
    teacher.eval()
    states = []  # per batch: mask, teacher hidden, student hidden, the rest of the layer call
    for batch in batches:
        inputs = _inputs(batch, device)
        ht, rest, kw = _layer_inputs(teacher, inputs)
        hs, _, _ = _layer_inputs(student, inputs)
        states.append([inputs["attention_mask"].bool(), ht, hs, rest, kw])
    errors: dict[str, float] = {}
    try:
        for l in range(len(enc_s.layer)):
            for t in STAT_TYPES:
                sums: list = []
                cap = {}

                def rows(x, m):
                    return (x[m] if m.shape == x.shape[:-1] else x.reshape(-1, x.shape[-1])).double()

                def on_t(module, args):
                    cap["x"] = rows(args[0], cap["m"])
                    raise _Stop

                def on_s(module, args):
                    xs, xt = rows(args[0], cap["m"]), cap["x"]
                    parts = (xs.t() @ xs, xs.t() @ xt, xs.sum(0), xt.sum(0), xt.t() @ xt)
                    if sums:
                        for acc, v in zip(sums, parts):
                            acc += v
                    else:
                        sums.extend(parts)
                    raise _Stop

                hooks = [t_lin[(l, t)].register_forward_pre_hook(on_t), s_lin[(l, t)].register_forward_pre_hook(on_s)]
                tokens = 0
                try:
                    for m, ht, hs, rest, kw in states:
                        cap["m"] = m
                        tokens += int(m.sum())
                        for layer, h in ((enc_t.layer[l], ht), (enc_s.layer[l], hs)):
                            try:
                                _call_layer(layer, h, rest, kw)
                            except _Stop:
                                pass
                finally:
                    for h in hooks:
                        h.remove()
                Hs, C, ms, mt, Ht = (v / tokens for v in sums)
                if bias:
                    Hs, C = Hs - torch.outer(ms, ms), C - torch.outer(ms, mt)
                types = ("query", "key", "value") if t == "query" else (t,)
                by_group: dict[str, list] = {}
                for tt in types:
                    target = corrected_target(weights[(l, tt)], Hs, C, damp)
                    for part, blk_w in enumerate(linear_to_blocks(target, tt, D)):
                        blk = Block(l, tt, part)
                        if blk not in layout.index:
                            continue
                        g, i = layout.index[blk]
                        p = part if tt == "ffn_out" else 0
                        h = Hs[p * D:(p + 1) * D, p * D:(p + 1) * D] if Hs.shape[0] > D else Hs
                        by_group.setdefault(g, []).append((i, blk.name, blk_w, (tt, p), h))
                for g, items in by_group.items():
                    bank = enc_s.factor_banks[g]
                    keys, grams = {}, []
                    for *_, key, h in items:
                        if key not in keys:
                            keys[key] = len(grams)
                            grams.append(prepare_gram(h, damp))
                    index = torch.tensor([keys[it[3]] for it in items])
                    f = bank.factors().map(torch.Tensor.detach)
                    target = torch.stack([it[2] for it in items]).to(f.core.device)
                    H = torch.stack(grams)
                    new = refit_blocks(f, torch.tensor([it[0] for it in items]), target, H, index)
                    bank.load_factors(new)
                    idx = torch.tensor([it[0] for it in items])
                    Wf = new.reconstruct(idx)
                    E = (target.double() - Wf.double())
                    Hb = H[index].double()
                    num = (E * (Hb @ E)).sum((1, 2)).clamp_min(0).sqrt()
                    den = (target.double() * (Hb @ target.double())).sum((1, 2)).clamp_min(1e-300).sqrt()
                    for it, e in zip(items, (num / den).tolist()):
                        errors[it[1]] = e
                if bias:
                    for tt in types:
                        ls, lt = s_lin[(l, tt)], t_lin[(l, tt)]
                        if ls.bias is not None:
                            ls.bias.copy_(refit_bias(lt.bias, lt.weight, ls.weight, mt, ms).to(ls.bias.dtype))
            for st in states:
                st[1] = _call_layer(enc_t.layer[l], st[1], st[3], st[4])
                st[2] = _call_layer(enc_s.layer[l], st[2], st[3], st[4])
    finally:
        student.train(modes[0])
        teacher.train(modes[1])
    return errors
