"""Saving and loading model directories, atomically.

A model directory holds ``model.safetensors`` (weights, no pickle), ``config.json`` (the
teacher's HF config; for a model that plain transformers would misread, a tdlight model type,
the compression and an ``auto_map`` to the modeling file written beside it, see
:mod:`tdlight.model.native`), for a compressed model ``tdlight.json`` (the model class, the
encoder shape, the resolved compression spec, the weights' checksum) and the tokenizer files.
It is written into a
temporary sibling and renamed into place, so a crash never leaves half a model where a
good one is expected, and an existing model at the target is replaced only once the new
one is complete.

:mod:`tdlight.model.teacher` builds on this module (a classifier is loaded from a saved
compressed model through it); this module reads nothing of the teacher's.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
import transformers
from torch import nn

from tdlight.errors import ArtifactError, SpecError, TeacherError
from tdlight.files import atomic_directory, atomic_write_text, file_sha256, write_obstacle
from tdlight.model import execution as ex
from tdlight.model import native
from tdlight.model.families import max_tokens
from tdlight.model.surgery import densify, encoder_shape, is_compressed
from tdlight.tensor.precision import PRECISIONS
from tdlight.tensor.spec import EncoderShape, ResolvedSpec

FORMAT, META, WEIGHTS = native.FORMAT, native.META, native.WEIGHTS


def model_class(config) -> type[nn.Module]:
    """The class that ``config.architectures`` names (``AutoModel`` if none): the tdlight class over
    it when ``config`` is a tdlight config (:mod:`tdlight.model.native`), else the transformers class."""
    for arch in getattr(config, "architectures", None) or []:
        cls = getattr(transformers, arch, None)
        if isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel):
            return native.model_class(arch) if config.model_type.startswith(native.PREFIX) else cls
    return transformers.AutoModel


def save_compressed(model: nn.Module, path: str | os.PathLike, tokenizer=None, extra: dict | None = None,
                    precision: str = "fp32") -> Path:
    """Write a compressed model directory at ``path`` (atomically), its weights stored at ``precision``
    (:mod:`tdlight.tensor.precision`)."""
    if not is_compressed(model):
        raise ArtifactError("save_compressed needs a compressed model; for a dense one use save_model")
    return save_model(model, tokenizer, path, extra=extra, precision=precision)


def read_meta(path: str | os.PathLike) -> dict:
    path = Path(path)
    if not path.is_dir():
        if path.exists():
            raise ArtifactError(f"{str(path)!r} is a file, not a directory; valid: a compressed model directory "
                                f"(with {META})")
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
        cls = meta.get("class")
        if not (isinstance(cls, str) and isinstance(getattr(transformers, cls, None), type)
                and issubclass(getattr(transformers, cls), transformers.PreTrainedModel)):
            raise ArtifactError(f"{f} is corrupt: 'class' is {cls!r}; valid: the name of a transformers model "
                                "class, e.g. 'BertForSequenceClassification'")
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


EXECUTIONS = ex.EXECUTIONS  # (re-exported: what load_compressed accepts)


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
    target = _device(device)  # a bad device is named as such, never taken for a corrupt file
    path = Path(path)
    meta = read_meta(path)
    config = read_config(path)
    recorded = getattr(config, native.CONFIG_KEY, None)
    if recorded is None:  # written before config.json carried the compression
        setattr(config, native.CONFIG_KEY, {"spec": meta["spec"], "shape": meta["shape"]})
    elif recorded.get("spec") != meta["spec"]:
        raise ArtifactError(f"{path}: config.json's {native.CONFIG_KEY} and {META}'s spec differ (edited by hand?)")
    shape = EncoderShape(**meta["shape"])
    try:
        model = native.model_class(meta["class"])(config)  # compressed as the config says, factors empty
    except TeacherError as e:
        raise ArtifactError(f"{path}: config.json does not match the saved encoder shape {shape}: {e}") from e
    if encoder_shape(model) != shape:
        raise ArtifactError(f"{path}: config.json does not match the saved encoder shape {shape}")
    weights = path / WEIGHTS
    if not weights.is_file():
        raise ArtifactError(f"{path}: {WEIGHTS} is missing")
    expected = meta.get("weights_sha256")  # absent in directories written before it was recorded
    if expected is not None and file_sha256(weights) != expected:
        raise ArtifactError(f"{weights} is corrupt: its SHA-256 differs from the one recorded in {META} when it "
                            "was saved (the file was changed or damaged since)")
    try:
        state = native.read_weights(weights)  # on the CPU, fp32 whatever the stored precision
        missing, unexpected = model.load_state_dict(state, strict=False)
    except Exception as e:  # safetensors raises its own error types for truncated/corrupt files
        raise ArtifactError(f"{weights} is corrupt or does not match the model: {e}") from e
    missing = [k for k in missing if k not in _tied_keys(model)]
    if missing or unexpected:
        raise ArtifactError(f"{weights} does not match the model: missing {missing[:5]}, unexpected {unexpected[:5]}")
    model.to(target)
    saved = meta.get("execution")
    if execution == "auto" and saved and saved["device"] == target.type:
        try:
            ex.apply(model, saved)
        except SpecError as e:
            raise ArtifactError(f"{path}/{META}: its execution plan does not fit the model: {e}") from e
    else:
        ex.apply(model, ex.plan(model, "macs" if execution == "auto" else execution))
    return ex.compile_for_inference(model) if compile else model.eval()


def _device(device) -> torch.device:
    """``device`` (a string, a ``torch.device`` or None for the CPU), checked to exist here."""
    try:
        dev = torch.device(device if device is not None else "cpu")
    except (RuntimeError, TypeError) as e:
        raise ArtifactError(f"device={device!r} is not a device; valid: cpu, cuda, cuda:N") from e
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ArtifactError(f"device={device!r}, but no CUDA device is available here; valid: cpu")
    if dev.type not in ("cpu", "cuda"):
        raise ArtifactError(f"device={device!r}: tdlight runs on cpu or cuda; valid: cpu, cuda, cuda:N")
    return dev


def record_plan(path: str | os.PathLike, *, device: str = "cpu", policy: str = "timed", batches=(1, 32),
                seq_len: int | None = None, reps: int = 10) -> dict:
    """Choose the execution plan of the compressed model at ``path`` on ``device`` and record it in its
    ``tdlight.json`` (atomically; weights untouched), so that ``load_compressed(path, device)`` applies it.
    Every argument, and that ``tdlight.json`` can be replaced, is checked before the model is loaded
    and timed (which takes minutes on a large model)."""
    if not str(path).strip():
        raise ArtifactError(f"model directory is an empty string; valid: a compressed model directory (with {META})")
    path = Path(path)
    meta = read_meta(path)
    dev = _device(device)
    batches = tuple(batches)
    limit = max_tokens(read_config(path))
    if seq_len is None:  # the default: 128 tokens, or all the model has
        seq_len = min(128, limit) if isinstance(limit, int) else 128
    ex.check_plan_options(policy, batches, seq_len, reps)  # (a SpecError)
    if policy == "timed":  # (the other policies do not use seq_len)
        if isinstance(limit, int) and seq_len > limit:
            raise ArtifactError(f"seq_len={seq_len} is longer than the model's position table "
                                f"({limit} tokens): it never runs at that length; valid: 1 to {limit}")
    target = path / META
    why = write_obstacle(target)
    if why is not None:
        raise ArtifactError(f"cannot record the plan in {target}: {why}; valid: a model directory this user can "
                            "write to (copy it to one first)")
    model = load_compressed(path, device=device, execution="factorized")
    chosen = ex.plan(model, policy, device=dev, batches=batches, seq_len=seq_len, reps=reps)
    meta["execution"] = chosen
    try:
        atomic_write_text(target, json.dumps(meta, indent=2))
    except OSError as e:  # (the directory changed since the check, or the disk is full)
        raise ArtifactError(f"cannot record the plan in {target}: {e.strerror or e}") from e
    return chosen


def read_config(path: str | os.PathLike):
    """The HF config of a model directory tdlight wrote (its tdlight model type registered first)."""
    path = Path(path)
    native.ensure_registered(path)
    try:
        return transformers.AutoConfig.from_pretrained(path)
    except (OSError, ValueError) as e:
        raise ArtifactError(f"{path}/config.json is missing or corrupt: {e}") from e


def _tied_keys(model: nn.Module) -> set[str]:
    tied = getattr(model, "_tied_weights_keys", None) or {}
    return set(tied) if not isinstance(tied, dict) else set(tied.keys())


def load_tokenizer(path: str | os.PathLike):
    """The tokenizer saved in a model directory. A directory with a tdlight model type has its classes
    registered first: transformers reads config.json to pick a tokenizer, and an unregistered tdlight
    type would send it to the modeling file with a trust_remote_code prompt."""
    if (Path(path) / "config.json").is_file():
        native.ensure_registered(Path(path))
    return transformers.AutoTokenizer.from_pretrained(path)


def export_dense(path_in: str | os.PathLike, path_out: str | os.PathLike) -> Path:
    """Densify a saved compressed model: a plain HF checkpoint (a mean-pooling classifier keeps the
    modeling file that makes transformers pool as it was trained, see :mod:`tdlight.model.native`)."""
    model = densify(load_compressed(path_in))
    tok_files = any((Path(path_in) / f).exists() for f in ("tokenizer.json", "vocab.txt", "tokenizer_config.json"))
    return save_model(model, load_tokenizer(path_in) if tok_files else None, path_out)


def save_model(model: nn.Module, tokenizer, path: str | os.PathLike, extra: dict | None = None,
               precision: str = "fp32") -> Path:
    """Save a trained model atomically (:func:`tdlight.model.native.write_model_files`): a directory that transformers
    (``trust_remote_code=True`` where it needs tdlight's classes) and tdlight load alike."""
    if precision not in PRECISIONS:  # before anything is written
        raise ArtifactError(f"precision={precision!r}; valid: {list(PRECISIONS)}")
    model = model.cpu().eval()
    return atomic_directory(path, lambda tmp: native.write_model_files(model, tmp, tokenizer=tokenizer, extra=extra,
                                                                       precision=precision))
