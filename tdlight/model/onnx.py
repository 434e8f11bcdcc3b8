"""ONNX export of tdlight models, checked against PyTorch in ONNX Runtime.

Builds on :mod:`tdlight.model.io` (a saved model is loaded through it); ``onnx`` and
``onnxruntime`` are optional (``pip install 'tdlight[onnx]'``) and imported only here.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from tdlight.errors import ArtifactError
from tdlight.files import atomic_file
from tdlight.model import execution as ex
from tdlight.model.io import load_compressed
from tdlight.model.surgery import is_compressed


class _FirstOutput(nn.Module):
    """The model's first output (a classifier's logits, a base model's last hidden state) from
    positional inputs: what the ONNX graph computes."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask, token_type_ids=None):
        kw = {} if token_type_ids is None else {"token_type_ids": token_type_ids}
        return self.model(input_ids=input_ids, attention_mask=attention_mask, **kw)[0]


def export_onnx(model_dir: str | os.PathLike, path: str | os.PathLike, *, execution: str = "auto", opset: int = 17,
                verify: bool = True, atol: float = 1e-4) -> dict:
    """Write the compressed model at ``model_dir`` (with its head) as an ONNX graph at ``path``.

    Inputs ``input_ids``, ``attention_mask`` (and ``token_type_ids`` when the model has token
    types), int64, with dynamic batch and sequence axes; output ``logits`` (a classifier) or
    ``last_hidden_state``. Each unit runs as the execution plan says (:func:`load_compressed`'s
    ``execution``): dense units are stored as their dense weights, folded ones as their two folded
    matrices, factorized ones as the factors.
    TorchScript-based exporter (``dynamo=False``): the shared Q/K/V input is a Python-side memo
    that tracing records as one computation, where ``torch.export`` would need it rewritten.
    With ``verify`` (needs ``onnxruntime``: ``pip install tdlight[onnx]``) ONNX Runtime's output on
    a sample batch must match PyTorch's within ``atol``, else nothing is written. Returns what was
    exported and the largest difference seen.
    """
    if opset < 14:
        raise ArtifactError(f"opset={opset}; valid: 14 or later (the attention's ops need it)")
    return onnx_export_model(load_compressed(model_dir, execution=execution), path, opset=opset, verify=verify,
                             atol=atol)


def onnx_export_model(model: nn.Module, path: str | os.PathLike, *, opset: int = 17, verify: bool = True,
                      atol: float = 1e-4) -> dict:
    """:func:`export_onnx` of a model in memory, compressed (units as their plan says) or dense."""
    ort = None
    if verify:
        try:
            import onnxruntime as ort
        except ImportError as e:
            raise ArtifactError("export_onnx(verify=True) needs onnxruntime: pip install 'tdlight[onnx]' "
                                "(or verify=False)") from e
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
    ex.build_caches(model)  # folded / dense units' weights as constants, not their construction, in the graph
    wrapped = _FirstOutput(model).eval()
    result = {"path": str(path), "inputs": names, "output": output, "opset": opset,
              "execution": (ex.current(model) or {}).get("modes") if is_compressed(model) else None}

    def write(tmp: Path) -> None:
        import warnings

        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation and tracer warnings
            torch.onnx.export(wrapped, tuple(sample), str(tmp), dynamo=False, input_names=names, output_names=[output],
                              opset_version=opset, do_constant_folding=True,
                              dynamic_axes={**{n: {0: "batch", 1: "sequence"} for n in names},
                                            output: {0: "batch"} if output == "logits" else {0: "batch", 1: "sequence"}})
        if ort is not None:
            session = ort.InferenceSession(str(tmp), providers=["CPUExecutionProvider"])
            got = session.run(None, {n: t.numpy() for n, t in zip(names, check)})[0]
            with torch.no_grad():
                want = wrapped(*check).numpy()
            diff = float(abs(got - want).max())
            result["max_abs_diff"] = diff
            if not diff <= atol:
                raise ArtifactError(f"ONNX Runtime's {output} differ from PyTorch's by {diff:.3g} (atol {atol}): "
                                    f"not written to {path}")

    atomic_file(path, write)
    return result
