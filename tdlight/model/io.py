"""Saving and loading compressed models as a directory, atomically.

A compressed model directory holds ``model.safetensors`` (weights, no pickle),
``config.json`` (the teacher's HF config), ``tdlight.json`` (the model class, the encoder
shape and the resolved compression spec) and the tokenizer files. It is written into a
temporary sibling and renamed into place, so a crash never leaves half a model where a
good one is expected, and an existing model at the target is replaced only once the new
one is complete.

:mod:`tdlight.model.teacher` builds on this module (a classifier is loaded from a saved
compressed model through it); this module reads nothing of the teacher's.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict
from pathlib import Path

import safetensors.torch
import torch
import transformers
from torch import nn

from tdlight.errors import ArtifactError, SpecError
from tdlight.files import atomic_directory, atomic_write_text, file_sha256
from tdlight.model import execution as ex
from tdlight.model.pooling import saved_pooling, set_pooling
from tdlight.model.surgery import compress, densify, encoder_shape, get_encoder, is_compressed
from tdlight.tensor.spec import EncoderShape, ResolvedSpec

FORMAT = 1
META = "tdlight.json"
WEIGHTS = "model.safetensors"


def model_class(config) -> type[nn.Module]:
    """The transformers class named in ``config.architectures`` (``AutoModel`` if none)."""
    for arch in getattr(config, "architectures", None) or []:
        cls = getattr(transformers, arch, None)
        if isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel):
            return cls
    return transformers.AutoModel


def save_compressed(model: nn.Module, path: str | os.PathLike, tokenizer=None, extra: dict | None = None) -> Path:
    """Write a compressed model directory at ``path`` (atomically)."""
    encoder = get_encoder(model)
    spec: ResolvedSpec | None = getattr(encoder, "compression", None)
    if spec is None:
        raise ArtifactError("save_compressed needs a compressed model; for a dense one use save_pretrained")
    meta = {
        "format": FORMAT,
        "class": type(model).__name__,
        "shape": asdict(encoder_shape(model)),
        "spec": spec.to_dict(),
        "extra": extra or {},
    }
    plan = getattr(encoder, "execution", None)
    if plan and plan.get("policy") == "timed":  # per-unit modes measured on a device (tdlight.model.execution);
        meta["execution"] = plan                # the others are recomputed at load time, or forced by the caller

    def write(tmp: Path) -> None:
        model.config.save_pretrained(tmp)
        safetensors.torch.save_model(model, str(tmp / WEIGHTS))
        meta["weights_sha256"] = file_sha256(tmp / WEIGHTS)  # verified by load_compressed
        (tmp / META).write_text(json.dumps(meta, indent=2))
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)

    return atomic_directory(path, write)


def read_meta(path: str | os.PathLike) -> dict:
    path = Path(path)
    if not path.is_dir():
        raise ArtifactError(f"compressed model directory {str(path)!r} does not exist")
    f = path / META
    if not f.is_file():
        raise ArtifactError(f"{str(path)!r} is not a compressed model directory: {META} is missing")
    try:
        meta = json.loads(f.read_text())
        if not isinstance(meta, dict):
            raise ArtifactError(f"{f} is corrupt: expected a JSON object, got {type(meta).__name__}")
        if meta.get("format") != FORMAT:
            raise ArtifactError(f"{f}: unsupported format {meta.get('format')!r}; this tdlight reads format {FORMAT}")
        if not isinstance(meta.get("shape"), dict) or not isinstance(meta.get("spec"), dict):
            raise ArtifactError(f"{f} is corrupt: 'shape' and 'spec' must be JSON objects")
        # every value the loader will build the model from, checked here (a bad rank would otherwise
        # surface as a RuntimeError deep in the surgery)
        ResolvedSpec.from_dict(meta["spec"], EncoderShape(**meta["shape"]))
        plan = meta.get("execution")  # (not `ex`: that name is the execution module here)
        if plan is not None and not (isinstance(plan, dict) and isinstance(plan.get("modes"), dict)
                                     and isinstance(plan.get("device"), str)):
            raise ArtifactError(f"{f} is corrupt: 'execution' must be an object with 'device' and 'modes'")
    except ArtifactError:
        raise
    except (json.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError) as e:  # SpecError is a ValueError
        raise ArtifactError(f"{f} is corrupt ({type(e).__name__}: {e})") from e
    return meta


EXECUTIONS = ("auto", *ex.POLICIES)  # auto: the recorded plan for this device type, else the MAC plan


def load_compressed(path: str | os.PathLike, device: str | None = None, execution: str = "auto",
                    compile: bool = False) -> nn.Module:
    """Load a compressed model directory: a ready model in eval mode, in its original class.

    ``execution`` (:mod:`tdlight.model.execution`): ``auto`` applies the plan saved with the model
    when it was made for this device type, else the MAC accounting's; ``timed`` times every mode of
    each unit kind here; ``macs``; ``factorized`` (as trained: the memory-lean mode), ``folded`` or
    ``dense`` everywhere. ``compile``:
    ``torch.compile`` it for inference (:func:`tdlight.model.execution.compile_for_inference`; the
    first call of each new input shape compiles).
    """
    if execution not in EXECUTIONS:
        raise ArtifactError(f"execution={execution!r}; valid: {list(EXECUTIONS)}")
    path = Path(path)
    meta = read_meta(path)
    try:
        config = transformers.AutoConfig.from_pretrained(path)
    except (OSError, ValueError) as e:
        raise ArtifactError(f"{path}/config.json is missing or corrupt: {e}") from e
    cls = getattr(transformers, meta["class"], None)
    if not (isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel)):
        cls = model_class(config)
    model = cls(config) if cls is not transformers.AutoModel else transformers.AutoModel.from_config(config)
    if saved_pooling(config):  # before the weights: a mean-pooling model has no [CLS] pooler weights
        set_pooling(model, saved_pooling(config))
    shape = EncoderShape(**meta["shape"])
    if encoder_shape(model) != shape:
        raise ArtifactError(f"{path}: config.json does not match the saved encoder shape {shape}")
    compress(model, ResolvedSpec.from_dict(meta["spec"], shape), init_from_weights=False)
    weights = path / WEIGHTS
    if not weights.is_file():
        raise ArtifactError(f"{path}: {WEIGHTS} is missing")
    expected = meta.get("weights_sha256")  # absent in directories written before it was recorded
    if expected is not None and file_sha256(weights) != expected:
        raise ArtifactError(f"{weights} is corrupt: its SHA-256 differs from the one recorded in {META} when it "
                            "was saved (the file was changed or damaged since)")
    try:
        missing, unexpected = safetensors.torch.load_model(model, str(weights), strict=False, device=device or "cpu")
    except Exception as e:  # safetensors raises its own error types for truncated/corrupt files
        raise ArtifactError(f"{weights} is corrupt or does not match the model: {e}") from e
    missing = [k for k in missing if k not in _tied_keys(model)]
    if missing or unexpected:
        raise ArtifactError(f"{weights} does not match the model: missing {missing[:5]}, unexpected {unexpected[:5]}")
    if device:
        model.to(device)
    saved = meta.get("execution")
    target = torch.device(device or "cpu").type
    if execution == "auto" and saved and saved["device"] == target:
        try:
            ex.apply(model, saved)
        except SpecError as e:
            raise ArtifactError(f"{path}/{META}: its execution plan does not fit the model: {e}") from e
    else:
        ex.apply(model, ex.plan(model, "macs" if execution == "auto" else execution))
    return ex.compile_for_inference(model) if compile else model.eval()


def record_plan(path: str | os.PathLike, *, device: str = "cpu", policy: str = "timed", batches=(1, 32),
                seq_len: int = 128, reps: int = 10) -> dict:
    """Choose the execution plan of the compressed model at ``path`` on ``device`` and record it in its
    ``tdlight.json`` (atomically; weights untouched), so that ``load_compressed(path, device)`` applies it."""
    path = Path(path)
    meta = read_meta(path)
    try:
        dev = torch.device(device)
    except RuntimeError as e:
        raise ArtifactError(f"device={device!r} is not a device; valid: cpu, cuda, cuda:N") from e
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ArtifactError(f"device={device!r}, but no CUDA device is available here; valid: cpu")
    model = load_compressed(path, device=device, execution="factorized")
    chosen = ex.plan(model, policy, device=dev, batches=tuple(batches), seq_len=seq_len, reps=reps)
    meta["execution"] = chosen
    atomic_write_text(path / META, json.dumps(meta, indent=2))
    return chosen


def _tied_keys(model: nn.Module) -> set[str]:
    tied = getattr(model, "_tied_weights_keys", None) or {}
    return set(tied) if not isinstance(tied, dict) else set(tied.keys())


def load_tokenizer(path: str | os.PathLike):
    return transformers.AutoTokenizer.from_pretrained(path)


def export_dense(path_in: str | os.PathLike, path_out: str | os.PathLike) -> Path:
    """Densify a saved compressed model into a plain HF checkpoint (``from_pretrained`` loads it)."""
    model = densify(load_compressed(path_in))
    tok_files = any((Path(path_in) / f).exists() for f in ("tokenizer.json", "vocab.txt", "tokenizer_config.json"))
    tokenizer = load_tokenizer(path_in) if tok_files else None

    def write(tmp: Path) -> None:
        model.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)

    return atomic_directory(path_out, write)


def save_model(model: nn.Module, tokenizer, path: str | os.PathLike, extra: dict | None = None) -> Path:
    """Save a trained model atomically: the tdlight format if compressed, else a plain HF directory."""
    model = model.cpu().eval()
    if is_compressed(model):
        return save_compressed(model, path, tokenizer, extra=extra)

    def write(tmp: Path) -> None:
        model.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)

    return atomic_directory(path, write)
