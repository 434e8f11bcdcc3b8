"""A sweep definition (``sweeps/*.yaml``): settings, base overrides, search space, objectives.

The search space is written in Hydra's sweep override syntax and parsed with Hydra's own
override parser, then mapped onto Optuna distributions:

    choice(a, b, ...)            -> CategoricalDistribution
    range(start, stop[, step])   -> IntDistribution / FloatDistribution with that step
    interval(lo, hi)             -> FloatDistribution;  int(interval(lo, hi)) -> IntDistribution
    tag(log, interval(lo, hi))   -> the same on a log scale

Everything here is checked when the sweep starts, before any trial runs.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import optuna
from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from tdlight.errors import TdlightError
from tdlight.config import refuse_renamed
from tdlight.sweep.objectives import DIRECTIONS, OBJECTIVES, Objective, priced

SAMPLERS = ("tpe", "nsga2", "random")
_CONSTRAINT = re.compile(r"^\s*([a-z_]+)\s*(>=|<=|>|<)\s*([-+0-9.eE]+)\s*$")


class SweepError(TdlightError):
    """A sweep definition that cannot run."""


@dataclass
class SamplerConfig:
    name: str = "tpe"  # tpe (multi-objective TPE) | nsga2 | random
    seed: int = 0  # combined with the trials already in the study and the process: see runner.process_seed
    n_startup_trials: Optional[int] = None  # tpe: random trials before TPE models kick in (Optuna's default 10)
    population_size: Optional[int] = None  # nsga2 (Optuna's default 50)


@dataclass
class ObjectiveConfig:
    name: str = "score"  # a name in tdlight.sweep.objectives.OBJECTIVES
    direction: Optional[str] = None  # maximize | minimize; null: the objective's natural direction


@dataclass
class SweepSettings:
    name: str = "sweep"
    n_trials: int = 10  # trials that count: finished or failed (not interrupted, not infeasible)
    workers: int = 1  # trials at once on this machine; each pinned to its own GPU when there are GPUs
    storage: Optional[str] = None  # null: <dir>/study.journal; or any Optuna URL (sqlite:///..., postgresql://...)
    dir: Optional[str] = None  # null: ${paths.output_dir}/sweeps/<name> (outputs/sweeps/<name>)
    gpus: Optional[list] = None  # null: all visible GPUs (none on a CPU machine)
    threads: Optional[int] = None  # CPU threads per trial; null: the machine's cores / workers
    sampler: SamplerConfig = field(default_factory=SamplerConfig)
    objectives: list[ObjectiveConfig] = field(
        default_factory=lambda: [ObjectiveConfig("score"), ObjectiveConfig("ratio")])
    constraints: list[str] = field(default_factory=list)  # e.g. "ratio >= 10": violating trials are not trained
    enqueue: list[Any] = field(default_factory=list)  # {key: value} points tried first (e.g. the paper's ranks)
    trial_timeout: Optional[float] = None  # seconds; a trial running longer is stopped and recorded as failed
    max_infeasible: int = 200  # give up after this many samples in a row are not trained (infeasible or duplicate)
    allow_duplicates: bool = False  # run a sampled point again although a finished trial already has it
    # RDB storages (several sweep processes or hosts on one study): a running trial records a heartbeat
    # every heartbeat_interval seconds; one silent for grace_period seconds belonged to a dead process
    # or host, and is failed and re-queued by the next sweep process that looks
    heartbeat_interval: int = 30
    grace_period: int = 120


@dataclass
class SweepFile:
    sweep: SweepSettings = field(default_factory=SweepSettings)
    tasks: list[str] = field(default_factory=lambda: ["rte"])
    base: list[str] = field(default_factory=list)  # fixed tdlight overrides of every trial
    space: dict[str, Any] = field(default_factory=dict)  # config key -> Hydra sweep expression


@dataclass(frozen=True)
class Constraint:
    key: str
    op: str
    value: float

    def ok(self, x: float) -> bool:
        return {">=": x >= self.value, "<=": x <= self.value, ">": x > self.value, "<": x < self.value}[self.op]

    def __str__(self) -> str:
        return f"{self.key} {self.op} {self.value:g}"


@dataclass
class Sweep:
    """A loaded, checked sweep definition."""

    cfg: Any  # the merged SweepFile (OmegaConf)
    space: dict[str, optuna.distributions.BaseDistribution]
    directions: list[str]
    constraints: list[Constraint]
    source: Path | None = None

    @property
    def settings(self):
        return self.cfg.sweep

    @property
    def objectives(self) -> list[str]:
        return [o.name for o in self.cfg.sweep.objectives]

    @property
    def strategies(self) -> list[Objective]:
        """The objectives as objects (``tdlight.sweep.objectives``), in the sweep's order."""
        return [OBJECTIVES[n] for n in self.objectives]

    def directory(self) -> Path:
        s = self.cfg.sweep
        return Path(s.dir) if s.dir else Path("outputs") / "sweeps" / s.name


def _flatten(node: Any, prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": "choice(1,2)"}}`` and ``{"a.b": ...}`` both -> ``{"a.b": ...}``."""
    out: dict[str, Any] = {}
    for k, v in node.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def distribution(key: str, expr: Any) -> optuna.distributions.BaseDistribution:
    """One search-space entry (a Hydra sweep expression) as an Optuna distribution."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.core.override_parser.types import ChoiceSweep, IntervalSweep, RangeSweep, Transformer
    from hydra.errors import HydraException

    D = optuna.distributions
    text = f"{key}={expr}"
    try:
        o = OverridesParser.create().parse_overrides([text])[0]
    except HydraException as e:
        raise SweepError(f"search space {key}: cannot parse {expr!r}: {e}. Valid: choice(a,b,...), range(lo,hi,step), "
                         "interval(lo,hi), int(interval(lo,hi)), tag(log,interval(lo,hi))") from e
    if not o.is_sweep_override():
        raise SweepError(f"search space {key}: {expr!r} is a single value, not a range; put fixed values in base: "
                         f"[{key}={expr}], or write choice(...), range(...) or interval(...)")
    v = o.value()
    if isinstance(v, ChoiceSweep):
        choices = list(o.sweep_iterator(transformer=Transformer.encode))
        if not choices:
            raise SweepError(f"search space {key}: choice() is empty")
        raw = v.list
        native = all(isinstance(c, (int, float, str, bool)) or c is None for c in raw)
        return D.CategoricalDistribution(raw if native else choices)
    if isinstance(v, RangeSweep):
        if not isinstance(v.step, (int, float)) or v.step <= 0:  # Python's range() would raise on a zero step
            raise SweepError(f"search space {key}: {expr!r} has step {v.step}; valid: range(start, stop[, step]) "
                             "with a step > 0 (stop excluded)")
        values = list(o.sweep_iterator())
        if not values:
            raise SweepError(f"search space {key}: {expr!r} is an empty range")
        if all(isinstance(x, int) for x in values) and isinstance(v.step, int):
            return D.IntDistribution(values[0], values[-1], step=v.step)
        return D.FloatDistribution(float(values[0]), float(values[-1]), step=float(v.step))
    if isinstance(v, IntervalSweep):
        lo, hi, log = v.start, v.end, "log" in v.tags
        if not lo < hi:
            raise SweepError(f"search space {key}: {expr!r} is an empty range (lower bound {lo} is not below {hi})")
        if log and lo <= 0:
            raise SweepError(f"search space {key}: a log-scale interval needs a positive lower bound; got {lo}")
        if isinstance(lo, int) and isinstance(hi, int):
            return D.IntDistribution(lo, hi, log=log)
        return D.FloatDistribution(float(lo), float(hi), log=log)
    raise SweepError(f"search space {key}: unsupported sweep {expr!r}")  # pragma: no cover


def override(key: str, value: Any) -> str:
    """``key=value`` in Hydra override syntax (categorical non-scalars are stored encoded)."""
    if isinstance(value, bool):
        return f"{key}={'true' if value else 'false'}"
    if value is None:
        return f"{key}=null"
    if isinstance(value, float):
        return f"{key}={value!r}"
    return f"{key}={value}"


TOP_LEVEL = {"sweep": "a mapping of settings (name, n_trials, workers, storage, ...)",
             "tasks": "a list of GLUE tasks, e.g. [rte]", "base": "a list of key=value tdlight overrides",
             "space": "a mapping of config keys to sweep expressions, e.g. compression.rank: choice(64, 128)"}
_VALID_FILE = "valid: a YAML mapping with the top-level keys sweep, tasks, base, space (examples in sweeps/)"


def _read(p: Path):
    """A sweep file as an OmegaConf mapping: every way a file can be unreadable is one error naming it."""
    import yaml

    if not p.is_file():
        raise SweepError(f"sweep file {str(p)!r} does not exist; valid: a YAML file such as sweeps/ratio_vs_glue.yaml")
    try:
        raw = OmegaConf.load(p)
    except yaml.YAMLError as e:
        where = getattr(e, "problem_mark", None)
        at = f" at line {where.line + 1}, column {where.column + 1}" if where is not None else ""
        what = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise SweepError(f"sweep file {str(p)!r} is not valid YAML{at}: {what}; {_VALID_FILE}") from None
    except (OSError, UnicodeDecodeError) as e:  # unreadable, or a scalar at the top ("Invalid loaded object type")
        raise SweepError(f"sweep file {str(p)!r} cannot be read as a sweep definition ({e}); {_VALID_FILE}") from None
    if not isinstance(raw, DictConfig):
        raise SweepError(f"sweep file {str(p)!r} holds a {type(raw).__name__.replace('Config', '').lower()} at the top "
                         f"level; {_VALID_FILE}")
    if not raw:
        raise SweepError(f"sweep file {str(p)!r} is empty; {_VALID_FILE}")
    return raw


def _check_top_level(raw, where: str) -> None:
    """Each top-level part has its kind (``sweep: 5`` would fail deep inside OmegaConf's merge)."""
    for key, valid in TOP_LEVEL.items():
        node = raw.get(key)  # None: absent or null (the default applies)
        ok = isinstance(node, ListConfig) if key in ("tasks", "base") else isinstance(node, DictConfig)
        if node is not None and not ok:
            raise SweepError(f"{where}: {key}: {OmegaConf.to_container(raw, resolve=False).get(key)!r} is not "
                             f"{valid.split(' (')[0].split(',')[0]}; valid: {valid}")


# sweep.* settings whose value must lie in a range: (valid range in words, test); None passes where allowed
_RANGES = {
    "n_trials": ("an integer >= 1", lambda v: v >= 1),
    "workers": ("an integer >= 1", lambda v: v >= 1),
    "threads": ("null (the machine's cores / workers) or an integer >= 1", lambda v: v is None or v >= 1),
    "trial_timeout": ("null (no limit) or a number of seconds > 0", lambda v: v is None or v > 0),
    "max_infeasible": ("an integer >= 1", lambda v: v >= 1),
    "heartbeat_interval": ("an integer number of seconds >= 1", lambda v: v >= 1),
    "sampler.n_startup_trials": ("null (Optuna's default) or an integer >= 0", lambda v: v is None or v >= 0),
    "sampler.population_size": ("null (Optuna's default) or an integer >= 2", lambda v: v is None or v >= 2),
}


def check_settings(s) -> None:
    """Every ``sweep.*`` value that cannot run is refused here, in one place, before anything starts (a
    negative ``trial_timeout`` would fail every trial, ``max_infeasible=0`` run none, and both exit 0)."""
    for key, (valid, ok) in _RANGES.items():
        value = OmegaConf.select(s, key)
        if not ok(value):
            raise SweepError(f"sweep.{key}={value}: out of range; valid: {valid}")
    if s.grace_period <= s.heartbeat_interval:
        raise SweepError(f"sweep.grace_period={s.grace_period}: out of range; valid: an integer number of seconds "
                         f"> sweep.heartbeat_interval ({s.heartbeat_interval})")
    if not s.name or "/" in s.name or s.name in (".", ".."):
        raise SweepError(f"sweep.name={s.name!r}: valid: a non-empty name without '/' (it names the sweep's directory "
                         "and its study)")
    for point in s.enqueue:
        if not isinstance(point, DictConfig):
            raise SweepError(f"sweep.enqueue entry {point!r} is not a point; valid: a list of mappings "
                             "{search-space key: value}, e.g. [{compression.rank: 64}]")


def load(path: str | Path | None, overrides: list[str] | None = None, *, data: dict | None = None) -> Sweep:
    """Read ``path`` (or ``data``), apply ``key=value`` overrides, check everything."""
    schema = OmegaConf.structured(SweepFile)
    try:
        if path is not None:
            p = Path(path)
            raw = _read(p)
            where = f"sweep file {str(p)!r}"
        else:
            p, raw, where = None, OmegaConf.create(data or {}), "sweep definition"
        _check_top_level(raw, where)
        # the space's dotted keys are data, not nesting: keep them out of the structured merge
        space = _flatten(OmegaConf.to_container(raw.space, resolve=True)) if raw.get("space") is not None else {}
        if "space" in raw:
            raw = OmegaConf.masked_copy(raw, [k for k in raw if k != "space"])
        cli_space = {}
        rest, more_base = [], []
        for o in overrides or []:
            if o.startswith("+base="):  # one more tdlight override for every trial, after the file's base
                more_base.append(o[len("+base="):])
                continue
            if "=" not in o:
                raise SweepError(f"override {o!r} is not key=value")
            k, v = o.split("=", 1)
            if k.startswith("space."):
                cli_space[k[len("space."):]] = v
            else:
                rest.append(o)
        cfg = OmegaConf.merge(schema, raw, OmegaConf.from_dotlist(rest))
        if more_base:
            cfg.base = [*cfg.base, *more_base]
    except OmegaConfBaseException as e:
        raise SweepError(f"sweep definition: {str(e).splitlines()[0]}. Valid top-level keys: sweep, tasks, base, space; "
                         f"sweep.*: {sorted(SweepSettings.__dataclass_fields__)}") from e
    origin = {k: where for k in space} | {k: f"override space.{k}" for k in cli_space}
    space.update(cli_space)
    cfg.space = {}
    s = cfg.sweep
    check_settings(s)
    if s.sampler.name not in SAMPLERS:
        raise SweepError(f"unknown sampler {s.sampler.name!r}; valid: {list(SAMPLERS)}")
    if not s.objectives:
        raise SweepError(f"sweep.objectives is empty; valid names: {sorted(OBJECTIVES)}")
    directions = []
    for o in s.objectives:
        if o.name not in OBJECTIVES:
            raise SweepError(f"unknown objective {o.name!r}; valid: {sorted(OBJECTIVES)}")
        d = o.direction or OBJECTIVES[o.name].direction
        if d not in DIRECTIONS:
            raise SweepError(f"objective {o.name}: direction {d!r}; valid: {', '.join(DIRECTIONS)}")
        o.direction = d
        directions.append(d)
    if len(set(o.name for o in s.objectives)) != len(s.objectives):
        raise SweepError(f"sweep.objectives names an objective twice: {[o.name for o in s.objectives]}")
    constraints = []
    known_before = [o.name for o in priced()]  # only these can be constrained
    for c in s.constraints:
        m = _CONSTRAINT.match(str(c))
        if not m or m.group(1) not in known_before:
            raise SweepError(f"constraint {c!r}: valid form '<{'|'.join(known_before)}> <op> <number>' with op one of "
                             ">=, <=, >, < (only quantities known before training can be constrained)")
        constraints.append(Constraint(m.group(1), m.group(2), float(m.group(3))))
    if not cfg.tasks:
        raise SweepError("tasks is empty: name at least one GLUE task, e.g. tasks: [rte]")
    if not space:
        raise SweepError("the search space is empty: add entries under space:, e.g. compression.rank: int(interval(16, 192))")
    for o in cfg.base:
        if "=" not in str(o):
            raise SweepError(f"base override {o!r} is not key=value")
        if str(o).split("=", 1)[0].lstrip("+~") in space:
            raise SweepError(f"{o!r} is both fixed in base and searched in space; keep one")
    base = [str(o) for o in cfg.base]
    stage = next((o.split("=", 1)[1] for o in base if o.startswith("stage=")), "decompose")
    try:
        refuse_renamed(base + [f"{k}=" for k in space], stage)
    except TdlightError as e:
        raise SweepError(f"sweep definition: {e}") from None
    dists = {}
    for k, v in space.items():
        try:
            dists[k] = distribution(k, v)
        except SweepError as e:
            raise SweepError(f"{origin[k]}: {e}") from None
    cfg.space = {k: str(v) for k, v in space.items()}
    return Sweep(cfg, dists, directions, constraints, p)


def sampler(s: Sweep, seed: int | None = None) -> optuna.samplers.BaseSampler:
    """The configured sampler, seeded by ``seed`` (default: ``sweep.sampler.seed``)."""
    sc = s.settings.sampler
    seed = sc.seed if seed is None else seed
    if sc.name == "tpe":
        kw = {} if sc.n_startup_trials is None else {"n_startup_trials": sc.n_startup_trials}
        return optuna.samplers.TPESampler(seed=seed, **kw)
    if sc.name == "nsga2":
        kw = {} if sc.population_size is None else {"population_size": sc.population_size}
        return optuna.samplers.NSGAIISampler(seed=seed, **kw)
    return optuna.samplers.RandomSampler(seed=seed)
