"""Execution plans: run each part of a compressed encoder factorized, folded or as its dense weight.

A D×D block at ranks (a, b) costs ``D·a + a·b + b·D`` multiply-adds per token factorized
instead of ``D²`` dense: much cheaper when d ≪ D, about even near d = D/2, where the three
smaller GEMMs' overheads make the factorized forward the slower one (the ``paper_1_7``
student ran at 0.89× of its teacher, docs/RESULTS.md §3). *Folded*, the mixed cores are
multiplied into Vᵀ (or U) once, at load time: two GEMMs per token and no core product —
Q, K and V cost ``D·a + 3·a·D`` instead of ``3·D²``, cheaper than dense up to d ≈ 3D/4 — at
the memory of one rank × D matrix per block and layer (:meth:`~tdlight.tensor.variants.Variant.fold`;
variants sharing U and V only). The weights are the same in every mode; only the arithmetic
differs. A *plan* picks, for each kind of unit of the encoder — ``qkv`` (Q, K and V computed
together from one ``x @ U``), ``attn_out``, ``ffn_in``, ``ffn_out`` (and ``query``/``key``/
``value`` when they do not share an input) — the mode that is fastest:

* ``policy="timed"``: every mode of the first unit of each kind, each timed in pairs against
  dense on random inputs of the given shapes on the target device; the fastest is kept
  (geometric mean of the speed-ups over the batch sizes). One unit per kind stands for all:
  every layer's unit of a kind has the same shapes.
* ``policy="macs"``: the fewest multiply-adds (:func:`tdlight.tensor.accounting.unit_macs`), no timing.
* ``policy="size"``: the fewest stored parameters (:func:`tdlight.tensor.accounting.stored_weights`):
  factorized units share their group's bank, folded and dense ones store their own matrices, so
  the plan that stores least is searched over every combination of modes per kind (ties: fewer
  MACs). What an exported file holds (the default of :func:`tdlight.model.onnx.export_onnx`):
  nearly always all factorized, dense where the ranks are so high that the bank outweighs the
  dense weights.
* ``policy="factorized"`` / ``"folded"`` / ``"dense"``: one mode everywhere. ``factorized`` is the
  memory-lean one (only the shared factors in memory: the compression ratio holds at run time too).

A plan is a JSON-able dict; :func:`apply` sets the modes, and :func:`tdlight.model.io.save_compressed`
records the model's plan in ``tdlight.json`` so that loading on the same device type applies it
again (``tdlight.load_compressed(path, execution="auto")``). Folded and dense units cache their
weights (rebuilt when a factor changes; with gradients on, rebuilt on every call), so a plan
changes speed and memory, never results beyond float rounding.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import torch
from torch import nn

from tdlight.errors import SpecError
from tdlight.model.linear import MODES, FactorizedLinear
from tdlight.model.speed import paired_times
from tdlight.model.surgery import encoder_shape, get_encoder, is_compressed
from tdlight.tensor.accounting import macs, stored_weights, unit_macs

UNIT_MODES = MODES  # every forward mode of a factorized linear is a unit mode
# how a model's units are chosen: timed (time every mode of each unit kind on this machine, keep the
# fastest), macs (the fewest multiply-adds per unit kind), size (the fewest stored parameters:
# factorized units share the bank; ONNX export's default), or one unit mode for every kind
# (factorized: as trained, only the shared factors in memory; folded: cores multiplied into V or U at
# load time, two GEMMs per unit; dense)
POLICIES = ("timed", "macs", "size", *UNIT_MODES)
# what a loader accepts (tdlight.model.io.load_compressed, stage.execution, export-onnx): a policy, or
# auto — the plan saved with the model for this device type, else the MAC accounting's
EXECUTIONS = ("auto", *POLICIES)


@dataclass
class Unit:
    """One unit of the forward: a factorized linear, or Q/K/V sharing an input (``kind="qkv"``)."""

    kind: str
    layer: int
    members: list[FactorizedLinear]

    def run(self, x: torch.Tensor) -> None:
        for m in self.members:  # a shared input computes all members on the first call
            m(x)


def units(model: nn.Module) -> list[Unit]:
    """The factorized units of a compressed model, layer by layer."""
    if not is_compressed(model):
        raise SpecError("execution plans are for compressed models; this one has no factor banks")
    out = []
    for i, layer in enumerate(get_encoder(model).layer):
        shared_seen = set()
        for mod in layer.modules():
            if not isinstance(mod, FactorizedLinear):
                continue
            if mod.shared_input is None:
                out.append(Unit(mod.kind, i, [mod]))
            elif id(mod.shared_input) not in shared_seen:
                shared_seen.add(id(mod.shared_input))
                out.append(Unit("qkv", i, list(mod.shared_input.members)))
    return out


def macs_of(model: nn.Module, kind: str) -> dict[str, int]:
    """MACs per token of one unit of ``kind`` in ``model``, for each mode it can run in."""
    spec = get_encoder(model).compression
    shape = encoder_shape(model)
    return unit_macs(kind, shape.hidden, shape.ffn_blocks, spec.rank_in, spec.rank_out, spec.strategy.shared_factors)


def plan(model: nn.Module, policy: str = "timed", *, device: torch.device | str | None = None,
         batches: tuple[int, ...] = (1, 32), seq_len: int = 128, reps: int = 10) -> dict:
    """Choose a mode for every unit kind of ``model`` (see the module doc). The model is left as it was."""
    check_plan_options(policy, batches, seq_len, reps)
    device = torch.device(device) if device is not None else next(model.parameters()).device
    first: dict[str, Unit] = {}
    for u in units(model):
        first.setdefault(u.kind, u)
    result = {"policy": policy, "device": device.type, "modes": {}, "macs_speedup": {}}
    if policy == "timed":
        result.update(batches=[int(b) for b in batches], seq_len=int(seq_len), timed_speedup={})
    for kind, unit in first.items():
        counts = macs_of(model, kind)
        result["macs_speedup"][kind] = {mode: round(counts["dense"] / c, 4) for mode, c in counts.items()}
        if policy in UNIT_MODES:
            if policy not in counts:
                raise SpecError(f"execution policy {policy!r}: the {kind} units of this model cannot run "
                                f"{policy} (variant {get_encoder(model).compression.variant!r}); "
                                f"valid: {list(counts)}, timed, macs")
            result["modes"][kind] = policy
        elif policy == "macs":
            result["modes"][kind] = min(counts, key=lambda mode: (counts[mode], mode != "dense"))
        elif policy == "size":
            continue  # all kinds at once, below: factorized units share a bank
        else:
            speedups = {"dense": 1.0} | {mode: round(_time_unit(unit, mode, device, batches, seq_len, reps), 4)
                                         for mode in counts if mode != "dense"}
            result["timed_speedup"][kind] = speedups
            result["modes"][kind] = max(speedups, key=speedups.get)
    if policy == "size":
        result["modes"] = smallest_modes(model, list(first))
    result["stored_params"] = stored_params(model, result["modes"])
    return result


def check_plan_options(policy: str, batches, seq_len: int, reps: int) -> None:
    """Refuse a policy :func:`plan` does not know, or timing shapes below 1 (before any model is
    loaded or timed: :func:`tdlight.model.io.record_plan` checks them first)."""
    if policy not in POLICIES:
        raise SpecError(f"execution policy {policy!r}; valid: {list(POLICIES)}")
    if not batches or any(int(b) < 1 for b in batches) or seq_len < 1 or reps < 1:
        raise SpecError(f"execution timing needs batch sizes, seq_len and reps >= 1; got batches={list(batches)}, "
                        f"seq_len={seq_len}, reps={reps}")


def stored_params(model: nn.Module, modes: dict[str, str]) -> dict[str, int]:
    """Encoder weight parameters ``model`` stores under the plan ``modes`` (unit kind → mode), as an
    exported graph holds them (:func:`tdlight.tensor.accounting.stored_weights`)."""
    return stored_weights(encoder_shape(model), get_encoder(model).compression, modes)


def smallest_modes(model: nn.Module, kinds: list[str]) -> dict[str, str]:
    """The mode per unit kind that stores the fewest parameters; among equals, the fewest MACs.
    Every combination is tried (at most 3⁶): a group's bank is stored once if any unit reads it
    factorized, so the kinds do not choose independently."""
    spec, shape = get_encoder(model).compression, encoder_shape(model)
    options = [list(macs_of(model, kind)) for kind in kinds]

    def cost(modes: dict[str, str]) -> tuple[int, float]:
        return stored_weights(shape, spec, modes)["total"], macs(shape, spec, 128, modes)["per_token"]

    best = min((dict(zip(kinds, combo)) for combo in itertools.product(*options)), key=cost)
    return best


@torch.no_grad()
def _time_unit(unit: Unit, mode: str, device: torch.device, batches, seq_len: int, reps: int) -> float:
    """Dense time / ``mode``'s time of ``unit`` (> 1: ``mode`` is faster), geometric mean over ``batches``."""
    saved = [m.mode for m in unit.members]
    param = unit.members[0].bank.U
    if param.device != device:
        raise SpecError(f"the model is on {param.device}; time its execution plan there (device={param.device.type})")

    def run(mode: str, x: torch.Tensor):
        def go():
            for m in unit.members:
                m.mode = mode
            unit.run(x)
        return go

    logs = []
    try:
        for b in batches:
            x = torch.randn(int(b), seq_len, unit.members[0].in_features, device=device, dtype=param.dtype)
            t = paired_times(run("dense", x), run(mode, x), device=device, reps=reps, warmup=2)
            logs.append(math.log(t["speedup"]))
    finally:
        for m, mode in zip(unit.members, saved):
            m.mode = mode
            m.drop_cache()  # the weights built for timing (rebuilt, if the model's mode needs them, on its next call)
    return math.exp(sum(logs) / len(logs))


def apply(model: nn.Module, chosen: dict) -> dict:
    """Set every unit's mode from a plan (``{"modes": {kind: mode}}``); kinds it does not name stay
    factorized. Records the plan on the encoder (saved with the model). Returns the plan."""
    modes = chosen.get("modes") if isinstance(chosen, dict) else None
    if not isinstance(modes, dict):
        raise SpecError(f"an execution plan is a dict with 'modes' {{kind: mode}}; got {chosen!r}")
    found = units(model)
    kinds = {u.kind for u in found}
    for kind, mode in modes.items():
        if kind not in kinds:
            raise SpecError(f"execution plan names unit kind {kind!r}, which this model does not have; "
                            f"valid: {sorted(kinds)}")
        if mode not in UNIT_MODES:
            raise SpecError(f"execution mode {mode!r} for {kind}; valid: {list(UNIT_MODES)}")
        if mode == "folded" and not found[0].members[0].bank.strategy.shared_factors:  # before any unit changes
            raise SpecError(f"execution mode 'folded' for {kind}: variant {found[0].members[0].bank.variant!r} has "
                            f"no folded form; valid: factorized, dense")
    for u in found:
        for m in u.members:
            m.mode = modes.get(u.kind, "factorized")
            m.drop_cache()  # e.g. built while timing the plan, or for the previous mode: memory no longer needed
    get_encoder(model).execution = dict(chosen)
    return dict(chosen)


def weight_bytes(model: nn.Module) -> int:
    """Bytes the model holds for its weights: parameters, buffers and, compressed, the folded or dense
    units' cached weights (what a plan adds to memory; built on a unit's first forward in that mode)."""
    seen, total = set(), 0
    tensors = [*model.parameters(), *model.buffers()]
    for u in units(model) if is_compressed(model) else []:
        for m in u.members:
            tensors.extend(m.cache_tensors())
    for t in tensors:
        if id(t) not in seen:
            seen.add(id(t))
            total += t.numel() * t.element_size()
    return total


def build_caches(model: nn.Module) -> None:
    """Build every folded or dense unit's weights now (nothing for a dense model). Before tracing
    or compiling: a graph that meets a cache not yet built records its construction from the
    factors, which then runs on every call."""
    for u in units(model) if is_compressed(model) else []:
        u.members[0].build_cache()


def compile_for_inference(model: nn.Module, *, dynamic: bool | None = None) -> nn.Module:
    """``torch.compile`` for inference with the weights frozen into the graph (Inductor's
    ``freezing``): a dense or folded unit's weight is built from the factors once, at compile time,
    and constant-folded. Under compilation the Q/K/V memo steps aside (``SharedInput``) and the
    compiler merges the repeated shared product. Call it under ``torch.no_grad()`` /
    ``torch.inference_mode()``; a factor changed after compiling is not seen (compile again).

    The dense and folded units' weights are built here, before compiling, and the graph reads them as they
    are (Dynamo cannot follow the cache's stamp, and the bank reached through an attribute that is
    not a submodule is not frozen: traced, the reconstruction would run on every call)."""
    build_caches(model)
    return torch.compile(model.eval(), dynamic=dynamic, options={"freezing": True})


def current(model: nn.Module) -> dict | None:
    """The plan last applied to ``model`` (``None``: all factorized, as built)."""
    return getattr(get_encoder(model), "execution", None)
