"""``tdlight sweep-report <sweep dir>``: the Pareto front (PNG) and a Markdown table of all trials.

Also written automatically at the end of ``tdlight sweep``. Every objective is shown through its
object (``tdlight.sweep.objectives``: label, column, format, log scale, the teacher's value). The
plot puts two objectives against each other (``plot_axes``: the sweep's first two, a priced one on
x; by default the encoder compression ratio on x, log scale, and the GLUE score on y), labels every
trial with its number, marks the Pareto-optimal trials, the constant students (×: their score is the
majority class's), the majority-class line, the teacher where both its values are known (ratio 1),
and, on the ratio vs score plot, the paper's two reference rows as shares of this teacher's score
(ratio 7.5 at 99%, ratio 48 at 96.7%: the claims of Ren et al., ICLR 2022), named in the legend.

Reference points (``reference.NAME=RUN_DIR[,RUN_DIR...]``, one finished run per sweep task: a pipeline's
directory with its ``pipeline.json``, or a stage's with its ``metrics.json``) are runs that are not trials —
the teacher cut to fewer layers at the size of a trial (``stage.steps=[finetune,cut,pretrain,distill,evaluate]``),
the same student fine-tuned on gold labels — read through the same objectives, listed in trials.md and
drawn on the plot, so a reader sees whether the front beats the obvious alternatives.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import optuna
from omegaconf import OmegaConf
from optuna.trial import TrialState
from rich.console import Console
from rich.table import Table

from tdlight.data.metrics import CONSTANT_SHARE
from tdlight.errors import TdlightError
from tdlight.stages.loggers import write_sync_script
from tdlight.sweep.objectives import OBJECTIVES, SCORE, Objective, fmt
from tdlight.sweep.runner import ABANDONED, DUPLICATE, INFEASIBLE, INTERRUPTED, SAVED, SURPLUS, error_summary
from tdlight.sweep.spec import Sweep, SweepError, load
from tdlight.sweep.storage import open_storage, storage_name
from tdlight.sweep.trial import read_result

PAPER = ((7.5, 0.99, "paper 1/7"), (48.0, 0.967, "paper 1/48"))  # (ratio, share of the teacher's score, name)
DEFAULT_AXES = ("score", "ratio")  # a plot of a one-objective sweep pairs it with one of these


def _status(t: optuna.trial.FrozenTrial) -> str:
    if t.state == TrialState.PRUNED and t.user_attrs.get(INFEASIBLE):
        return f"infeasible ({t.user_attrs[INFEASIBLE]})"
    if t.state == TrialState.FAIL:
        if t.user_attrs.get(ABANDONED):
            return "abandoned: " + str(t.user_attrs[ABANDONED]).replace("|", "/")
        if t.user_attrs.get(INTERRUPTED):
            return "interrupted (re-queued)"
        if t.user_attrs.get(SURPLUS):
            return "surplus (not run)"
        if "error" not in t.user_attrs:  # failed by Optuna's heartbeat check: its sweep process or host died
            return "lost: its sweep process stopped beating (re-queued)"
        return "failed: " + error_summary(str(t.user_attrs["error"])).replace("|", "/")
    return t.state.name.lower()


def pareto_front(done: list[optuna.trial.FrozenTrial], directions) -> list[optuna.trial.FrozenTrial]:
    """The Pareto-optimal finished trials, constant students left out: a student that predicts one class
    (top share above ``CONSTANT_SHARE``) is a failure whatever its score, and at a high ratio nothing else
    would dominate it, so ``study.best_trials`` would offer it as a trade-off. Written here because
    Optuna's own front of a list of trials is private (``optuna.study._multi_objective``)."""
    signs = [1 if d == optuna.study.StudyDirection.MAXIMIZE else -1 for d in directions]
    useful = [t for t in done if t.values is not None and not _constant(t)]
    key = {t.number: [s * v for s, v in zip(signs, t.values)] for t in useful}

    def dominates(a, b) -> bool:
        return all(x >= y for x, y in zip(a, b)) and any(x > y for x, y in zip(a, b))

    return [t for t in useful if not any(dominates(key[o.number], key[t.number]) for o in useful)]


def load_study(sweep_dir: str | Path, storage: str | None = None) -> tuple[optuna.Study, object]:
    """The study of a sweep directory; ``storage``: its URL when given again (``sweep.yaml`` keeps none's
    password)."""
    d = Path(sweep_dir)
    if not (d / SAVED).is_file():
        raise SweepError(f"{str(d)!r} is not a sweep directory (no {SAVED}); valid: the sweep.dir of a tdlight sweep, "
                         "e.g. outputs/sweeps/<name>")
    saved = OmegaConf.load(d / SAVED)
    sweep = load(None, data=OmegaConf.to_container(saved, resolve=True))
    if storage is not None:
        sweep.settings.storage = storage
    url = sweep.settings.storage
    try:
        study = optuna.load_study(study_name=sweep.settings.name, storage=open_storage(url, d))
    except KeyError as e:
        raise SweepError(f"no study {sweep.settings.name!r} in {storage_name(url, d)}") from e
    return study, sweep


@dataclass(frozen=True)
class Reference:
    """A finished run that is not a trial, read through the sweep's objectives (a point to beat)."""

    name: str
    runs: tuple[str, ...]  # one run directory per sweep task
    values: dict  # objective name -> its value (the mean over the tasks), None where a run has none
    top_share: float | None  # the largest share of dev predictions in one class over the tasks
    kind: str  # what the student is, in words ("layer cut to 1 of 6 layers", "compressed")


def load_references(references: dict[str, list[str]], tasks: list[str]) -> list[Reference]:
    """``{name: [run dir, ...]}`` -> the reference points, one run per sweep task (bad input: an error
    naming the run or task and what is valid)."""
    out = []
    for name, dirs in references.items():
        results: dict[str, dict] = {}
        for d in dirs:
            res = read_result(Path(d))
            task = res.get("task")
            if task not in tasks:
                raise TdlightError(f"reference.{name}: {d} is a run on task {task!r}; this sweep's tasks: {', '.join(tasks)}")
            if task in results:
                raise TdlightError(f"reference.{name}: two runs on task {task!r}; give one run per task")
            results[task] = res
        missing = [t for t in tasks if t not in results]
        if missing:
            raise TdlightError(f"reference.{name}: no run on {', '.join(missing)}; a reference point needs one "
                               f"finished run per sweep task ({', '.join(tasks)}), comma-separated")
        values = {o.name: o.combine({t: o.read(r) for t, r in results.items()}) for o in OBJECTIVES.values()}
        kinds = {r.get("student_kind") for r in results.values()}  # (pipeline.json's; a single stage has none)
        kind = kinds.pop() if len(kinds) == 1 and None not in kinds else "–"
        depths = {(r.get("student_layers"), r.get("teacher_layers")) for r in results.values()}
        if kind == "cut" and len(depths) == 1:
            kind = "layer cut to {} of {} layers".format(*depths.pop())
        out.append(Reference(name, tuple(str(d) for d in dirs), values,
                             _top({t: r.get("student_top_share", (r.get("dev") or {}).get("top_share"))
                                   for t, r in results.items()}), kind))
    return out


def report(sweep_dir: str | Path, console: Console | None = None, storage: str | None = None,
           references: dict[str, list[str]] | None = None) -> dict:
    console = console or Console()
    d = Path(sweep_dir)
    study, sweep = load_study(d, storage)
    refs = load_references(references or {}, list(sweep.cfg.tasks))
    objectives = sweep.objectives
    trials = study.get_trials(deepcopy=False)
    done = [t for t in trials if t.state == TrialState.COMPLETE]
    front = pareto_front(done, study.directions)
    front_ids = {t.number for t in front}
    tasks = list(sweep.cfg.tasks)
    teacher = _teacher(done, tasks)

    # the Markdown table of all trials
    keys = list(sweep.space)
    columns = table_objectives(sweep)
    head = ["#", *keys, "d_in×d_out", "k"]
    for o in columns:
        head += [*tasks] if getattr(o, "task_columns", False) else []
        head.append(o.header)
    head += ["top share", "Pareto", "minutes", "status"]
    lines = [f"# Sweep {sweep.settings.name}", "",
             f"{len(done)} finished of {sweep.settings.n_trials} trials; objectives "
             + ", ".join(f"{o} ({d})" for o, d in zip(objectives, sweep.directions)), ""]
    rate = _trials_per_hour(done)
    if rate:
        lines += [f"Throughput: {rate:.2f} finished trials per hour (first start to last finish).", ""]
    if teacher is not None:
        lines += [f"Teacher (ratio 1): GLUE score {teacher:.4f} on {', '.join(tasks)}.", ""]
    majority = _majority(done, tasks)
    if majority is not None:
        lines += [f"Majority-class baseline (always the most frequent dev label): {majority:.4f}. 'top share' is the "
                  f"largest share of dev predictions in one class (the maximum over tasks); above "
                  f"{CONSTANT_SHARE:.2f} the student is a constant predictor, flagged ⚠ and left off the Pareto front.", ""]
    if done and not front:
        lines += ["No Pareto front: every finished student is a constant predictor (⚠), a failure whatever its "
                  "score or ratio.", ""]
    repeats = [t for t in trials if DUPLICATE in t.user_attrs]
    if repeats:  # not rows: they were never run (sweep.allow_duplicates=false)
        lines += [f"{len(repeats)} sampled point(s) repeated a finished trial and were not run again "
                  "(not listed; sweep.allow_duplicates=true runs them).", ""]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for t in trials:
        if DUPLICATE in t.user_attrs:
            continue
        u = t.user_attrs
        row = [str(t.number), *[fmt(t.params.get(k)) for k in keys],
               f"{u['rank_in']}×{u['rank_out']}" if "rank_in" in u else "–", fmt(u.get("bank"))]
        for o in columns:
            if getattr(o, "task_columns", False):
                row += [fmt(o.per_task(u).get(x)) for x in tasks]
            row.append(o.format(value(o, t, sweep)))
        row += [_share(u.get("top_share")), "★" if t.number in front_ids else "",
                f"{u['seconds'] / 60:.1f}" if "seconds" in u else "–", _status(t)]
        lines.append("| " + " | ".join(row) + " |")
    if refs:  # runs that are not trials: the points a front must beat
        head = ["reference", "student", *[o.header for o in columns], "top share", "runs"]
        lines += ["", "## Reference points (not trials)", "",
                  "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for ref in refs:
            lines.append("| " + " | ".join([ref.name, ref.kind, *[o.format(ref.values.get(o.name)) for o in columns],
                                            _share({"all": ref.top_share}), ", ".join(ref.runs)]) + " |")
    md = d / "trials.md"
    md.write_text("\n".join(lines) + "\n")

    png = d / "pareto.png"
    axes = plot_axes(sweep)
    _plot(png, done, front, teacher, sweep, axes, refs)

    shown = [*axes, *[o for o in sweep.strategies if o not in axes]]
    t = Table(title=f"sweep {sweep.settings.name}: Pareto front ({len(front)} of {len(done)} finished trials)")
    for c in ("#", *keys, *[o.header for o in shown]):
        t.add_column(c, justify="right")
    for tr in sorted(front, key=lambda x: value(axes[0], x, sweep) or 0):
        t.add_row(str(tr.number), *[fmt(tr.params.get(k)) for k in keys],
                  *[o.format(value(o, tr, sweep)) for o in shown])
    console.print(t)
    constant = [x for x in done if _constant(x)]
    if constant:  # off the front whatever their numbers: say so where the front is read
        console.print(f"[yellow]{len(constant)} of {len(done)} finished student(s) are constant predictors (more than "
                      f"{CONSTANT_SHARE:.0%} of dev predictions in one class: trial(s) "
                      f"{', '.join(str(x.number) for x in constant)}) and are left off the front"
                      + (": no student learned anything" if len(constant) == len(done) else ""))
    sync = d / "wandb_sync.sh"
    n_offline = write_sync_script(d, sync)
    if n_offline:  # (logger=wandb offline: one command uploads the whole sweep)
        console.print(f"W&B: {n_offline} offline run(s) in this sweep; upload them all with: sh {sync}",
                      soft_wrap=True)  # (a path is never broken: it is copied)
    for ref in refs:
        console.print(f"reference {ref.name} ({ref.kind}): " + ", ".join(
            f"{o.header} {o.format(ref.values.get(o.name))}" for o in shown))
    console.print(f"report: {md}  plot: {png}")
    return {"finished": len(done), "front": [x.number for x in front], "trials_per_hour": rate, "teacher": teacher,
            "markdown": str(md), "plot": str(png), "axes": [o.name for o in axes],
            "references": {r.name: r.values for r in refs}, "wandb_offline_runs": n_offline}


def table_objectives(sweep: Sweep) -> list[Objective]:
    """The objectives trials.md has a column for: every ``shown`` one (in the registry's order: ratio,
    model ratio, MB, score), then the sweep's others in its order."""
    shown = [o for o in OBJECTIVES.values() if o.shown]
    return shown + [o for o in sweep.strategies if o not in shown]


def plot_axes(sweep: Sweep) -> tuple[Objective, Objective]:
    """The Pareto plot's (x, y): the sweep's first two objectives (one alone is paired with the score, or
    the ratio), a priced one on x when only one of them is priced (the cost against what it buys)."""
    names = [n for n in dict.fromkeys([*sweep.objectives, *DEFAULT_AXES]) if n in OBJECTIVES][:2]
    a, b = (OBJECTIVES[n] for n in names)
    return (a, b) if a.priced and not b.priced else (b, a)


def value(o: Objective, t: optuna.trial.FrozenTrial, sweep: Sweep) -> float | None:
    """Trial ``t``'s value of objective ``o``: the study's own for a finished trial of a sweep that optimises
    ``o``, else what the trial recorded (``Objective.recorded``); None if it has none."""
    if t.state == TrialState.COMPLETE and t.values is not None and o.name in sweep.objectives:
        return t.values[sweep.objectives.index(o.name)]
    return o.recorded(t.user_attrs, list(sweep.cfg.tasks))


def _teacher(done, tasks) -> float | None:
    for t in done:
        te = t.user_attrs.get("teacher") or {}
        if all(x in te for x in tasks):
            return statistics.mean(te[x] for x in tasks)
    return None


def _majority(done, tasks) -> float | None:
    for t in done:
        m = t.user_attrs.get("majority") or {}
        if all(x in m for x in tasks):
            return statistics.mean(m[x] for x in tasks)
    return None


def _top(shares: dict | None) -> float | None:
    """A trial's top share: the largest share of dev predictions in one class over its tasks (classifiers)."""
    tops = [v for v in (shares or {}).values() if v is not None]
    return max(tops) if tops else None


def _constant(t: optuna.trial.FrozenTrial) -> bool:
    """Whether trial ``t``'s student is a constant predictor on any of its tasks (off the front, × on the plot)."""
    return (_top(t.user_attrs.get("top_share")) or 0) > CONSTANT_SHARE


def _share(shares: dict | None) -> str:
    top = _top(shares)
    if top is None:
        return "–"
    return f"{top:.3f}" + (" ⚠" if top > CONSTANT_SHARE else "")


def _trials_per_hour(done) -> float | None:
    if len(done) < 1:
        return None
    start = min(t.datetime_start for t in done if t.datetime_start)
    end = max(t.datetime_complete for t in done if t.datetime_complete)
    hours = (end - start).total_seconds() / 3600
    return len(done) / hours if hours > 0 else None


def _plot(path: Path, done, front, teacher, sweep: Sweep, axes: tuple[Objective, Objective],
          refs: list[Reference] = ()) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x, y = axes

    def points(trials):
        pairs = ((value(x, t, sweep), value(y, t, sweep)) for t in trials)
        return [p for p in pairs if None not in p]

    fig, ax = plt.subplots(figsize=(10, 4.5))
    tasks = list(sweep.cfg.tasks)
    constant = {t.number for t in done if _constant(t)}
    learned = points(t for t in done if t.number not in constant)
    if learned:
        ax.scatter(*zip(*learned), c="0.6", s=25, label="trials")
    flat = points(t for t in done if t.number in constant)
    if flat:  # their score is the majority class's, whatever it reads
        ax.scatter(*zip(*flat), marker="x", c="tab:orange", s=30,
                   label=f"constant students (> {CONSTANT_SHARE:.0%} of predictions one class)")
    for t in done:  # each point names its trial (trials.md has its settings)
        p = points([t])
        if p:
            ax.annotate(str(t.number), p[0], textcoords="offset points", xytext=(3, -9), fontsize=6, c="0.35")
    fr = sorted(points(front))
    if fr:
        ax.plot(*zip(*fr), "o-", c="tab:red", label="Pareto front")
    tx, ty = x.of_teacher(teacher), y.of_teacher(teacher)
    if tx is not None and ty is not None:
        ax.scatter([tx], [ty], marker="*", s=160, c="black", label="teacher", zorder=3)
    majority = _majority(done, tasks)
    if y.name == SCORE.name and majority is not None:
        ax.axhline(majority, ls="--", lw=1, c="0.5", label="majority class (a student must beat it)")
    if teacher is not None and (x.name, y.name) == ("ratio", SCORE.name):  # the paper's claims: ratio vs score
        for i, (r, share, name) in enumerate(PAPER):
            ax.scatter([r], [share * teacher], marker="D", s=50, c="tab:blue", zorder=3,
                       label="the paper's rows (Ren et al., ICLR 2022) as shares of this teacher" if i == 0 else None)
            ax.annotate(f"{name}: {share:.1%} at {r:g}×", (r, share * teacher), textcoords="offset points",
                        xytext=(-6, 6), ha="right", fontsize=8)  # (to the left: 1/48 sits at the plot's edge)
    drawn = [r for r in refs if None not in (r.values.get(x.name), r.values.get(y.name))]
    for i, ref in enumerate(drawn):  # (a cut to no layer has no ratio: trials.md lists it, the plot cannot)
        rx, ry = ref.values[x.name], ref.values[y.name]
        ax.scatter([rx], [ry], marker="s", s=45, c="tab:green", zorder=3,
                   label="reference points (runs that are not trials)" if i == 0 else None)
        ax.annotate(f"{ref.name} ({ref.kind})", (rx, ry), textcoords="offset points", xytext=(5, 4), fontsize=7,
                    c="tab:green")
    if x.log:
        ax.set_xscale("log")
    if y.log:
        ax.set_yscale("log")
    ax.set_xlabel(x.axis_label(tasks) + (" (log)" if x.log else ""))
    ax.set_ylabel(y.axis_label(tasks) + (" (log)" if y.log else ""))
    ax.set_title(f"sweep {sweep.settings.name} — {datetime.now():%Y-%m-%d}")
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1), fontsize=7)  # beside the plot: no point hidden
    fig.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    tmp.replace(path)
