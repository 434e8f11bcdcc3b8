"""Function-preserving decomposition: the whitened output fit (tensor/whiten), Gram collection
(model/calibration) and ``stage=decompose stage.fit=outputs`` end to end."""

from __future__ import annotations

import copy
import json
import warnings

from pathlib import Path

import pytest
import torch

from tdlight.tensor.decompose import Ranks, decompose
from tdlight.tensor.whiten import block_grams, decompose_whitened, prepare_gram, whitened_errors
from tests.conftest import write_corpus
from tests.conftest import cli, runs


def _problem(n=12, A=16, B=12, seed=0):
    """A random stacked tensor with uneven slice norms and random (correlated) input Grams."""
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(n, A, B, generator=g) * (0.1 + 3 * torch.rand(n, 1, 1, generator=g))
    X = torch.randn(n, 64, A, generator=g) @ torch.randn(n, A, A, generator=g)
    H = torch.stack([prepare_gram(x.double().t() @ x.double() / 64) for x in X])
    return W, H


def _rms(errs: torch.Tensor) -> float:
    return errs.square().mean().sqrt().item()


@pytest.mark.parametrize("variant,ranks", [("tucker", Ranks(16, 12, 12)), ("shared", Ranks(16, 12)),
                                           ("lowrank", Ranks(16, 12))])
def test_full_rank_is_exact(variant, ranks):
    W, H = _problem()
    dec = decompose_whitened(W, H, variant, ranks, iters=2)
    assert torch.allclose(dec.factors.reconstruct(), W, atol=1e-5 * W.abs().max().item())
    assert dec.rel_error < 1e-5 and dec.factors.U.dtype == W.dtype


@pytest.mark.parametrize("variant,ranks", [("tucker", Ranks(6, 5, 4)), ("shared", Ranks(6, 5)),
                                           ("lowrank", Ranks(4, 3))])
def test_output_fit_beats_hooi_on_the_whitened_objective(variant, ranks):
    W, H = _problem()
    hooi = decompose(W, variant, ranks)
    fit = decompose_whitened(W, H, variant, ranks, iters=15)
    ours = whitened_errors(W, fit.factors, H)
    assert ours == pytest.approx(fit.slice_errors)
    assert _rms(ours) < _rms(whitened_errors(W, hooi.factors, H)) - 0.02
    if variant != "lowrank":  # every sweep is an exact minimiser: the error never rises
        assert all(b <= a + 1e-9 for a, b in zip(fit.history, fit.history[1:]))
        # started from HOOI's factors it can only improve on them
        started = decompose_whitened(W, H, variant, ranks, iters=3, start=hooi.factors)
        assert _rms(started.slice_errors) <= _rms(whitened_errors(W, hooi.factors, H)) + 1e-9


def test_identity_grams_match_hooi():
    """With H = I the objective is the slice-balanced weight error: the fit reaches HOOI's."""
    W, _ = _problem()
    eye = torch.eye(W.shape[1], dtype=torch.float64).expand(W.shape[0], -1, -1)
    ranks = Ranks(6, 5, 4)
    hooi = decompose(W, "tucker", ranks, balance="slice")
    fit = decompose_whitened(W, eye, "tucker", ranks, iters=30)
    assert _rms(fit.slice_errors) == pytest.approx(_rms(whitened_errors(W, hooi.factors, eye)), abs=5e-3)
    assert fit.rel_error == pytest.approx(_rms(fit.slice_errors))


def test_singular_gram_falls_back_without_nan():
    W, H = _problem()
    with pytest.warns(RuntimeWarning, match="zero or not finite"):
        zero = prepare_gram(torch.zeros(16, 16))
    assert torch.equal(zero, torch.eye(16, dtype=torch.float64))
    with pytest.warns(RuntimeWarning, match="zero or not finite"):
        prepare_gram(torch.full((16, 16), float("nan")))
    x = torch.randn(3, 16, dtype=torch.float64)
    with pytest.warns(RuntimeWarning, match="singular"):  # rank 3, no damping
        h = prepare_gram(x.t() @ x, damp=0.0)
    assert torch.linalg.cholesky_ex(h)[1].item() == 0
    H = H.clone()
    H[0] = zero
    H[1] = prepare_gram(torch.ones(16, 16))  # rank one, damped: usable
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        dec = decompose_whitened(W, H, "tucker", Ranks(6, 5, 4), iters=3)
    assert all(torch.isfinite(t).all() for t in dec.factors.parameters().values())
    assert torch.isfinite(dec.slice_errors).all()


def test_grams_of_a_tiny_bert(tiny_bert):
    """Hooked Grams equal the ones from the captured inputs (real tokens only); FFN-out by chunks."""
    from tdlight.model.calibration import collect_grams
    from tdlight.tensor.layout import Layout

    ids = torch.randint(5, 99, (4, 24), generator=torch.Generator().manual_seed(2))
    mask = torch.ones_like(ids)
    mask[1, 15:] = 0
    token_ids = {"input_ids": ids, "attention_mask": mask}

    grams, tokens = collect_grams(tiny_bert, [token_ids])
    mask = token_ids["attention_mask"].bool()
    assert tokens == int(mask.sum())
    seen = {}
    layer = tiny_bert.encoder.layer[1]
    hooks = [m.register_forward_pre_hook(lambda mod, a, k=k: seen.__setitem__(k, a[0]))
             for k, m in (("q", layer.attention.self.query), ("out", layer.output.dense))]
    with torch.no_grad():
        tiny_bert(**token_ids)
    for h in hooks:
        h.remove()
    for k, t in (("q", "query"), ("out", "ffn_out")):
        x = seen[k][mask].double()
        assert torch.allclose(grams[(1, t)], x.t() @ x / tokens, atol=1e-8)
    assert grams[(1, "key")] is grams[(1, "query")]
    layout = Layout(2, 32, 4)
    H, index = block_grams(layout, "encoder", grams, damp=0.0)
    assert H.shape == (2 * 7, 32, 32) and index.tolist()[:12] == [0, 0, 0, 1, 2, 2, 2, 2, 3, 4, 5, 6]
    x = seen["out"][mask].double()[:, 64:96]
    h = x.t() @ x / tokens
    assert torch.allclose(H[7 + 5], h / h.diagonal().mean(), atol=1e-8)  # layer 1's FFN-out part 2


def _compressed_with_grams(tiny_bert):
    """Compress ``tiny_bert`` in place (HOOI, rank 8, bank 12): (teacher copy, calibration batches,
    held-out batches, the teacher's input Grams on the calibration batches)."""
    from tdlight.model.calibration import collect_grams
    from tdlight.model.surgery import compress
    from tdlight.tensor.spec import CompressionSpec

    g = torch.Generator().manual_seed(3)
    batches = [{"input_ids": torch.randint(5, 99, (8, 16), generator=g)} for _ in range(6)]
    heldout = [{"input_ids": torch.randint(5, 99, (8, 16), generator=g)} for _ in range(2)]
    teacher = copy.deepcopy(tiny_bert)
    grams, _ = collect_grams(teacher, batches)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        compress(tiny_bert, CompressionSpec(rank=8, bank=12))
    return teacher, batches, heldout, grams


def test_fit_outputs_lowers_output_error(tiny_bert):
    from tdlight.model.calibration import fit_outputs, output_errors
    from tdlight.model.surgery import encoder_weights

    teacher, batches, heldout, grams = _compressed_with_grams(tiny_bert)
    before = output_errors(tiny_bert, teacher, heldout)
    fitted = fit_outputs(tiny_bert, encoder_weights(teacher), grams, iters=5)
    after = output_errors(tiny_bert, teacher, heldout)
    assert after["last_hidden"] < before["last_hidden"]
    assert sum(after["layer_errors"]) < sum(before["layer_errors"])
    assert set(fitted.output_errors) == set(fitted.block_errors) and len(fitted.output_errors) == 24
    assert max(fitted.output_errors.values()) < 0.99


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_corpus(tmp_path_factory.mktemp("calib"))


def test_stage_fit_outputs_end_to_end(tmp_path, teacher_dir, corpus):
    import shutil

    path, heldout = corpus
    path = shutil.copy(path, tmp_path / Path(path).name)  # edited in place below
    args = ["stage=decompose", f"teacher.path={teacher_dir}", "compression.rank=8", "compression.bank=12",
            "stage.fit=outputs", f"stage.calibration_files={path}", "stage.calibration_sequences=24",
            "stage.calibration_max_length=16", "stage.fit_iters=4", f"stage.heldout_files={heldout}",
            "stage.batch_size=4", "stage.heldout_batches=2"]
    r = cli(tmp_path, *args)
    assert r.returncode == 0, r.stderr[-3000:]
    (run,) = runs(tmp_path, "decompose")
    rep = json.loads((run / "metrics.json").read_text())
    f = rep["fit"]
    assert f["method"] == "outputs" and f["calibration_sequences"] == 24 and f["heldout_sequences"] == 8
    for side in ("hooi", "outputs"):
        assert len(f[side]["layer_errors"]) == 2 and f[side]["last_hidden"] == f[side]["hidden_errors"][-1]
    assert f["outputs"]["calibration_output_error"] < f["hooi"]["calibration_output_error"]
    assert f["outputs"]["last_hidden"] < f["hooi"]["last_hidden"]
    assert rep["dead_blocks"] == f["outputs"]["dead_blocks"] == []
    refit = f["refit"]  # stage.fit_passes=1, fit_refit=layerwise (defaults): refit on the student's own inputs
    assert refit["passes"] == 1 and refit["mode"] == "layerwise" and refit["bias"] is True
    assert [r["pass"] for r in refit["records"]][:2] == [0, 1]
    assert refit["records"][0]["last_hidden"] == pytest.approx(f["outputs"]["last_hidden"])
    assert refit["last_hidden"] <= f["outputs"]["last_hidden"]
    assert "refit pass 1" in r.stdout
    assert "last hidden state error" in r.stdout and "output fit" in r.stdout
    import tdlight
    from tdlight.model.calibration import output_errors
    from tdlight.model.teacher import load_teacher

    # the saved model is the fitted one
    student = tdlight.load_compressed(run / "model")
    teacher, tok = load_teacher(str(teacher_dir))
    batch = tok(["w1 w2 w3 w4 w5 w6", "w7 w8 w9"], return_tensors="pt", padding=True)
    assert output_errors(student, teacher.base_model, [dict(batch)])["last_hidden"] < 1
    # cached under a key that includes the fit; fit=weights is a different entry
    r = cli(tmp_path, *args)
    assert "(cached)" in r.stdout and json.loads((runs(tmp_path, "decompose")[-1] / "metrics.json").read_text())["fit"] == f
    r = cli(tmp_path, *args[:4])
    assert r.returncode == 0 and "(cached)" not in r.stdout
    assert "fit" not in json.loads((runs(tmp_path, "decompose")[-1] / "metrics.json").read_text())
    # the calibration text edited in place is new input: fitted again, not the stale cache entry
    import gzip

    with gzip.open(path, "at") as f:  # a second gzip member: same name, more text
        f.write("w9 w8 w7 w6 w5 w4 w3 w2 w1\n")
    r = cli(tmp_path, *args)
    assert r.returncode == 0 and "(cached)" not in r.stdout, r.stderr[-2000:]


@pytest.mark.parametrize("extra,msg", [
    (["stage.fit=activations"], "stage.fit='activations'; valid: weights, outputs"),
    (["stage.fit=outputs", "stage.calibration_files=/no/such.txt"], "/no/such.txt"),
    (["stage.fit=outputs", "stage.calibration_sequences=5000"], "stage.calibration_sequences=5000 needs more text"),
    (["stage.fit=outputs", "stage.fit_iters=-1"], "stage.fit_iters=-1; valid: an integer ≥ 0"),
    (["stage.fit=outputs", "stage.fit_passes=-1"], "stage.fit_passes=-1; valid: an integer ≥ 0"),
    (["stage.fit=outputs", "stage.fit_refit=sideways"], "stage.fit_refit='sideways'; valid: layerwise, global, both"),
    (["stage.fit=outputs", "stage.calibration_files=task"], "stage.calibration_files=task calibrates on the task's "
                                                            "training text: add task=<name>"),
    (["stage.teacher_weights=base"], "stage.teacher_weights='base'; valid: pretrained, finetuned"),
    (["stage.teacher_weights=finetuned"], "stage.teacher_weights=finetuned needs the fine-tuned teacher"),
])
def test_stage_fit_bad_input(tmp_path, teacher_dir, corpus, extra, msg):
    path, heldout = corpus
    r = cli(tmp_path, "stage=decompose", f"teacher.path={teacher_dir}", "compression.rank=8", "compression.bank=12",
            f"stage.calibration_files={path}", f"stage.heldout_files={heldout}",
            "stage.calibration_max_length=16", *extra)
    assert r.returncode == 2, r.stderr[-2000:]
    assert msg in r.stderr and "tdlight: error:" in r.stderr
    assert not any((d / "metrics.json").exists() or (d / "model").exists() for d in runs(tmp_path, "decompose"))


def test_corrected_target_and_bias_refit():
    """W' makes the whitened fit in H̃ the student-input fit; the bias refit undoes a pure mean shift."""
    from tdlight.tensor.whiten import corrected_target, refit_bias

    g = torch.Generator().manual_seed(5)
    X = torch.randn(400, 10, generator=g, dtype=torch.float64) @ torch.randn(10, 10, generator=g, dtype=torch.float64)
    Xs = X + 0.3 * torch.randn(400, 10, generator=g, dtype=torch.float64)
    W = torch.randn(6, 10, generator=g, dtype=torch.float64)  # nn.Linear orientation
    H, C = Xs.t() @ Xs / 400, Xs.t() @ X / 400
    assert torch.allclose(corrected_target(W, X.t() @ X / 400, X.t() @ X / 400), W, atol=1e-10)  # X̃ = X: W' = W
    Wp = corrected_target(W, H, C, damp=0.0)
    best = torch.linalg.lstsq(Xs, X @ W.t()).solution.t()  # argmin ‖X̃Ŵᵀ − XWᵀ‖
    assert torch.allclose(Wp, best, atol=1e-8)
    # a student whose inputs are the teacher's shifted by a constant: the refit bias is exact
    b = torch.randn(6, generator=g, dtype=torch.float64)
    shift = torch.randn(10, generator=g, dtype=torch.float64)
    b_hat = refit_bias(b, W, W, X.mean(0), (X + shift).mean(0))
    assert torch.allclose((X + shift) @ W.t() + b_hat, X @ W.t() + b, atol=1e-10)


def test_refit_blocks_is_exact_per_block():
    """With the bank fixed, each refit P row is the exact minimiser of its block's output error."""
    from tdlight.tensor.whiten import refit_blocks

    W, H = _problem()
    fit = decompose_whitened(W, H, "tucker", Ranks(6, 5, 4), iters=3)
    target = W[[2, 7]] + 0.2 * torch.randn(2, *W.shape[1:], generator=torch.Generator().manual_seed(1))
    new = refit_blocks(fit.factors, torch.tensor([2, 7]), target, H[[2, 7]])
    rows = torch.tensor([2, 7])
    err = whitened_errors(target, type(new)(new.variant, new.U, new.V, new.core, new.P[rows]), H[[2, 7]])
    for i in range(2):  # no other P row does better
        for _ in range(5):
            P = new.P[rows].clone()
            P[i] += 0.01 * torch.randn(P.shape[1], dtype=P.dtype)
            e = whitened_errors(target, type(new)(new.variant, new.U, new.V, new.core, P), H[[2, 7]])
            assert e[i] >= err[i] - 1e-6
    keep = [i for i in range(W.shape[0]) if i not in (2, 7)]
    assert torch.equal(new.P[keep], fit.factors.P[keep]) and new.core is fit.factors.core


@pytest.mark.parametrize("mode", ["layerwise", "global"])
def test_refit_on_student_inputs_lowers_last_hidden_error(tiny_bert, mode):
    from tdlight.model.calibration import fit_outputs, output_errors, refit_outputs
    from tdlight.model.surgery import encoder_weights

    teacher, batches, heldout, grams = _compressed_with_grams(tiny_bert)
    fit_outputs(tiny_bert, encoder_weights(teacher), grams, iters=5)
    before = output_errors(tiny_bert, teacher, heldout)["last_hidden"]
    records = refit_outputs(tiny_bert, teacher, batches, heldout, passes=2, iters=3, mode=mode)
    assert records[0]["pass"] == 0 and records[0]["last_hidden"] == pytest.approx(before)
    kept = [r for r in records if r["kept"]]
    after = output_errors(tiny_bert, teacher, heldout)["last_hidden"]
    assert after == pytest.approx(kept[-1]["last_hidden"], rel=1e-5)  # a pass not kept is undone
    if mode == "layerwise":
        assert len(kept) >= 2 and after < before
    else:
        assert after <= before
