"""Model directories that plain transformers loads right, or refuses: tdlight's models as HF classes,
and the writer of every file of a model directory (:func:`write_model_files`).

A directory whose weights transformers' own classes would misread gets its own ``model_type``
(``tdlight_<family>``, e.g. ``tdlight_bert``), an ``auto_map`` and a modeling file
(:data:`MODELING_FILE`) beside the weights. That is every compressed model (its encoder is a
factor bank, which ``BertModel`` would replace by random weights) and every classifier that reads
the mean of the last hidden states (``BertForSequenceClassification`` would put a random [CLS]
pooler in front of its head). Then:

* ``AutoModelForSequenceClassification.from_pretrained(dir, trust_remote_code=True)`` (and
  ``AutoModel`` for the encoder) builds the classes below, which are the HF classes with the
  compression and the pooling applied in ``__init__`` from ``config.json``, so transformers'
  own loading fills them (heads, prefixes, devices and dtypes as for any model);
* without ``trust_remote_code`` transformers refuses the unknown ``model_type`` with an error
  that asks for ``trust_remote_code=True``: never random weights;
* with tdlight imported, the model type is registered with the Auto classes, so tdlight's
  own loaders need no flag.

The modeling file imports these classes from the installed tdlight package rather than
carrying a second copy of the factorized forward; transformers' import check names the
package to install when it is missing. A directory that plain transformers reads right
(a dense [CLS]-pooled model) stays a plain HF directory.
"""

from __future__ import annotations

import functools
import json
from dataclasses import asdict
from pathlib import Path

import safetensors.torch
import transformers
from torch import nn

from tdlight.errors import ArtifactError
from tdlight.files import atomic_file, atomic_write_text, file_sha256
from tdlight.model.families import max_tokens
from tdlight.model.linear import FactorizedLinear
from tdlight.model.pairs import pair_encoding_of, saved_pair_encoding, set_pair_encoding
from tdlight.model.pooling import pooling_of, saved_pooling, set_pooling
from tdlight.model.surgery import compress, encoder_shape, get_encoder, is_compressed
from tdlight.tensor.precision import PRECISIONS, decode, encode
from tdlight.tensor.spec import EncoderShape, ResolvedSpec

FORMAT = 1  # of tdlight.json
META = "tdlight.json"
PREFIX = "tdlight_"
CONFIG_KEY = "tdlight_compression"  # {"spec": ResolvedSpec.to_dict(), "shape": EncoderShape fields}
PRECISION_KEY = "tdlight_precision"  # the weights' storage precision, when not fp32
MODELING_FILE = "modeling_tdlight.py"
WEIGHTS = "model.safetensors"
# the Auto classes a directory maps: its encoder and a classifier on it (a new head for an encoder)
HEADS = {"AutoModel": "Model", "AutoModelForSequenceClassification": "ForSequenceClassification"}


def base_model_type(config) -> str:
    """The transformers model type under a (possibly tdlight) config: ``bert`` for ``tdlight_bert``."""
    return config.model_type.removeprefix(PREFIX)


def _hf_class(name: str) -> type:
    cls = getattr(transformers, name, None)
    if not (isinstance(cls, type) and issubclass(cls, (transformers.PreTrainedModel, transformers.PretrainedConfig))):
        raise ArtifactError(f"transformers has no class {name!r}; a tdlight directory names the HF class it wraps")
    return cls


@functools.cache
def config_class(base_name: str) -> type:
    """The tdlight config class over the HF config class ``base_name`` (e.g. ``BertConfig``): the
    same fields, its own ``model_type``; registered with ``AutoConfig``."""
    base = _hf_class(base_name)
    cls = type(f"Tdlight{base_name}", (base,), {
        "model_type": PREFIX + base.model_type, "__module__": __name__,
        "register_for_auto_class": classmethod(lambda cls, auto_class="AutoConfig": None),  # see _TdlightModel
        "__doc__": f"``{base_name}`` of a tdlight model directory (``{CONFIG_KEY}``, ``tdlight_pooling``)."})
    transformers.AutoConfig.register(cls.model_type, cls, exist_ok=True)
    return cls


class _TdlightModel:
    """What a tdlight class adds to its HF class: structure from the config, restored buffers, saving."""

    def __init__(self, config, *args, **kwargs):
        super().__init__(config, *args, **kwargs)
        apply_config(self, config)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path=None, *args, **kwargs):
        path = pretrained_model_name_or_path
        if path is not None and "state_dict" not in kwargs and precision_of(path) != "fp32":
            # stored in fp16/bf16/int8 (tdlight.tensor.precision): decoded to fp32 here, then loaded by
            # transformers as any state dict (heads, prefixes, devices as usual)
            kwargs["config"] = kwargs.get("config") or cls.config_class.from_pretrained(path)
            kwargs["state_dict"] = read_weights(Path(path) / WEIGHTS)
            path = None
        loaded = super().from_pretrained(path, *args, **kwargs)
        model = loaded[0] if isinstance(loaded, tuple) else loaded  # (model, info) with output_loading_info
        # transformers builds the model on the meta device and gives non-persistent buffers uninitialised
        # memory, then re-initialises them through each sub-model's _init_weights (the encoder inside a
        # classifier is a plain BertModel, so an override here would not reach it): the block grids are
        # structure, never in the weights file, and are restored here
        for module in model.modules():
            if isinstance(module, FactorizedLinear):
                module.reset_blocks()
        return loaded

    @classmethod
    def register_for_auto_class(cls, auto_class="AutoModel"):
        # transformers calls this on classes loaded from a modeling file, after which save_pretrained
        # copies the file that defines the class (this module) beside the weights; ours writes its own
        return None

    def save_pretrained(self, save_directory, *args, **kwargs):
        """Write this model as a tdlight directory (:func:`write_model_files`) that both
        transformers and tdlight read back, its weights at ``precision`` (``fp32`` unless given). Files
        are replaced one at a time; other files there (a tokenizer) stay."""
        precision = kwargs.pop("precision", "fp32")
        unsupported = sorted(k for k, v in kwargs.items() if v and k in ("push_to_hub", "max_shard_size"))
        if args or unsupported:
            raise ArtifactError(f"save_pretrained of a tdlight model takes a directory (and precision=) only; "
                                f"got {args or unsupported}")
        path = Path(save_directory)
        path.mkdir(parents=True, exist_ok=True)
        write_model_files(self, path, in_place=True, precision=precision)


@functools.cache
def model_class(base_name: str) -> type:
    """The tdlight model class over the HF model class ``base_name`` (e.g. ``BertForSequenceClassification``),
    registered with the Auto class of its kind so that the tdlight model type loads without a flag."""
    base = _hf_class(base_name)
    cfg = config_class(base.config_class.__name__)
    cls = type(f"Tdlight{base_name}", (_TdlightModel, base), {
        "config_class": cfg, "__module__": __name__, "_tdlight_base": base,
        "__doc__": f"``{base_name}`` whose encoder and pooling are built from a tdlight config."})
    for auto, suffix in HEADS.items():
        if base_name.endswith(suffix):
            getattr(transformers, auto).register(cfg, cls, exist_ok=True)
    return cls


def family(model_or_class) -> str:
    """The HF family prefix of a model (``Bert`` for ``BertForSequenceClassification``)."""
    cls = model_or_class if isinstance(model_or_class, type) else type(model_or_class)
    cls = getattr(cls, "_tdlight_base", cls)
    for suffix in HEADS.values():
        if cls.__name__.endswith(suffix):
            return cls.__name__[: -len(suffix)]
    raise ArtifactError(f"{cls.__name__} is neither an encoder (*Model) nor a sequence classifier "
                        "(*ForSequenceClassification); those are the models tdlight saves")


def register(config_cls: type) -> None:
    """Make a tdlight config class's model type known to the Auto classes (tdlight reads it without a flag)."""
    fam = config_cls.__name__.removeprefix("Tdlight").removesuffix("Config")
    for suffix in HEADS.values():
        model_class(fam + suffix)


def apply_config(model: nn.Module, config) -> None:
    """Build what ``config`` records on a freshly made HF model: the compressed encoder (empty
    factors, to be loaded), the pooling and a bi-encoder's head (:mod:`tdlight.model.pairs`; a bare
    encoder keeps the record for the classifier built on it)."""
    recorded = getattr(config, CONFIG_KEY, None)
    if recorded and not is_compressed(model):
        try:
            shape = EncoderShape(**recorded["shape"])
            spec = ResolvedSpec.from_dict(recorded["spec"], shape)
        except (KeyError, TypeError, ValueError) as e:  # SpecError is a ValueError
            raise ArtifactError(f"config.json's {CONFIG_KEY} is corrupt ({type(e).__name__}: {e})") from e
        compress(model, spec, init_from_weights=False)
    pooling = saved_pooling(config)
    if pooling:
        set_pooling(model, pooling)
    pair = saved_pair_encoding(config)
    if pair and getattr(model, "classifier", None) is not None:
        set_pair_encoding(model, pair["encoding"], pair["scale"])


def needs_tdlight(model: nn.Module, precision: str = "fp32") -> bool:
    """Whether plain transformers would misread this model's directory: compressed, mean pooling, a
    bi-encoder's head, or weights stored at another precision than fp32 (int8 needs its scales)."""
    return (is_compressed(model) or pooling_of(model) == "mean" or pair_encoding_of(model) == "bi"
            or precision != "fp32")


def config_dict(model: nn.Module, precision: str = "fp32") -> dict:
    """``config.json`` for ``model`` as it is now, stored at ``precision``: the tdlight model type,
    ``auto_map``, the compression and the precision when it needs tdlight, else the plain HF config
    of its family."""
    d = model.config.to_dict()
    for key in ("auto_map", CONFIG_KEY, PRECISION_KEY, "transformers_version"):
        d.pop(key, None)
    base = getattr(type(model), "_tdlight_base", type(model))
    d["model_type"] = base_model_type(model.config)
    d["architectures"] = [base.__name__]
    d["transformers_version"] = transformers.__version__
    if pooling_of(model) == "cls":
        d.pop("tdlight_pooling", None)
    if not needs_tdlight(model, precision):
        return d
    if precision != "fp32":
        d[PRECISION_KEY] = precision
    fam = family(model)
    d["model_type"] = PREFIX + d["model_type"]
    cfg = config_class(model.config.__class__.__name__.removeprefix("Tdlight"))
    d["auto_map"] = {"AutoConfig": f"{MODELING_FILE[:-3]}.{cfg.__name__}",
                     **{auto: f"{MODELING_FILE[:-3]}.Tdlight{fam}{suffix}" for auto, suffix in HEADS.items()}}
    if is_compressed(model):
        d[CONFIG_KEY] = {"spec": get_encoder(model).compression.to_dict(), "shape": asdict(encoder_shape(model))}
    return d


def modeling_source(model: nn.Module) -> str:
    """The modeling file written beside the weights of a directory that needs tdlight."""
    fam = family(model)
    cfg = model.config.__class__.__name__.removeprefix("Tdlight")
    names = [f"Tdlight{cfg}", *(f"Tdlight{fam}{s}" for s in HEADS.values())]
    from tdlight import __version__

    return f'''"""Loads this tdlight model directory in transformers (written by tdlight {__version__}):

    from transformers import AutoModel, AutoModelForSequenceClassification, AutoTokenizer
    model = AutoModelForSequenceClassification.from_pretrained(<this directory>, trust_remote_code=True)
    encoder = AutoModel.from_pretrained(<this directory>, trust_remote_code=True)
    tokenizer = AutoTokenizer.from_pretrained(<this directory>, trust_remote_code=True)  # reads config.json too

Its weights are tdlight's (a compressed encoder and/or a classifier on the mean of the last hidden
states), which transformers' own classes would misread. These classes come from the tdlight
package (pip install tdlight): the HF classes with tdlight's encoder and pooling.
"""

from tdlight.model.native import config_class, model_class

{names[0]} = config_class({cfg!r})
{names[1]} = model_class({fam + "Model"!r})
{names[2]} = model_class({fam + "ForSequenceClassification"!r})
'''


# sentence-transformers reads a directory through modules.json: the encoder (through AutoModel, so
# trust_remote_code=True as for transformers) and a pooling module on its last hidden states
ST_FILES = ("modules.json", "sentence_bert_config.json", "1_Pooling/config.json")


def sentence_transformers_files(model: nn.Module) -> dict[str, str]:
    """The sentence-transformers files of a mean-pooling model (``{relative path: text}``): its
    embedding is the masked mean of the encoder's last hidden states, as tdlight's classifier reads
    it. None for a [CLS]-pooling model (its classifier reads the pooler, which an embedding would not)."""
    if pooling_of(model) != "mean":
        return {}
    modules = [{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
               {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}]
    pooling = {"word_embedding_dimension": int(model.config.hidden_size), "pooling_mode_cls_token": False,
               "pooling_mode_mean_tokens": True, "pooling_mode_max_tokens": False,
               "pooling_mode_mean_sqrt_len_tokens": False}
    seq = {"max_seq_length": int(min(max_tokens(model.config) or 512, 512)),
           "do_lower_case": False}
    return {name: json.dumps(d, indent=2) + "\n" for name, d in zip(ST_FILES, (modules, seq, pooling))}


def write_weights(model: nn.Module, path: Path, precision: str = "fp32") -> None:
    """The weights file (safetensors; the bank once, however many linears view it) at ``precision``
    (:mod:`tdlight.tensor.precision`; recorded in the file's metadata too)."""
    if precision == "fp32":
        safetensors.torch.save_model(model, str(path))
        return
    state, seen = {}, set()
    for name, t in model.state_dict().items():  # a tensor shared by several names (tied weights) once
        key = (t.data_ptr(), t.dtype, tuple(t.shape))
        if key not in seen:
            seen.add(key)
            state[name] = t
    safetensors.torch.save_file(encode(state, precision), str(path),
                                metadata={"format": "pt", PRECISION_KEY: precision})


def read_weights(path: Path, device: str = "cpu") -> dict:
    """The fp32 state dict of a weights file written by :func:`write_weights`, at any precision."""
    return decode(safetensors.torch.load_file(str(path), device=device))


def precision_of(path) -> str:
    """The storage precision a local model directory records in ``config.json`` (``fp32`` if none)."""
    f = Path(path) / "config.json"
    if not f.is_file():
        return "fp32"
    try:
        value = json.loads(f.read_text()).get(PRECISION_KEY, "fp32")
    except (OSError, ValueError, AttributeError):
        return "fp32"  # a corrupt config is reported by whatever reads it next
    return value if value in PRECISIONS else "fp32"


def read_config_json(path: Path) -> dict:
    try:
        d = json.loads((path / "config.json").read_text())
    except (OSError, ValueError) as e:
        raise ArtifactError(f"{path}/config.json is missing or corrupt: {e}") from e
    if not isinstance(d, dict):
        raise ArtifactError(f"{path}/config.json is corrupt: expected a JSON object")
    return d


def ensure_registered(path: Path) -> None:
    """Register the tdlight classes a directory's ``config.json`` names, before an Auto class reads it."""
    d = read_config_json(path)
    mt = d.get("model_type", "")
    if isinstance(mt, str) and mt.startswith(PREFIX):
        cfg_name = (d.get("auto_map") or {}).get("AutoConfig", "").rpartition(".")[2].removeprefix("Tdlight")
        if not cfg_name:
            raise ArtifactError(f"{path}/config.json has model_type {mt!r} but no auto_map.AutoConfig: corrupt")
        register(config_class(cfg_name))


def _meta(model: nn.Module, extra: dict | None) -> dict:
    """``tdlight.json`` of a compressed model: the class, encoder shape and spec it is rebuilt from."""
    encoder = get_encoder(model)
    base = getattr(type(model), "_tdlight_base", type(model))
    meta = {
        "format": FORMAT,
        "class": base.__name__,
        "shape": asdict(encoder_shape(model)),
        "spec": encoder.compression.to_dict(),
        "extra": extra or {},
    }
    plan = getattr(encoder, "execution", None)
    if plan and plan.get("policy") == "timed":  # per-unit modes measured on a device (tdlight.model.execution);
        meta["execution"] = plan                # the others are recomputed at load time, or forced by the caller
    return meta


def write_model_files(model: nn.Module, path: Path, *, tokenizer=None, extra: dict | None = None,
                      in_place: bool = False, precision: str = "fp32") -> None:
    """Write the files of ``model``'s directory into the existing directory ``path``, each through a
    temporary sibling: ``config.json`` (:func:`config_dict`), the weights, and
    when plain transformers would misread them the modeling file; for a mean-pooling model the
    sentence-transformers files (``SentenceTransformer(dir, trust_remote_code=True)``); for a compressed model
    ``tdlight.json`` (its spec and the weights' checksum); the tokenizer when given. ``in_place``
    (``save_pretrained`` into a directory that may hold other files): remove tdlight's files that
    no longer apply, keep the rest."""
    if precision not in PRECISIONS:
        raise ArtifactError(f"precision={precision!r}; valid: {list(PRECISIONS)}")
    compressed = is_compressed(model)
    atomic_file(path / WEIGHTS, lambda tmp: write_weights(model, tmp, precision))
    config = config_dict(model, precision)
    atomic_write_text(path / "config.json", json.dumps(config, indent=2, sort_keys=True) + "\n")
    if needs_tdlight(model, precision):
        atomic_write_text(path / MODELING_FILE, modeling_source(model))
    elif in_place:
        (path / MODELING_FILE).unlink(missing_ok=True)
    for name, text in sentence_transformers_files(model).items():
        atomic_write_text(path / name, text)
    if compressed:
        meta = _meta(model, extra)
        meta["precision"] = precision
        meta["weights_sha256"] = file_sha256(path / WEIGHTS)  # verified by load_compressed
        atomic_write_text(path / META, json.dumps(meta, indent=2))
    elif in_place:
        (path / META).unlink(missing_ok=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(path)
