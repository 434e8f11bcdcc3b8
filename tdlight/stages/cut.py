"""``stage=cut``: the teacher cut to fewer of its own layers — the peer at equal size of a compressed student.

Is the shared-factor student better than simply cutting layers? The answer needs the simple
alternative at the same size, trained with the same budget (DESIGN §7, "Peers at equal size"): the
teacher's own layers kept (the first L, or L evenly spaced, DistilBERT-style), dense, then the same
pretrain -> distill -> evaluate as the compressed student. ``stage.layers`` sets L; unset, L is the
depth whose dense encoder is nearest to the encoder parameters of the student that the run's
``compression`` config would give (:func:`tdlight.tensor.accounting.nearest_depth`; the number
``stage=decompose`` reports as the encoder after), so ``experiment=cpu_7`` with ``cut`` in place of
``decompose`` in its steps is the peer of the cpu_7 student without naming a number. L may be 0: the
embeddings, the pooling and the head alone, a bag-of-embeddings baseline. The embeddings stay the
teacher's (``compression.embedding_rank`` / ``vocab`` are not applied: the peer matches the encoder).

Writes into the run directory ``model/`` (a dense model directory, saved as every stage saves one, its
pooling kept: plain transformers loads it, ``trust_remote_code=True`` for a mean-pooling one) and
``metrics.json`` (the kept layers, the target, encoder and whole-model parameters before and after).
"""

from __future__ import annotations

import logging
from pathlib import Path

from omegaconf import DictConfig
from rich.console import Console
from rich.table import Table

from tdlight.config import compression_spec
from tdlight.errors import TdlightError
from tdlight.model.io import save_model
from tdlight.model.pooling import pooling_of
from tdlight.model.surgery import count_parameters, cut_layers, encoder_shape, layer_choice
from tdlight.model.teacher import load_teacher, teacher_shape
from tdlight.stages.registry import settings
from tdlight.stages.runs import check_teacher_weights, teacher_source, write_json
from tdlight.tensor.accounting import nearest_depth, param_counts
from tdlight.tensor.spec import EncoderShape, resolve

log = logging.getLogger("tdlight.cut")


def depth(cfg: DictConfig, shape: EncoderShape, where: str = "stage") -> tuple[int, int | None]:
    """(L, the target encoder parameters L was chosen for — None when ``<where>.layers`` names L) for a
    teacher of ``shape``; an L the teacher does not have is one error naming the value and the valid range."""
    node = cfg.stage
    layers = node.get("layers")
    if layers is not None:
        if not 0 <= layers <= shape.num_layers:
            raise TdlightError(f"{where}.layers={layers}; valid: an integer in [0, {shape.num_layers}] (the teacher "
                               f"has {shape.num_layers} layers), or null for the depth nearest to the compressed "
                               "student's size")
        return layers, None
    target = param_counts(shape, resolve(compression_spec(cfg.compression), shape))["encoder"]
    return nearest_depth(shape, target), target


def planned_depth(cfg: DictConfig, where: str = "stage", wired: tuple[str, ...] = ()) -> int:
    """The depth a cut with these settings gives, from the teacher's ``config.json`` alone (no weights
    loaded): what :func:`check` checks and a pipeline plans with. A fine-tuned teacher a pipeline has
    not made yet (``teacher.run_dir`` in ``wired``) has the sizes of the one it starts from."""
    shape = teacher_shape(cfg.teacher.path if "teacher.run_dir" in wired else teacher_source(cfg))
    return depth(cfg, shape, where)[0]


def check(cfg: DictConfig, where: str = "stage", wired: tuple[str, ...] = ()) -> None:
    """The settings checks that load no model (:mod:`tdlight.stages.registry`): the teacher weights, and
    the depth against the teacher's ``config.json`` (through the compression spec when ``layers`` is
    unset, so an impossible spec is refused here too)."""
    st = settings(cfg)
    check_teacher_weights(cfg, st.teacher_weights, where)
    planned_depth(cfg, where, wired)


def run(cfg: DictConfig, run_dir: Path) -> dict:
    check(cfg)
    st = settings(cfg)
    source = teacher_source(cfg)
    # the classifier of the cut reads what the teacher's reads (mean for the embedded MiniLM, whose pooling
    # is its sentence-transformers config's until a fine-tune saves it): the saved directory keeps it
    model, tokenizer = load_teacher(source, pooling=cfg.teacher.pooling.value)
    shape = encoder_shape(model)
    layers, target = depth(cfg, shape)
    kept = layer_choice(shape.num_layers, layers, st.select.value)
    before = count_parameters(model)
    cut_layers(model, kept)
    after = count_parameters(model)
    if target is None:
        chosen = f"{st.select.value} {layers} of {shape.num_layers} (stage.layers)"
    else:
        chosen = (f"{st.select.value} {layers} of {shape.num_layers}, nearest to the {target:,} encoder parameters "
                  f"of compression {cfg.compression.get('name') or ''}".rstrip())
    log.info("teacher %s: %d layers; cut to %s: layers %s (0-based), %s encoder parameters", source,
             shape.num_layers, chosen, kept, f"{after['encoder']:,}")
    save_model(model, tokenizer, run_dir / "model", extra={"teacher": source})
    result = {
        "stage": "cut",
        "teacher": source,
        "teacher_layers": shape.num_layers,
        "layers": layers,
        "kept": kept,  # 0-based indices of the teacher's encoder.layer
        "select": st.select.value,
        # what L was chosen for: the encoder parameters of compression's student (None: stage.layers named it)
        "target_encoder_params": target,
        "compression": cfg.compression.get("name") if target is not None else None,
        "parameters_before": before,
        "parameters_after": after,
        "teacher_encoder_params": before["encoder"],
        "encoder_params": after["encoder"],
        # dense teacher encoder / the cut's (the paper's ratio, as for a compressed student); no layer: none
        "ratio": before["encoder"] / after["encoder"] if after["encoder"] else None,
        "model_params": after["encoder"] + after["embeddings"] + after["other"],
        "pooling": pooling_of(model),
    }
    write_json(run_dir / "metrics.json", result)
    Console().print(_table(result))
    return result


def _table(r: dict) -> Table:
    t = Table(title=f"tdlight cut: {r['teacher']} — {r['layers']} of {r['teacher_layers']} layers ({r['select']}: "
                    f"{r['kept']})")
    t.add_column("")
    t.add_column("teacher", justify="right")
    t.add_column("cut", justify="right")
    b, a = r["parameters_before"], r["parameters_after"]
    for key in ("encoder_weights", "encoder_biases", "encoder_layernorms", "encoder", "embeddings", "other"):
        t.add_row(key.replace("_", " "), f"{b[key]:,}", f"{a[key]:,}")
    if r["target_encoder_params"] is not None:
        t.add_row(f"target: the encoder of compression {r['compression'] or ''}".rstrip(), "",
                  f"{r['target_encoder_params']:,}")
    t.add_row("[bold]encoder ratio (a layer cut, not compressed)", "",
              "[bold]" + ("no encoder layer" if r["ratio"] is None else f"{r['ratio']:.2f}×"))
    return t
