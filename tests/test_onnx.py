"""ONNX export of compressed models, checked in ONNX Runtime (tdlight.export_onnx, tdlight export-onnx)."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from tdlight.errors import ArtifactError
from tdlight.model import execution as ex
from tdlight.model.io import load_compressed, save_compressed
from tdlight.model.onnx import export_onnx, onnx_export_model
from tdlight.model.surgery import compress
from tdlight.tensor.spec import CompressionSpec

ort = pytest.importorskip("onnxruntime")
onnx = pytest.importorskip("onnx")


def run_onnx(path, feeds: dict[str, torch.Tensor]) -> np.ndarray:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    return session.run(None, {n: feeds[n].numpy() for n in names})[0]


@pytest.fixture
def model_dir(tmp_path, tiny_classifier):
    """A tiny compressed classifier saved at ``tmp_path / "m"``."""
    compress(tiny_classifier, CompressionSpec(variant="tucker", rank=8, bank=6))
    return save_compressed(tiny_classifier, tmp_path / "m")


@pytest.fixture
def earlier_export(tmp_path):
    """An existing output file, which a refused or failed export must leave as it is."""
    out = tmp_path / "keep.onnx"
    out.write_bytes(b"an earlier export")
    return out


@pytest.mark.parametrize("execution", ["factorized", "folded", "dense"])
def test_tiny_classifier_exports_with_dynamic_axes(tmp_path, model_dir, execution):
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
    r = export_onnx(model_dir, tmp_path / "student.onnx")  # the size plan: the file no larger than the weights need
    assert r["execution"] == ex.plan(load_compressed(model_dir, execution="factorized"), "size")["modes"]
    assert r["bytes"] <= (model_dir / "model.safetensors").stat().st_size * 1.05  # (a few hundred KB of graph)
    feeds = dict(tokenizer(["a short one", "a sentence that is quite a lot longer than the first"], padding=True,
                           return_tensors="pt"))
    got = run_onnx(tmp_path / "student.onnx", feeds)
    with torch.no_grad():
        want = load_compressed(model_dir)(**feeds).logits.numpy()
    np.testing.assert_allclose(got, want, atol=1e-4)


def test_bad_export_inputs_leave_nothing_half_written(tmp_path, model_dir, earlier_export):
    out = earlier_export
    with pytest.raises(ArtifactError, match="opset=11; valid: 14 to "):
        export_onnx(model_dir, out, opset=11)
    with pytest.raises(ArtifactError, match="differ from PyTorch's"):
        export_onnx(model_dir, out, atol=-1.0, overwrite=True)  # a check that cannot pass: the old file must stay
    with pytest.raises(ArtifactError, match="differ from PyTorch's"):
        export_onnx(model_dir, out, atol=-1.0, overwrite=True, precision="int8")
    with pytest.raises(ArtifactError, match="does not exist"):
        export_onnx(tmp_path / "missing", out)
    with pytest.raises(ArtifactError, match=r"precision='fp16'; valid: \['fp32', 'int8'\]"):
        export_onnx(model_dir, tmp_path / "new.onnx", precision="fp16")
    assert out.read_bytes() == b"an earlier export"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep.onnx", "m"]  # no temporary left behind


def test_export_cli(tmp_path, model_dir, capsys, monkeypatch):
    from tdlight.cli import export_main
    from tdlight.model.onnx import max_opset
    from tests.conftest import tdlight

    r = tdlight("export-onnx", str(model_dir), str(tmp_path / "o.onnx"))
    assert r.returncode == 0, r.stderr[-2000:]
    assert "wrote" in r.stdout and "ONNX Runtime vs PyTorch" in r.stdout and (tmp_path / "o.onnx").stat().st_size > 0
    (model_dir / "keep.onnx").write_bytes(b"x")
    weights = (model_dir / "model.safetensors").read_bytes()
    for args, message in ([[str(model_dir)], "needs a model directory (compressed or dense) and an output file"],
                          [[str(model_dir), "x.onnx", "precision=fp16"], "precision='fp16'; valid: ['fp32', 'int8']"],
                          [[str(model_dir), "x.onnx", "overwrite=yes"], "overwrite='yes'; valid: true, false"],
                          [[str(model_dir), str(tmp_path / "o.onnx")], "exists; valid: a new path, or overwrite=true"],
                          [[str(model_dir), str(model_dir / "model.safetensors"), "overwrite=true"],
                           "is inside the model directory"],
                          [[str(model_dir), str(model_dir / "keep.onnx"), "overwrite=true"],
                           "is inside the model directory"],
                          [[str(tmp_path / "nowhere"), "x.onnx"], "does not exist"],
                          [[str(model_dir), "x.onnx", "verify=maybe"], "verify='maybe'; valid: true, false"],
                          [[str(model_dir), "x.onnx", "opset=new"], "opset='new'; valid: an integer"],
                          [[str(model_dir), "x.onnx", "execution=fast"], "execution='fast'; valid"],
                          [[str(model_dir), "x.onnx", "opset=99"], f"opset=99; valid: 14 to {max_opset()}"],
                          [[str(model_dir), ""], "output is an empty string; valid: a file path"],
                          [[str(model_dir), str(tmp_path)], "is a directory; valid: a file path"],
                          [[str(model_dir), str(tmp_path / "o.onnx" / "x.onnx")],
                           (f"cannot write output {str(tmp_path / 'o.onnx' / 'x.onnx')!r}: "
                            f"{str(tmp_path / 'o.onnx')!r} is a file, not a directory")],
                          [["", "x.onnx"], "model directory is an empty string; valid"],
                          [[str(model_dir), "x.onnx", "dtype=fp16"], "unknown argument 'dtype=fp16'"]):
        monkeypatch.chdir(tmp_path)
        code = export_main(args)  # the command's own function: the whole entry point ran above
        err = capsys.readouterr().err
        assert code == 2 and err.startswith("tdlight: error: ") and message in err, (args, err[-2000:])
        assert not (tmp_path / "x.onnx").exists()
    assert (model_dir / "keep.onnx").read_bytes() == b"x" and (model_dir / "model.safetensors").read_bytes() == weights
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m", "o.onnx"]  # no temporary left behind


# --- what the user takes home: the file's size, dense teachers, int8, no accidental overwrite ---

def graph_tensor_bytes(path) -> int:
    """Bytes of the tensors an ONNX file holds: initializers and Constant nodes' values."""
    graph = onnx.load(str(path)).graph
    tensors = [*graph.initializer, *(a.t for n in graph.node if n.op_type == "Constant" for a in n.attribute
                                     if a.name == "value")]
    return sum(len(t.raw_data) or 4 * int(np.prod(t.dims)) for t in tensors)


def wide_classifier(vocab: int = 2000):
    """A tiny classifier whose weights outweigh its graph (hidden 64, a 2,000-token vocabulary)."""
    from transformers import BertForSequenceClassification

    from tests.conftest import tiny_config

    torch.manual_seed(0)
    return BertForSequenceClassification(tiny_config(num_labels=3, vocab_size=vocab, hidden_size=64,
                                                     intermediate_size=256)).eval()


def feeds_for(vocab: int, batch: int = 3, length: int = 11, seed: int = 5) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    feeds = {"input_ids": torch.randint(0, vocab, (batch, length), generator=g),
             "attention_mask": torch.ones(batch, length, dtype=torch.long),
             "token_type_ids": torch.zeros(batch, length, dtype=torch.long)}
    feeds["attention_mask"][0, length // 2:] = 0
    return feeds


def test_the_size_plan_stores_the_fewest_parameters(tiny_bert):
    from transformers import BertModel

    from tests.conftest import tiny_config
    from tdlight.model.surgery import encoder_shape
    from tdlight.tensor.accounting import dense_counts, param_counts, stored_weights

    compress(tiny_bert, CompressionSpec(variant="tucker", rank=4, bank=6))
    chosen = ex.plan(tiny_bert, "size")
    assert set(chosen["modes"].values()) == {"factorized"}  # the bank, shared by every unit, is the least
    spec, shape = tiny_bert.encoder.compression, encoder_shape(tiny_bert)
    assert chosen["stored_params"]["total"] == param_counts(shape, spec)["encoder_weights"]
    everywhere = {"dense": dense_counts(shape)["encoder_weights"]}
    for mode in ("folded", "dense"):
        plan = ex.plan(tiny_bert, mode)
        assert plan["stored_params"]["total"] > chosen["stored_params"]["total"]
        if mode == "dense":
            assert plan["stored_params"]["total"] == everywhere["dense"]
    # folded: one rank × D matrix per block and layer, beside the shared U (or V)
    D, a, L = 32, 4, 2
    folded = stored_weights(shape, spec, {k: "folded" for k in chosen["modes"]})
    assert folded["folded"] == L * (3 * D * a + D * a + 4 * D * a + 4 * a * D) and folded["shared"] == 2 * D * a
    # per-block factors at a rank near D outweigh the dense weights: every unit dense, the bank not stored
    torch.manual_seed(0)
    wide = BertModel(tiny_config()).eval()
    compress(wide, CompressionSpec(variant="lowrank", rank=24))  # 2·D·d + d² > D² per block
    costly = ex.plan(wide, "size")
    assert set(costly["modes"].values()) == {"dense"} and costly["stored_params"]["banks"] == 0
    ex.apply(wide, costly)
    assert {m.mode for u in ex.units(wide) for m in u.members} == {"dense"}
    with pytest.raises(Exception, match="valid: .*'size'"):
        ex.plan(wide, "smallest")


def test_an_exported_student_is_no_larger_than_its_weights(tmp_path):
    model = wide_classifier()
    compress(model, CompressionSpec(variant="tucker", rank=16, bank=6))
    model_dir = save_compressed(model, tmp_path / "m")
    weights = (model_dir / "model.safetensors").stat().st_size
    r = export_onnx(model_dir, tmp_path / "size.onnx")  # the default: execution="size"
    assert set(r["execution"].values()) == {"factorized"} and r["bytes"] == (tmp_path / "size.onnx").stat().st_size
    assert graph_tensor_bytes(tmp_path / "size.onnx") <= weights  # the tensors: what safetensors holds, no more
    assert r["bytes"] <= weights + 100_000 * model.config.num_hidden_layers  # + the graph's nodes
    fast = export_onnx(model_dir, tmp_path / "macs.onnx", execution="macs")  # folded: a rank × D matrix per block
    assert set(fast["execution"].values()) == {"folded"}
    assert graph_tensor_bytes(tmp_path / "macs.onnx") > graph_tensor_bytes(tmp_path / "size.onnx") + 50_000


def test_a_dense_directory_exports_and_matches(tmp_path, tiny_bert):
    from tests.conftest import save_tiny_teacher
    from tdlight.model.teacher import load_teacher

    teacher = save_tiny_teacher(tmp_path / "teacher", tmp_path)
    r = export_onnx(teacher, tmp_path / "teacher.onnx")
    assert r["output"] == "logits" and r["execution"] is None and r["max_abs_diff"] <= 1e-4
    tiny_bert.save_pretrained(tmp_path / "base")  # a plain HF base model: its last hidden state
    b = export_onnx(tmp_path / "base", tmp_path / "base.onnx")
    assert b["output"] == "last_hidden_state"
    feeds = feeds_for(99)
    for directory, onnx_file in ((teacher, "teacher.onnx"), (tmp_path / "base", "base.onnx")):
        model, _ = load_teacher(str(directory))
        with torch.no_grad():
            want = model(**feeds)[0].numpy()
        np.testing.assert_allclose(run_onnx(tmp_path / onnx_file, feeds), want, atol=1e-4)


@pytest.mark.parametrize("writer", ["save_pretrained", "save_model"])
def test_a_mean_pooling_classifier_exports_as_it_was_trained(tmp_path, tiny_classifier, writer):
    from tdlight.model import io
    from tdlight.model.pooling import set_pooling

    import copy

    with torch.no_grad():
        cls = copy.deepcopy(tiny_classifier)(**feeds_for(99)).logits.numpy()  # [CLS] + pooler, as built
    set_pooling(tiny_classifier, "mean")
    if writer == "save_pretrained":
        tiny_classifier.save_pretrained(tmp_path / "mean")
    else:
        if not hasattr(io, "save_model"):
            pytest.skip("tdlight.model.io.save_model is not there")
        io.save_model(tiny_classifier, None, tmp_path / "mean")
    export_onnx(tmp_path / "mean", tmp_path / "mean.onnx")
    feeds = feeds_for(99)
    with torch.no_grad():
        want = tiny_classifier(**feeds).logits.numpy()
    got = run_onnx(tmp_path / "mean.onnx", feeds)
    np.testing.assert_allclose(got, want, atol=1e-4)  # the mean of the last hidden states, not a random [CLS] pooler
    assert abs(got - cls).max() > 1e-3


def test_int8_export_is_smaller_and_close(tmp_path):
    model = wide_classifier()
    model.save_pretrained(tmp_path / "teacher")
    compress(model, CompressionSpec(variant="tucker", rank=16, bank=6))
    student = save_compressed(model, tmp_path / "student")
    feeds = feeds_for(2000, batch=4, length=13)
    for directory in (tmp_path / "teacher", student):
        fp32 = export_onnx(directory, tmp_path / f"{directory.name}.onnx")
        r = export_onnx(directory, tmp_path / f"{directory.name}.int8.onnx", precision="int8")
        assert r["precision"] == "int8" and r["bytes"] == r["int8_bytes"] == (tmp_path / f"{directory.name}.int8.onnx"
                                                                             ).stat().st_size
        assert r["fp32_bytes"] == fp32["bytes"] and r["int8_bytes"] < 0.6 * r["fp32_bytes"], r
        assert r["int8_rel_diff"] < 0.1, r
        session_ops = {n.op_type for n in onnx.load(str(tmp_path / f"{directory.name}.int8.onnx")).graph.node}
        assert {"MatMulInteger", "DynamicQuantizeLinear"} <= session_ops
        ref, got = run_onnx(tmp_path / f"{directory.name}.onnx", feeds), run_onnx(
            tmp_path / f"{directory.name}.int8.onnx", feeds)  # other sizes than the check's
        assert abs(got - ref).max() <= 0.1 * abs(ref).max()
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []  # no temporaries left


def test_an_existing_output_is_replaced_only_when_asked(tmp_path, model_dir, earlier_export):
    out = earlier_export
    with pytest.raises(ArtifactError, match="exists; valid: a new path, or overwrite=true"):
        export_onnx(model_dir, out)
    assert out.read_bytes() == b"an earlier export"
    r = export_onnx(model_dir, out, overwrite=True)
    assert out.stat().st_size == r["bytes"] > 1000
    weights = (model_dir / "model.safetensors").read_bytes()
    for inside in (model_dir / "model.safetensors", model_dir / "student.onnx", model_dir):
        with pytest.raises(ArtifactError, match="is inside the model directory"):
            export_onnx(model_dir, inside, overwrite=True)
    assert (model_dir / "model.safetensors").read_bytes() == weights and not (model_dir / "student.onnx").exists()
    (tmp_path / "adir").mkdir()
    with pytest.raises(ArtifactError, match="is a directory"):
        export_onnx(model_dir, tmp_path / "adir", overwrite=True)


def test_export_cli_takes_a_dense_teacher_at_int8(tmp_path, capsys):
    from tdlight.cli import export_main
    from tests.conftest import save_tiny_teacher

    teacher = save_tiny_teacher(tmp_path / "teacher", tmp_path)
    assert export_main([str(teacher), str(tmp_path / "t.onnx"), "precision=int8"]) == 0
    out = capsys.readouterr().out
    size = (tmp_path / "t.onnx").stat().st_size
    assert f"(int8, {size:,} bytes; fp32 graph " in out and "dense model" in out, out
    assert "int8 vs fp32 max |diff|" in out


# --- refused up front, with one line: outputs that cannot be written, opsets, non-finite weights ---

def refuse_to_load(monkeypatch):
    """Make loading the model fail loudly: a check that must come before the (slow) load and export."""
    import tdlight.model.onnx as onnx_module

    def boom(*a, **k):
        raise AssertionError("the model was loaded before the output was checked")
    monkeypatch.setattr(onnx_module, "load_compressed", boom)


def test_an_output_in_a_read_only_directory_is_refused_before_exporting(tmp_path, model_dir, monkeypatch):
    ro = tmp_path / "ro"
    ro.mkdir()
    from tests.conftest import read_only

    with read_only(ro, also="test_an_unwritable_output_is_refused_whoever_runs"):
        refuse_to_load(monkeypatch)
        for out in (ro / "x.onnx", ro / "sub" / "x.onnx"):
            with pytest.raises(ArtifactError, match=f"cannot write output '{out}': Permission denied in '{ro}'"):
                export_onnx(model_dir, out)
        assert list(ro.iterdir()) == []


def test_an_unwritable_output_is_refused_whoever_runs(tmp_path, model_dir, earlier_export, monkeypatch):
    """The output's directory is tried (root writes through chmod, and a read-only mount stops root):
    where the temporary sibling cannot be made, the export is refused before the model is loaded."""
    import errno
    import tempfile

    def read_only_fs(*a, **k):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS))
    monkeypatch.setattr(tempfile, "mkstemp", read_only_fs)
    refuse_to_load(monkeypatch)
    with pytest.raises(ArtifactError, match=f"cannot write output '{tmp_path / 'new.onnx'}': Read-only file system"):
        export_onnx(model_dir, tmp_path / "new.onnx")
    with pytest.raises(ArtifactError, match="cannot write output .*: Read-only file system"):
        export_onnx(model_dir, earlier_export, overwrite=True)
    monkeypatch.undo()
    (tmp_path / "afile").write_text("x")  # a file where a folder of the path should be
    refuse_to_load(monkeypatch)
    for out in (tmp_path / "afile" / "x.onnx", tmp_path / "afile" / "sub" / "x.onnx"):
        with pytest.raises(ArtifactError, match=f"'{tmp_path / 'afile'}' is a file, not a directory"):
            export_onnx(model_dir, out)
    (tmp_path / "adir").mkdir()
    for out, message in ((tmp_path / "adir", "is a directory; valid: a file path"),
                         ("", "output is an empty string; valid: a file path"),
                         (f"{tmp_path}/new.onnx/", "ends with a path separator")):
        with pytest.raises(ArtifactError, match=message):
            export_onnx(model_dir, out)  # (not overwrite: refused all the same)
    assert earlier_export.read_bytes() == b"an earlier export"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adir", "afile", "keep.onnx", "m"]


def test_opsets_outside_the_exporters_range_are_refused(tmp_path, model_dir, tiny_classifier, monkeypatch):
    from torch.onnx import _constants

    import tdlight.model.onnx as onnx_module

    high = onnx_module.max_opset()
    assert high == getattr(_constants, "ONNX_TORCHSCRIPT_EXPORTER_MAX_OPSET", _constants.ONNX_MAX_OPSET)
    for opset in (13, high + 1, 99):
        with pytest.raises(ArtifactError, match=f"opset={opset}; valid: 14 to {high} "):
            export_onnx(model_dir, tmp_path / "x.onnx", opset=opset)
    with pytest.raises(ArtifactError, match=f"opset=99; valid: 14 to {high} "):  # the in-memory entry point too
        onnx_export_model(tiny_classifier, tmp_path / "x.onnx", opset=99)
    assert export_onnx(model_dir, tmp_path / "high.onnx", opset=high)["max_abs_diff"] <= 1e-4  # the top is valid
    monkeypatch.setattr(onnx_module, "max_opset", lambda: None)  # a torch that does not declare it:
    with pytest.raises(ArtifactError, match="opset=99; valid: 14 or later"):  # the exporter's refusal, translated
        export_onnx(model_dir, tmp_path / "x.onnx", opset=99, verify=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["high.onnx", "m"]


def test_non_finite_weights_are_named_before_exporting(tmp_path, tiny_classifier):
    compress(tiny_classifier, CompressionSpec(variant="tucker", rank=8, bank=6))
    with torch.no_grad():
        next(iter(tiny_classifier.bert.encoder.factor_banks.values())).U[0, 0] = float("nan")
        tiny_classifier.classifier.weight[0, 0] = float("inf")
    model_dir = save_compressed(tiny_classifier, tmp_path / "nan")
    with pytest.raises(ArtifactError, match=r"weights hold NaN or inf in 2 tensor\(s\): bert\.encoder\.factor_banks\."
                                            r"[a-z_]+\.U, classifier\.weight; .*nothing was written to"):
        export_onnx(model_dir, tmp_path / "nan.onnx")
    with torch.no_grad():  # finite weights whose products overflow float32: said so, not "differ by nan"
        for p in tiny_classifier.parameters():
            p.nan_to_num_(0.0)
        tiny_classifier.bert.embeddings.LayerNorm.weight.fill_(1e30)
    with pytest.raises(ArtifactError, match="not finite .NaN or inf. although every weight is"):
        onnx_export_model(tiny_classifier, tmp_path / "overflow.onnx")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["nan"]
