"""Execution plans: each unit of a compressed encoder factorized, folded or as its dense weight (tdlight.model.execution)."""

from __future__ import annotations

import json
import os

import pytest
import torch

from tdlight.errors import ArtifactError, SpecError
from tdlight.model import execution as ex
from tdlight.model.io import load_compressed, record_plan, save_compressed
from tdlight.model.surgery import compress, set_mode
from tdlight.tensor.spec import CompressionSpec
from tests.conftest import read_only, tdlight, tiny_config


def compressed(tiny_bert, rank=8, bank=6, variant="tucker"):
    compress(tiny_bert, CompressionSpec(variant=variant, rank=rank, bank=bank if variant == "tucker" else None))
    return tiny_bert


@pytest.mark.parametrize("variant", ["tucker", "shared", "lowrank"])
def test_every_mode_computes_what_the_factorized_one_does_forward_and_backward(tiny_bert, token_ids, variant):
    model = compressed(tiny_bert, variant=variant)
    modes = ("factorized", "folded", "dense") if variant != "lowrank" else ("factorized", "dense")
    outs, grads = {}, {}
    for mode in modes:
        set_mode(model, mode)
        model.zero_grad()
        y = model(**token_ids).last_hidden_state
        y.square().sum().backward()
        outs[mode] = y.detach()
        grads[mode] = torch.cat([p.grad.flatten() for p in model.encoder.factor_banks.parameters()])
    for mode in modes[1:]:
        torch.testing.assert_close(outs[mode], outs["factorized"], atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(grads[mode], grads["factorized"], atol=1e-4, rtol=1e-3)


def test_folding_picks_the_cheaper_side_and_matches_the_accounting():
    from tdlight.tensor.accounting import fold_macs, unit_macs
    from tdlight.tensor.factors import Factors
    from tdlight.tensor.variants import variant_of

    torch.manual_seed(0)
    D, a, b, k, n = 12, 5, 4, 3, 10
    f = Factors("tucker", torch.randn(D, a), torch.randn(D, b), torch.randn(k, a, b), torch.randn(n, k))
    tucker = variant_of("tucker")
    for grid, side in [((1, 3), "right"), ((1, 4), "right"), ((4, 1), "left"), ((1, 1), "left"), ((2, 3), "left")]:
        blocks = torch.randint(0, n, grid)
        fold = tucker.fold(f, blocks)
        assert fold.side == side == fold_macs(*grid, D, a, b)[0]
        x, bias = torch.randn(2, 5, grid[0] * D), torch.randn(grid[1] * D)
        torch.testing.assert_close(tucker.folded_matmul(x, fold, bias),
                                   tucker.matmul(x, f, blocks).flatten(-2) + bias, atol=1e-5, rtol=1e-5)
        # two GEMMs: the folded matrices' MACs per token are what the accounting counts
        gemm_macs = (grid[0] if side == "right" else 1) * fold.first.numel() + \
            (1 if side == "right" else grid[1]) * fold.second.numel()
        assert gemm_macs == fold_macs(*grid, D, a, b)[1]
    # Q/K/V at d = 5D/8: folded is cheaper than dense, factorized is not
    macs = unit_macs("qkv", 384, 4, 240, 240, shared_u=True)
    assert macs["folded"] < macs["dense"] < macs["factorized"]
    assert "folded" not in unit_macs("qkv", 384, 4, 240, 240, shared_u=False)
    with pytest.raises(SpecError, match="variant 'lowrank' has no folded form"):
        variant_of("lowrank").fold(f, torch.zeros(1, 1, dtype=torch.long))


@pytest.mark.parametrize("mode", ["dense", "folded"])
def test_the_cached_weight_follows_the_factors(tiny_bert, token_ids, mode):
    model = compressed(tiny_bert)
    bank = next(iter(model.encoder.factor_banks.values()))
    set_mode(model, mode)
    with torch.no_grad():
        before = model(**token_ids).last_hidden_state
        bank.U.mul_(1.5)  # an optimizer step in place: the cache must see it
        model.encoder.layer[0].attention.output.dense.bias.add_(1.0)
        after = model(**token_ids).last_hidden_state
        set_mode(model, "factorized")
        reference = model(**token_ids).last_hidden_state
    assert not torch.allclose(before, after)
    torch.testing.assert_close(after, reference, atol=1e-5, rtol=1e-4)


def test_switching_modes_does_not_rebuild_the_other_modes_weights(tiny_bert, token_ids):
    """A timed plan alternates modes call by call: each mode's weights are built once, not per call
    (else the timing would count the rebuild)."""
    model = compressed(tiny_bert)
    qkv = model.encoder.layer[0].attention.self.query
    ffn = model.encoder.layer[0].intermediate.dense
    built = {}
    with torch.no_grad():
        for mode in ("dense", "folded", "dense", "folded"):
            set_mode(model, mode)
            model(**token_ids)
            now = (qkv.shared_input.cached(mode)[0], ffn.cached(mode))
            assert built.setdefault(mode, now)[0] is now[0] and built[mode][1] is now[1], mode
    assert set(qkv.shared_input._cache.entries) == set(ffn._cache.entries) == {"dense", "folded"}  # both held
    ex.apply(model, ex.plan(model, "folded"))  # the plan keeps only what it runs on
    assert qkv.cache_tensors() == [] and ffn.cache_tensors() == []


def test_shared_qkv_must_run_in_one_mode(tiny_bert, token_ids):
    model = compressed(tiny_bert)
    model.encoder.layer[0].attention.self.query.mode = "dense"
    with pytest.raises(ValueError, match="one mode"), torch.no_grad():
        model(**token_ids)


def test_units_and_mac_plans_follow_the_accounting(tiny_bert):
    model = compressed(tiny_bert, rank=4)  # D = 32, d = 4: factorized is far cheaper everywhere, folded more so
    kinds = [u.kind for u in ex.units(model)]
    assert kinds == ["qkv", "attn_out", "ffn_in", "ffn_out"] * 2
    cheap = ex.plan(model, "macs")
    assert set(cheap["modes"].values()) == {"folded"}
    assert all(1 < s["factorized"] < s["folded"] for s in cheap["macs_speedup"].values())
    from transformers import BertModel

    wide = BertModel(tiny_config()).eval()
    compress(wide, CompressionSpec(variant="tucker", rank=30, bank=6))  # d close to D = 32
    costly = ex.plan(wide, "macs")
    assert costly["modes"]["attn_out"] == "dense" and costly["macs_speedup"]["attn_out"]["folded"] < 1  # 2·D·a > D²
    assert costly["modes"]["qkv"] == "dense"  # D·a + 3·a·D > 3·D² at a = 30, D = 32
    forced = ex.plan(wide, "dense")
    ex.apply(wide, forced)
    assert {m.mode for u in ex.units(wide) for m in u.members} == {"dense"}
    assert ex.current(wide) == forced


def test_a_timed_plan_chooses_a_mode_per_kind_and_leaves_the_model_as_it_was(tiny_bert):
    model = compressed(tiny_bert)
    chosen = ex.plan(model, "timed", batches=(1, 2), seq_len=8, reps=2)
    assert set(chosen["modes"]) == {"qkv", "attn_out", "ffn_in", "ffn_out"}
    for kind, mode in chosen["modes"].items():  # the fastest, by the recorded timing
        speedups = chosen["timed_speedup"][kind]
        assert set(speedups) == set(ex.UNIT_MODES) and speedups["dense"] == 1.0
        assert speedups[mode] == max(speedups.values())
    assert {m.mode for u in ex.units(model) for m in u.members} == {"factorized"}
    assert chosen["device"] == "cpu" and chosen["batches"] == [1, 2] and chosen["seq_len"] == 8


def test_weight_bytes_count_the_caches(tiny_bert, token_ids):
    model = compressed(tiny_bert)
    base = ex.weight_bytes(model)
    assert base == sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
    ex.apply(model, ex.plan(model, "dense"))
    with torch.no_grad():
        model(**token_ids)  # builds the caches
    D, L = 32, 2  # per layer: Q/K/V stacked + bias, attention output, FFN in and out (4·D wide)
    cached = L * 4 * (3 * D * D + 3 * D + D * D + 2 * 4 * D * D)
    assert ex.weight_bytes(model) == base + cached
    ex.apply(model, ex.plan(model, "folded"))  # drops the dense weights
    assert ex.weight_bytes(model) == base
    with torch.no_grad():
        model(**token_ids)
    a = 8  # per layer: Q/K/V's C′Vᵀ (3D × a) + their biases, attention output's and FFN input's C′Vᵀ,
    cached = L * 4 * (3 * D * a + 3 * D + D * a + 4 * D * a + a * 4 * D)  # FFN output's U C′ (a × 4D)
    assert ex.weight_bytes(model) == base + cached  # U, V reused as they are: not counted twice


@pytest.mark.parametrize("call, message", [
    (lambda m: ex.plan(m, "fastest"),
     "execution policy 'fastest'; valid: ['timed', 'macs', 'size', 'factorized', 'folded', 'dense']"),
    (lambda m: ex.plan(m, "timed", batches=(0,)), "batches=[0]"),
    (lambda m: ex.apply(m, {"modes": {"qkv": "sparse"}}), "execution mode 'sparse' for qkv; valid"),
    (lambda m: ex.apply(m, {"modes": {"query": "dense"}}), "unit kind 'query', which this model does not have"),
    (lambda m: ex.apply(m, ["dense"]), "a dict with 'modes'"),
])
def test_bad_plans_are_clear_errors(tiny_bert, call, message):
    model = compressed(tiny_bert)
    with pytest.raises(SpecError, match=message.replace("[", r"\[").replace("]", r"\]")):
        call(model)
    assert {m.mode for u in ex.units(model) for m in u.members} == {"factorized"}


def test_a_variant_without_shared_factors_is_never_planned_folded(tiny_bert):
    model = compressed(tiny_bert, rank=4, variant="lowrank")
    assert set(ex.plan(model, "macs")["modes"].values()) == {"factorized"}
    assert all("folded" not in s for s in ex.plan(model, "timed", batches=(1,), seq_len=4, reps=1)["timed_speedup"].values())
    with pytest.raises(SpecError, match="cannot run folded .variant 'lowrank'.; valid: .'factorized', 'dense'.,"):
        ex.plan(model, "folded")
    with pytest.raises(SpecError, match="variant 'lowrank' has no folded form; valid: factorized, dense"):
        ex.apply(model, {"modes": {"ffn_in": "folded"}})
    with pytest.raises(SpecError, match="no folded form"):  # refused before any unit changes mode
        ex.apply(model, {"modes": {"attn_out": "dense", "ffn_out": "folded"}})
    assert {m.mode for u in ex.units(model) for m in u.members} == {"factorized"}


def test_a_recorded_plan_is_saved_and_applied_on_load(tmp_path, tiny_bert, token_ids):
    model = compressed(tiny_bert, rank=30)
    path = save_compressed(model, tmp_path / "m")
    weights = (path / "model.safetensors").read_bytes()
    meta0 = json.loads((path / "tdlight.json").read_text())
    assert "execution" not in meta0  # a plan is recorded only where it was measured
    chosen = record_plan(path, policy="timed", batches=(1,), seq_len=8, reps=2)
    meta = json.loads((path / "tdlight.json").read_text())
    assert meta["execution"] == chosen and (path / "model.safetensors").read_bytes() == weights
    assert {k: v for k, v in meta.items() if k != "execution"} == meta0
    loaded = load_compressed(path)  # auto: the saved plan, made for this device type
    assert {u.kind: u.members[0].mode for u in ex.units(loaded)} == chosen["modes"]
    plain = load_compressed(path, execution="factorized")
    assert {m.mode for u in ex.units(plain) for m in u.members} == {"factorized"}
    with torch.no_grad():
        torch.testing.assert_close(loaded(**token_ids).last_hidden_state, plain(**token_ids).last_hidden_state,
                                   atol=1e-5, rtol=1e-4)
    # saving the loaded model keeps the measured plan
    again = save_compressed(loaded, tmp_path / "again")
    assert json.loads((again / "tdlight.json").read_text())["execution"] == chosen
    # a plan made for another device type is not applied: the MAC plan is
    meta["execution"]["device"] = "cuda"
    (path / "tdlight.json").write_text(json.dumps(meta))
    assert ex.current(load_compressed(path))["policy"] == "macs"


def test_bad_execution_inputs_on_load_and_record(tmp_path, tiny_bert):
    path = save_compressed(compressed(tiny_bert), tmp_path / "m")
    with pytest.raises(ArtifactError, match=r"execution='fast'; valid: \['auto', 'timed'"):
        load_compressed(path, execution="fast")
    with pytest.raises(ArtifactError, match="device='gpu0' is not a device"):
        record_plan(path, device="gpu0")
    meta = json.loads((path / "tdlight.json").read_text())
    (path / "tdlight.json").write_text(json.dumps({**meta, "execution": {"modes": "dense"}}))
    with pytest.raises(ArtifactError, match="'execution' must be an object with 'device' and 'modes'"):
        load_compressed(path)


def test_plan_cli_records_and_refuses_bad_input(tmp_path, tiny_bert):
    path = save_compressed(compressed(tiny_bert), tmp_path / "m")
    r = tdlight("plan", str(path), "policy=macs")
    assert r.returncode == 0, r.stderr[-2000:]
    assert "execution plan" in r.stdout and json.loads((path / "tdlight.json").read_text())["execution"]["policy"] == "macs"
    for args, message in ([[str(path), "speed=1"], "unknown argument 'speed=1'; valid: device=, policy="],
                          [[str(path), "batches=a"], "batches, seq_len and reps take integers"],
                          [[str(path), "policy=best"], "execution policy 'best'; valid"],
                          [[str(tmp_path / "none")], "does not exist"],
                          [[], "needs a compressed model directory"]):
        r = tdlight("plan", *args)
        assert r.returncode == 2 and "tdlight: error: " in r.stderr and message in r.stderr, (args, r.stderr[-2000:])


@pytest.mark.parametrize("execution", ["factorized", "folded", "dense"])
def test_compiled_for_inference_computes_what_eager_does(tmp_path, tiny_bert, token_ids, execution):
    torch._dynamo.reset()
    path = save_compressed(compressed(tiny_bert), tmp_path / "m")
    eager = load_compressed(path, execution=execution)
    compiled = load_compressed(path, execution=execution, compile=True)
    with torch.no_grad():
        for batch in (token_ids, {k: v[:2, :9] for k, v in token_ids.items()}):  # a second shape: recompiled
            torch.testing.assert_close(compiled(**batch).last_hidden_state, eager(**batch).last_hidden_state,
                                       atol=1e-5, rtol=1e-4)


def test_the_config_offers_what_the_loader_takes():
    from tdlight.config import Execution, Precision
    from tdlight.model.io import EXECUTIONS
    from tdlight.tensor.precision import PRECISIONS

    assert [e.value for e in Execution] == list(EXECUTIONS)  # stage.execution is passed to load_compressed
    assert [p.value for p in Precision] == list(PRECISIONS)  # stage.precision is passed to save_compressed


# --- tdlight plan: what it cannot do is refused before the model is loaded and timed (minutes on a large one) ---

def refuse_to_time(monkeypatch):
    from tdlight.model import io

    def boom(*a, **k):
        raise AssertionError("the model was loaded and timed before the inputs were checked")
    monkeypatch.setattr(io, "load_compressed", boom)


def test_plan_refuses_bad_inputs_before_timing(tmp_path, tiny_bert, monkeypatch, capsys):
    import errno
    import tempfile

    from tdlight.cli import plan_main

    path = save_compressed(compressed(tiny_bert), tmp_path / "m")
    meta = (path / "tdlight.json").read_bytes()
    (tmp_path / "afile").write_text("x")
    refuse_to_time(monkeypatch)
    for args, message in (
            ([str(tmp_path / "afile")], f"'{tmp_path / 'afile'}' is a file, not a directory; valid: a compressed model"),
            ([""], "model directory is an empty string; valid: a compressed model directory"),
            ([str(path), "seq_len=65"], ("seq_len=65 is longer than the model's position table "
                                         "(64 tokens): it never runs at that length; valid: 1 to 64")),
            ([str(path), "reps=0"], "seq_len and reps >= 1; got batches=[1, 32], seq_len=64, reps=0"),
            ([str(path), "batches=0"], "got batches=[0]"),
            ([str(path), "policy=bogus"], "execution policy 'bogus'; valid: ['timed', 'macs'"),
            ([str(path), "device=bogus"], "device='bogus' is not a device; valid: cpu, cuda, cuda:N")):
        code = plan_main(args)
        err = capsys.readouterr().err
        assert code == 2 and err.startswith("tdlight: error: ") and message in err, (args, err[-2000:])

    def read_only_fs(*a, **k):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS))
    monkeypatch.setattr(tempfile, "mkstemp", read_only_fs)  # root writes through chmod; a read-only mount stops it
    with pytest.raises(ArtifactError, match=f"cannot record the plan in {path / 'tdlight.json'}: Read-only file "
                                            "system in .*; valid: a model directory this user can write to"):
        record_plan(path, batches=(1,), seq_len=8, reps=1)
    monkeypatch.undo()
    assert (path / "tdlight.json").read_bytes() == meta
    assert record_plan(path, policy="macs", seq_len=100_000)["policy"] == "macs"  # seq_len: only timing reads it


def test_plan_in_a_read_only_model_directory_is_one_error_line(tmp_path, tiny_bert, monkeypatch, capsys):
    from tdlight.cli import plan_main

    path = save_compressed(compressed(tiny_bert), tmp_path / "m")
    meta = (path / "tdlight.json").read_bytes()
    with read_only(path, also="test_plan_refuses_bad_inputs_before_timing"):
        refuse_to_time(monkeypatch)
        code = plan_main([str(path), "batches=1", "seq_len=8", "reps=1"])
        err = capsys.readouterr().err
        assert code == 2 and err == (f"tdlight: error: cannot record the plan in {path / 'tdlight.json'}: Permission "
                                     f"denied in '{path}'; valid: a model directory this user can write to (copy it "
                                     "to one first)\n"), err
        assert sorted(p.name for p in path.iterdir()) == sorted(["config.json", "model.safetensors",
                                                                 "modeling_tdlight.py", "tdlight.json"])
    assert (path / "tdlight.json").read_bytes() == meta
