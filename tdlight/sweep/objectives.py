"""Sweep objectives: one small strategy object each, found by name (as the compression variants are).

An objective is an :class:`Objective`: its name (what ``sweep.objectives`` and ``sweep.constraints``
write), its natural direction, how the report shows it (``label`` on the plot's axis, ``column`` in
``trials.md``, ``log`` scale, ``format``) and how a trial gets its value, one of two kinds:

* :class:`Priced`: known from the trial's config before training, ``price(pricing)`` (the teacher's
  ``config.json`` and the resolved compression spec, see :class:`Pricing`). Only these can be
  constrained (``sweep.constraints: [ratio >= 10]``): a point that violates a constraint is not trained.
* :class:`Measured`: read from each task's result, ``read(result)`` — the whole summary the trial's
  process left, ``pipeline.json`` (``stage=pipeline``) or ``metrics.json`` (a single stage) — by default
  the first of ``keys`` present (``a.b`` for nested keys), then combined over the sweep's tasks
  (``combine``: the mean).

Every registered objective is recorded on every trial (priced: ``user_attrs[name]``; measured:
``record``, by default ``{task: value}`` under its name), whether the sweep optimises it or not, and
``recorded`` reads it back: the report shows any objective from these alone.

**Adding an objective** is one class (a ``Priced`` or ``Measured`` subclass with its name, direction,
label and value) plus its line in :data:`OBJECTIVES` below — or, from outside the package,
``register(*OBJECTIVES.values(), Mine())`` (tests/test_objectives.py). The registry's order is the
order of the report's columns.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from typing import Any

DIRECTIONS = ("maximize", "minimize")
_MISSING = object()


def fmt(v) -> str:
    """A value as the report's tables show it: ``–`` for none, floats to 4 decimals (or 4 significant digits)."""
    if v is None:
        return "–"
    if isinstance(v, float):
        return f"{v:.4g}" if abs(v) < 1e-3 else f"{v:.4f}".rstrip("0").rstrip(".")
    return str(v)


def lookup(result: dict, keys, default=None) -> Any:
    """The value of the first of ``keys`` present in ``result`` (``"dev.top_share"``:
    ``result["dev"]["top_share"]``), else ``default``."""
    for key in keys:
        node = result
        for part in key.split("."):
            if not isinstance(node, dict) or part not in node:
                break
            node = node[part]
        else:
            return node
    return default


def holds(result: dict, keys) -> bool:
    """Whether ``result`` has one of ``keys`` (its value may be null)."""
    return lookup(result, keys, _MISSING) is not _MISSING


@dataclass(frozen=True)
class Pricing:
    """What a priced objective is computed from: the trial's composed config, the teacher's encoder
    shape (from its ``config.json`` only), the resolved compression spec and its parameter counts
    (:func:`tdlight.tensor.accounting.param_counts`)."""

    cfg: Any  # DictConfig
    shape: Any  # tdlight.tensor.spec.EncoderShape
    spec: Any  # the resolved tdlight.tensor.spec.CompressionSpec
    counts: dict


class Objective:
    name: str = ""
    direction: str = "maximize"  # the natural direction (sweep.objectives[i].direction may override it)
    label: str = ""  # what it is, in words: the plot's axis
    column: str = ""  # its trials.md / console column header ("" : its name)
    priced: bool = False  # known from the config before training (then it can be constrained)
    shown: bool = False  # a column of every sweep's trials.md, optimised or not (else only when optimised)
    log: bool = False  # the plot's axis on a log scale
    teacher: float | None = None  # the teacher's own value where known without measuring (its plot point)

    @property
    def header(self) -> str:
        return self.column or self.name

    def format(self, v) -> str:
        return fmt(v)

    def of_teacher(self, teacher_score: float | None) -> float | None:
        """The teacher's value on this objective (``teacher_score``: its measured GLUE score)."""
        return self.teacher

    def axis_label(self, tasks) -> str:
        return self.label or self.name

    def recorded(self, attrs: dict, tasks) -> float | None:
        """The value a trial recorded (``attrs``: its user attributes), None if it has none."""
        return attrs.get(self.name)

    def combine(self, per_task: dict) -> float | None:
        """One value from the tasks' values: their mean (None: no task produced one)."""
        vs = [v for v in per_task.values() if v is not None]
        return statistics.mean(vs) if vs else None

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r})"


class Priced(Objective):
    priced = True
    result_keys: tuple[str, ...] = ()  # where a finished run's result holds it (a reference point's value)

    def price(self, p: Pricing) -> float:
        raise NotImplementedError

    def read(self, result: dict) -> float | None:
        """Its value in a finished run's result, for a run that is not a trial (a reference point of the
        report: the layer-cut peer, gold-label fine-tuning); a trial's own is priced from its config."""
        return lookup(result, self.result_keys)


class Measured(Objective):
    keys: tuple[str, ...] = ()  # where one task's result holds the value (the first present)
    attr: str = ""  # the trial's user attribute ("": its name)
    needs: str = ""  # what a trial's stage must do to produce it (said when it does not)
    task_columns: bool = False  # trials.md shows its value per task too

    @property
    def key(self) -> str:
        return self.attr or self.name

    def read(self, result: dict) -> float | None:
        """Its value in one task's result (``pipeline.json`` or ``metrics.json``, whole)."""
        return lookup(result, self.keys)

    def record(self, per_task: dict):
        """What the trial records under ``key`` (None: nothing): ``{task: value}``."""
        got = {t: v for t, v in per_task.items() if v is not None}
        return got or None

    def recorded(self, attrs: dict, tasks) -> float | None:
        v = attrs.get(self.key)
        if isinstance(v, dict):  # per task: a value once every task has one
            return statistics.mean(v[t] for t in tasks) if v and all(t in v for t in tasks) else None
        return v

    def per_task(self, attrs: dict) -> dict:
        v = attrs.get(self.key)
        return v if isinstance(v, dict) else {}

    def axis_label(self, tasks) -> str:
        return f"{self.label or self.name} ({', '.join(tasks)})"


# --- the objectives ----------------------------------------------------------------------------
class Ratio(Priced):
    """The encoder compression ratio (the paper's)."""

    name, direction, label, column = "ratio", "maximize", "encoder compression ratio", "ratio"
    shown, log, teacher = True, True, 1.0
    result_keys = ("ratio",)  # (a layer cut's: its size ratio to the teacher)

    def price(self, p: Pricing) -> float:
        return float(p.counts["ratio"])

    def format(self, v) -> str:
        return "–" if v is None else f"{v:.2f}"


class Params(Priced):
    """The compressed encoder's parameters."""

    name, direction, label, column = "params", "minimize", "compressed encoder parameters", "params"
    log = True
    result_keys = ("student_encoder_params", "encoder_params")

    def price(self, p: Pricing) -> float:
        return int(p.counts["encoder"])


class ModelRatio(Ratio):
    """The whole model's ratio (embeddings + encoder: what the user's file sees); a restricted vocabulary
    is priced at the full one, its size being known only once the text is read."""

    name, label, column = "model_ratio", "whole-model compression ratio", "model ratio"
    result_keys = ("model_ratio",)

    def price(self, p: Pricing) -> float:
        return float(p.counts["model_ratio"])


class Bytes(Measured):
    """The shipped student directory's bytes on disk (measured, at stage.evaluate.precision)."""

    name, direction, label, column = "bytes", "minimize", "student bytes on disk", "MB"
    keys = ("student_bytes", "model_bytes")  # pipeline.json | a single stage's metrics.json
    needs, shown, log = "bytes a stage that saves a model", True, True

    def record(self, per_task: dict):
        return self.combine(per_task)  # one number: the mean over tasks

    def format(self, v) -> str:
        return "–" if v is None else f"{v / 1e6:.1f}"


class Score(Measured):
    """The mean dev GLUE score of the sweep's tasks; every trial records it per task (``scores``)."""

    name, direction, label, column = "score", "maximize", "dev GLUE score", "score"
    keys = ("student_score", "score")  # pipeline.json | a single stage's metrics.json
    attr, shown, task_columns = "scores", True, True

    def of_teacher(self, teacher_score: float | None) -> float | None:
        return teacher_score


class Speedup(Measured):
    """The pipeline's measured forward speed-up over the teacher."""

    name, direction, label, column = "speedup", "maximize", "forward speed-up over the teacher", "speed-up"
    keys = ("speedup",)
    needs, teacher = "speedup needs stage=pipeline", 1.0

    def format(self, v) -> str:
        return "–" if v is None else f"{v:.2f}"


SCORE = Score()  # the trial's own result: recorded and checked (a NaN fails the trial) whatever the objectives

_REGISTRY: dict[str, Objective] = {}


def register(*objectives: Objective) -> dict[str, Objective]:
    """Make ``objectives`` the ones sweeps know (in this order); returns them by name (the same dict
    object every time: ``OBJECTIVES``)."""
    for o in objectives:
        if not o.name or not o.name.replace("_", "a").isalpha() or not o.name.islower():
            raise ValueError(f"objective name {o.name!r}: valid: lower-case letters and '_' (it is written in "
                             "sweep.objectives and sweep.constraints)")
        if o.direction not in DIRECTIONS:
            raise ValueError(f"objective {o.name}: direction {o.direction!r}; valid: {', '.join(DIRECTIONS)}")
        if not isinstance(o, (Priced, Measured)):
            raise TypeError(f"objective {o.name}: a Priced or a Measured objective, not {type(o).__name__}")
    _REGISTRY.clear()
    _REGISTRY.update({o.name: o for o in objectives})
    return _REGISTRY


# name -> objective; the order is the report's column order
OBJECTIVES: dict[str, Objective] = register(
    Ratio(),
    Params(),
    ModelRatio(),
    Bytes(),
    SCORE,
    Speedup(),
)

# what a trial records from its tasks' results besides its objectives, {task: value} under the name:
# the teacher's score, the student's largest share of dev predictions in one class (a constant student
# shows here), the majority-class baseline
READINGS = {"teacher": ("teacher_score",), "top_share": ("student_top_share", "dev.top_share"),
            "majority": ("majority_score", "dev.majority_score")}


def priced() -> list[Priced]:
    return [o for o in OBJECTIVES.values() if o.priced]


def measured() -> list[Measured]:
    return [o for o in OBJECTIVES.values() if not o.priced]


def price_all(p: Pricing) -> dict:
    """Every priced objective's value of one config: ``{name: value}``."""
    return {o.name: o.price(p) for o in priced()}


def measured_values(results: dict[str, dict]) -> dict[str, dict]:
    """Every measured objective's value in each task's result: ``{name: {task: value or None}}``."""
    return {o.name: {t: o.read(r) for t, r in results.items()} for o in measured()}


def finite(v) -> bool:
    return v is not None and not (isinstance(v, float) and not math.isfinite(v))
