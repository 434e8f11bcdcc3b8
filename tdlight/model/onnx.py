"""ONNX export of tdlight models and of dense teachers, checked against PyTorch in ONNX Runtime.

Builds on :mod:`tdlight.model.io` (a compressed directory is loaded through it) and
:mod:`tdlight.model.teacher` (a dense one: a plain HF directory or a fine-tuned teacher, with its
saved pooling); ``onnx`` and ``onnxruntime`` are optional (``pip install 'tdlight[onnx]'``) and
imported only here.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import torch
from torch import nn

from tdlight.errors import ArtifactError
from tdlight.files import atomic_file, write_obstacle
from tdlight.model import execution as ex
from tdlight.model.execution import EXECUTIONS
from tdlight.model.io import META, load_compressed
from tdlight.model.pairs import pair_encoding_of
from tdlight.model.surgery import is_compressed, nonfinite_tensors
from tdlight.model.teacher import EMBEDDED, embedded_path, load_teacher

PRECISIONS = ("fp32", "int8")
# int8 (dynamic quantization) is checked against the fp32 graph on the sample batch: the largest
# difference relative to the fp32 outputs' largest magnitude is reported (``int8_rel_diff``), and only
# a graph that is wildly off — more than this, or not finite — is refused: a rounding error of a few
# percent is what int8 costs and is judged on a task score, not here.
INT8_REFUSE = 0.5
MIN_OPSET = 14  # the attention's ops need it


class _FirstOutput(nn.Module):
    """The model's first output (a classifier's logits, a base model's last hidden state) from
    positional inputs: what the ONNX graph computes."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask, token_type_ids=None):
        kw = {} if token_type_ids is None else {"token_type_ids": token_type_ids}
        return self.model(input_ids=input_ids, attention_mask=attention_mask, **kw)[0]


def export_onnx(model_dir: str | os.PathLike, path: str | os.PathLike, *, execution: str = "size",
                precision: str = "fp32", opset: int = 17, verify: bool = True, atol: float = 1e-4,
                overwrite: bool = False) -> dict:
    """Write the model at ``model_dir`` (with its head) as an ONNX graph at ``path``.

    ``model_dir``: a compressed model directory (with ``tdlight.json``), or a dense one — a plain
    HF directory, a fine-tuned teacher (its saved pooling restored by
    :func:`tdlight.model.teacher.load_teacher`) or an embedded teacher's name (``minilm``).
    Inputs ``input_ids``, ``attention_mask`` (and ``token_type_ids`` when the model has token
    types), int64, with dynamic batch and sequence axes; output ``logits`` (a classifier) or
    ``last_hidden_state`` (an encoder, and a bi-encoder: :mod:`tdlight.model.pairs`, its prediction is
    5 × the cosine of two sentences' mean-pooled states). A compressed model's units run as the execution plan says
    (:func:`load_compressed`'s ``execution``); the default ``size`` stores each unit in the form
    that holds the fewest parameters (:mod:`tdlight.model.execution`: factorized units share the
    bank, folded ones store a rank × D matrix per block and layer, dense ones D²), so the file is
    no larger than the weights need; ``macs``/``timed``/``folded``/``dense`` trade bytes for speed.
    ``execution`` is ignored for a dense model.
    ``precision``: ``fp32``, or ``int8`` — the fp32 graph, checked, then ONNX Runtime's dynamic
    quantization (weights int8 with per-channel scales for the MatMuls, per-tensor for the embedding
    tables; activations quantized on the fly) and checked against the fp32 graph (see
    :data:`INT8_REFUSE`).
    TorchScript-based exporter (``dynamo=False``): the shared Q/K/V input is a Python-side memo
    that tracing records as one computation, where ``torch.export`` would need it rewritten.
    With ``verify`` (needs ``onnxruntime``: ``pip install tdlight[onnx]``) ONNX Runtime's output on
    a sample batch must match PyTorch's within ``atol``, else nothing is written. An existing
    ``path`` is replaced only with ``overwrite``; a ``path`` inside ``model_dir`` never. The options,
    the output path (a file that can be written there) and the weights (all finite) are checked
    before the export. Returns what was exported, the file's bytes and the largest differences seen.
    """
    source = _model_source(model_dir)
    _check_options(execution, precision, opset)
    check_target(path, overwrite, inside=source)
    if (source / META).is_file():
        model = load_compressed(source, execution=execution)
    else:
        model, _ = load_teacher(str(source))
    if pair_encoding_of(model) == "bi":  # its prediction needs two sentences at once: the graph is its encoder,
        model = model.base_model         # whose last hidden states its users mean-pool and compare by cosine
    return onnx_export_model(model, path, precision=precision, opset=opset, verify=verify, atol=atol,
                             overwrite=overwrite)


def _model_source(model_dir: str | os.PathLike) -> Path:
    """The directory to export: an existing directory, or an embedded teacher's."""
    if not str(model_dir).strip():
        raise ArtifactError("model directory is an empty string; valid: a compressed model directory "
                            f"(with {META}), a dense HF model directory, or one of {list(EMBEDDED)}")
    if str(model_dir) in EMBEDDED and not Path(model_dir).exists():
        return Path(embedded_path(str(model_dir)))
    p = Path(os.path.expanduser(str(model_dir)))
    if not p.is_dir():
        raise ArtifactError(f"model directory {str(model_dir)!r} does not exist; valid: a compressed model "
                            f"directory (with {META}), a dense HF model directory, or one of {list(EMBEDDED)}")
    return p


def _check_options(execution: str, precision: str, opset: int) -> None:
    if execution not in EXECUTIONS:
        raise ArtifactError(f"execution={execution!r}; valid: {list(EXECUTIONS)}")
    _check_precision_opset(precision, opset)


def max_opset() -> int | None:
    """The highest opset the TorchScript exporter (``dynamo=False``) supports, as ``torch.onnx``
    declares it (None where this torch does not say: the exporter's own refusal is then translated)."""
    try:
        from torch.onnx import _constants
    except ImportError:
        return None
    high = getattr(_constants, "ONNX_TORCHSCRIPT_EXPORTER_MAX_OPSET", None)
    if high is None:
        high = getattr(_constants, "ONNX_MAX_OPSET", None)
    return high if isinstance(high, int) else None


def _opset_error(opset) -> ArtifactError:
    high = max_opset()
    valid = f"{MIN_OPSET} to {high}" if high is not None else f"{MIN_OPSET} or later"
    return ArtifactError(f"opset={opset}; valid: {valid} (from {MIN_OPSET}: the attention's ops need it; up to "
                         "what torch's TorchScript ONNX exporter supports)")


def _check_precision_opset(precision: str, opset: int) -> None:
    if precision not in PRECISIONS:
        raise ArtifactError(f"precision={precision!r}; valid: {list(PRECISIONS)}")
    high = max_opset()
    if (not isinstance(opset, int) or isinstance(opset, bool) or opset < MIN_OPSET
            or (high is not None and opset > high)):
        raise _opset_error(opset)


def _check_finite(model: nn.Module, path) -> None:
    bad = nonfinite_tensors(model)
    if bad:
        shown = ", ".join(bad[:5]) + (f" and {len(bad) - 5} more" if len(bad) > 5 else "")
        raise ArtifactError(f"the model's weights hold NaN or inf in {len(bad)} tensor(s): {shown}; its outputs "
                            f"would not be finite, so nothing was written to {path}; valid: a model with finite "
                            "weights (a diverged training run writes such a model: retrain, e.g. at a lower "
                            "learning rate, or export an earlier checkpoint)")


def check_target(path: str | os.PathLike, overwrite: bool, inside: Path | None = None) -> None:
    """Refuse an output path that is empty or a directory, that lies inside the model directory
    ``inside`` (its weights or config would be replaced), that exists unless ``overwrite``, or where
    no file can be written (tried: :func:`tdlight.files.write_obstacle`)."""
    if not str(path).strip():
        raise ArtifactError("output is an empty string; valid: a file path such as model.onnx")
    if str(path).endswith(("/", os.sep)):
        raise ArtifactError(f"output {str(path)!r} ends with a path separator (a directory); valid: a file path "
                            "such as model.onnx")
    target = Path(os.path.expanduser(str(path))).resolve()
    if inside is not None and target.is_relative_to(inside.resolve()):
        raise ArtifactError(f"output {str(path)!r} is inside the model directory {str(inside)!r} being exported; "
                            "valid: a path outside it")
    if target.is_dir():
        raise ArtifactError(f"output {str(path)!r} is a directory; valid: a file path such as model.onnx")
    if target.exists() and not overwrite:
        raise ArtifactError(f"output {str(path)!r} exists; valid: a new path, or overwrite=true to replace it")
    why = write_obstacle(target)
    if why is not None:
        raise ArtifactError(f"cannot write output {str(path)!r}: {why}; valid: a path in a directory this user can "
                            "write to")


def onnx_export_model(model: nn.Module, path: str | os.PathLike, *, precision: str = "fp32", opset: int = 17,
                      verify: bool = True, atol: float = 1e-4, overwrite: bool = False) -> dict:
    """:func:`export_onnx` of a model in memory, compressed (units as their plan says) or dense."""
    _check_precision_opset(precision, opset)
    check_target(path, overwrite)
    ort = None
    if verify or precision == "int8":
        try:
            import onnxruntime as ort
        except ImportError as e:
            raise ArtifactError(f"export_onnx(verify={verify}, precision={precision!r}) needs onnxruntime: "
                                "pip install 'tdlight[onnx]' (or verify=False at fp32)") from e
    _check_finite(model, path)
    model.eval()
    names = ["input_ids", "attention_mask"] + (["token_type_ids"] if getattr(model.config, "type_vocab_size", 0)
                                               else [])
    output = "logits" if hasattr(model, "classifier") else "last_hidden_state"
    vocab = int(model.config.vocab_size)
    g = torch.Generator().manual_seed(0)
    sample = [torch.randint(0, vocab, (2, 16), generator=g), torch.ones(2, 16, dtype=torch.long),
              torch.zeros(2, 16, dtype=torch.long)][: len(names)]
    sample[1][1, 11:] = 0  # a padded row
    check = [torch.randint(0, vocab, (3, 9), generator=g), torch.ones(3, 9, dtype=torch.long),
             torch.zeros(3, 9, dtype=torch.long)][: len(names)]  # other sizes than traced: the axes are dynamic
    check[1][0, 5:] = 0
    feeds = {n: t.numpy() for n, t in zip(names, check)}
    ex.build_caches(model)  # folded / dense units' weights as constants, not their construction, in the graph
    wrapped = _FirstOutput(model).eval()
    result = {"path": str(path), "inputs": names, "output": output, "opset": opset, "precision": precision,
              "execution": (ex.current(model) or {}).get("modes") if is_compressed(model) else None}

    def run(file: Path):
        session = ort.InferenceSession(str(file), providers=["CPUExecutionProvider"])
        return session.run(None, feeds)[0]

    def export(file: Path) -> None:
        import warnings

        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation and tracer warnings
            try:
                torch.onnx.export(wrapped, tuple(sample), str(file), dynamo=False, input_names=names,
                                  output_names=[output], opset_version=opset, do_constant_folding=True,
                                  dynamic_axes={**{n: {0: "batch", 1: "sequence"} for n in names},
                                                output: {0: "batch"} if output == "logits"
                                                else {0: "batch", 1: "sequence"}})
            except RuntimeError as e:  # (where max_opset() could not tell beforehand)
                if "Unsupported onnx_opset_version" in str(e):
                    raise _opset_error(opset) from e
                raise
        result["fp32_bytes"] = file.stat().st_size
        if verify:
            with torch.no_grad():
                want = wrapped(*check).numpy()
            if not np.isfinite(want).all():  # finite weights (checked above) whose products overflow
                raise ArtifactError(f"PyTorch's {output} on a sample batch are not finite (NaN or inf) although every "
                                    f"weight is: the model overflows float32; not written to {path}")
            diff = float(abs(run(file) - want).max())
            result["max_abs_diff"] = diff
            if not diff <= atol:
                raise ArtifactError(f"ONNX Runtime's {output} differ from PyTorch's by {diff:.3g} (atol {atol}): "
                                    f"not written to {path}")

    def write(tmp: Path) -> None:
        if precision == "fp32":
            export(tmp)
            return
        fp32 = tmp.with_name(tmp.name + ".fp32")  # a second temporary sibling, removed whatever happens
        try:
            export(fp32)
            quantize_int8(fp32, tmp)
            result["int8_bytes"] = tmp.stat().st_size
            if verify:
                ref, got = run(fp32), run(tmp)
                scale = float(abs(ref).max()) or 1.0
                diff = float(abs(got - ref).max())
                result["int8_max_abs_diff"], result["int8_rel_diff"] = diff, diff / scale
                if not diff / scale <= INT8_REFUSE:  # (NaN fails too)
                    raise ArtifactError(f"the int8 graph's {output} differ from the fp32 graph's by {diff:.3g}, "
                                        f"{diff / scale:.0%} of their largest magnitude (refused above "
                                        f"{INT8_REFUSE:.0%}): not written to {path}")
        finally:
            fp32.unlink(missing_ok=True)

    try:
        atomic_file(path, write)
    except OSError as e:  # (the directory changed since check_target, or the disk is full)
        raise ArtifactError(f"cannot write output {str(path)!r}: {e.strerror or e}") from e
    result["bytes"] = Path(path).stat().st_size
    return result


def quantize_int8(src: Path, dst: Path) -> None:
    """ONNX Runtime's dynamic quantization of the graph ``src`` into ``dst``: int8 weights (QInt8;
    per-channel scales where the operator has them: MatMul), uint8 activations quantized on the fly.
    The exporter writes weights it computed (folded or dense units, constant-folded products) as
    ``Constant`` nodes, which the quantizer skips; they become initializers first."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    model = onnx.load(str(src))
    graph = model.graph
    for node in list(graph.node):
        if node.op_type != "Constant" or len(node.attribute) != 1 or node.attribute[0].name != "value":
            continue
        t = node.attribute[0].t
        if t.data_type != onnx.TensorProto.FLOAT or len(t.dims) < 2:
            continue
        init = onnx.TensorProto()
        init.CopyFrom(t)
        init.name = node.output[0]
        graph.initializer.append(init)
        graph.node.remove(node)
    previous = logging.root.manager.disable
    logging.disable(logging.WARNING)  # its advice to pre-process the graph, printed on every call
    try:
        quantize_dynamic(model, str(dst), per_channel=True, weight_type=QuantType.QInt8)
    finally:
        logging.disable(previous)
