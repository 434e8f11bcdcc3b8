"""ONNX export of compressed models, checked in ONNX Runtime (tdlight.export_onnx, tdlight export-onnx)."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch

from tdlight.errors import ArtifactError
from tdlight.model import execution as ex
from tdlight.model.io import load_compressed, save_compressed
from tdlight.model.onnx import export_onnx
from tdlight.model.surgery import compress
from tdlight.tensor.spec import CompressionSpec

ort = pytest.importorskip("onnxruntime")
onnx = pytest.importorskip("onnx")


def run_onnx(path, feeds: dict[str, torch.Tensor]) -> np.ndarray:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    return session.run(None, {n: feeds[n].numpy() for n in names})[0]


@pytest.mark.parametrize("execution", ["factorized", "folded", "dense"])
def test_tiny_classifier_exports_with_dynamic_axes(tmp_path, tiny_classifier, execution):
    compress(tiny_classifier, CompressionSpec(variant="tucker", rank=8, bank=6))
    model_dir = save_compressed(tiny_classifier, tmp_path / "m")
    r = export_onnx(model_dir, tmp_path / "m.onnx", execution=execution)
    assert r["output"] == "logits" and set(r["execution"].values()) == {execution} and r["max_abs_diff"] <= 1e-4
    # a unit runs on what its mode says: the bank (k × a·b, mixed by P on every run) is in the graph only
    # when factorized; folded / dense weights are stored as built, not rebuilt from the factors on every run
    init = {tuple(t.dims) for t in onnx.load(str(tmp_path / "m.onnx")).graph.initializer}
    assert ((6, 64) in init) == (execution == "factorized"), sorted(init)
    reference = load_compressed(model_dir, execution="factorized")
    for batch, length in ((1, 5), (4, 30)):  # sizes the export never saw
        g = torch.Generator().manual_seed(batch)
        feeds = {"input_ids": torch.randint(0, 99, (batch, length), generator=g),
                 "attention_mask": torch.ones(batch, length, dtype=torch.long),
                 "token_type_ids": torch.zeros(batch, length, dtype=torch.long)}
        feeds["attention_mask"][0, length // 2:] = 0
        got = run_onnx(tmp_path / "m.onnx", feeds)
        with torch.no_grad():
            want = reference(**feeds).logits.numpy()
        np.testing.assert_allclose(got, want, atol=1e-4)


def test_real_minilm_student_exports_and_matches(tmp_path, minilm):
    from tdlight.model.teacher import as_classifier

    model, tokenizer = minilm
    import copy

    student = as_classifier(copy.deepcopy(model), 2).eval()
    compress(student, CompressionSpec(variant="tucker", rank=83, bank=18))  # the paper's 1/48 point on MiniLM
    model_dir = save_compressed(student, tmp_path / "student", tokenizer)
    r = export_onnx(model_dir, tmp_path / "student.onnx")  # auto: the MAC plan on this CPU
    assert r["execution"] == ex.plan(load_compressed(model_dir, execution="factorized"), "macs")["modes"]
    feeds = dict(tokenizer(["a short one", "a sentence that is quite a lot longer than the first"], padding=True,
                           return_tensors="pt"))
    got = run_onnx(tmp_path / "student.onnx", feeds)
    with torch.no_grad():
        want = load_compressed(model_dir)(**feeds).logits.numpy()
    np.testing.assert_allclose(got, want, atol=1e-4)


def test_bad_export_inputs_leave_nothing_half_written(tmp_path, tiny_classifier):
    compress(tiny_classifier, CompressionSpec(variant="tucker", rank=8, bank=6))
    model_dir = save_compressed(tiny_classifier, tmp_path / "m")
    out = tmp_path / "keep.onnx"
    out.write_bytes(b"an earlier export")
    with pytest.raises(ArtifactError, match="opset=11; valid: 14 or later"):
        export_onnx(model_dir, out, opset=11)
    with pytest.raises(ArtifactError, match="differ from PyTorch's"):
        export_onnx(model_dir, out, atol=-1.0)  # a check that cannot pass: the old file must stay
    with pytest.raises(ArtifactError, match="does not exist"):
        export_onnx(tmp_path / "missing", out)
    assert out.read_bytes() == b"an earlier export"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep.onnx", "m"]  # no temporary left behind


def test_export_cli(tmp_path, tiny_classifier):
    compress(tiny_classifier, CompressionSpec(variant="tucker", rank=8, bank=6))
    model_dir = save_compressed(tiny_classifier, tmp_path / "m")
    cmd = [sys.executable, "-m", "tdlight.cli", "export-onnx"]
    r = subprocess.run([*cmd, str(model_dir), str(tmp_path / "o.onnx")], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "wrote" in r.stdout and "ONNX Runtime vs PyTorch" in r.stdout and (tmp_path / "o.onnx").stat().st_size > 0
    for args, message in ([[str(model_dir)], "needs a compressed model directory and an output file"],
                          [[str(model_dir), "x.onnx", "verify=maybe"], "verify='maybe'; valid: true, false"],
                          [[str(model_dir), "x.onnx", "opset=new"], "opset='new'; valid: an integer"],
                          [[str(model_dir), "x.onnx", "execution=fast"], "execution='fast'; valid"],
                          [[str(model_dir), "x.onnx", "dtype=fp16"], "unknown argument 'dtype=fp16'"]):
        r = subprocess.run([*cmd, *args], capture_output=True, text=True, timeout=300, cwd=tmp_path)
        assert r.returncode == 2 and "tdlight: error: " in r.stderr and message in r.stderr, (args, r.stderr[-2000:])
        assert not (tmp_path / "x.onnx").exists()
