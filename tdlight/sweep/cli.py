"""``tdlight sweep <file.yaml> [key=value ...]`` and ``tdlight sweep-report <sweep dir>``."""

from __future__ import annotations

import logging
import sys

from rich.console import Console

from tdlight.errors import TdlightError

USAGE = ("usage: tdlight sweep <sweeps/NAME.yaml> [sweep.workers=N sweep.n_trials=N space.KEY='choice(..)' "
         "+base=KEY=VALUE ...]\n"
         "       tdlight sweep-report <sweep dir> [sweep.storage=URL] [reference.NAME=RUN_DIR[,RUN_DIR...] ...]")


HELP = ("\n\nsweep: run (or resume: the same command again) an Optuna study whose trials are tdlight runs; "
        "the sweep file's\n  sweep:, tasks:, base: and space: keys, and any of them as key=value overrides, are "
        "described in the README\n  (section 'Sweeps'); examples in sweeps/.\n"
        "sweep-report: print the Pareto front and rewrite trials.md and pareto.png of a sweep directory\n  (sweep.storage=URL: "
        "the study's URL again; sweep.yaml never keeps a password: libpq reads PGPASSWORD or ~/.pgpass;\n"
        "  reference.NAME=RUN_DIR,...: a finished run per sweep task that is not a trial — the teacher cut to fewer "
        "layers,\n  gold-label fine-tuning — listed in trials.md and drawn on the plot as a point to beat).")


def _settings_help() -> str:
    """Every ``sweep.*`` key with its default, read from the schema (``tdlight.sweep.spec.SweepSettings``),
    so the help never goes stale."""
    import dataclasses

    import yaml

    from tdlight.sweep.objectives import OBJECTIVES
    from tdlight.sweep.spec import SweepSettings

    rows = []
    for f in dataclasses.fields(SweepSettings):
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        if dataclasses.is_dataclass(default):
            default = {k: v for k, v in dataclasses.asdict(default).items()}
        elif isinstance(default, list) and default and dataclasses.is_dataclass(default[0]):
            default = [d.name for d in default]
        text = yaml.safe_dump(default, default_flow_style=True, width=1000).strip().removesuffix("...").strip()
        rows.append(f"  sweep.{f.name}={text}")
    return ("\n\nsweep.* keys (defaults; README 'Sweeps' says what each does):\n" + "\n".join(rows)
            + f"\n  objectives: {', '.join(sorted(OBJECTIVES))}")


class _Masking(logging.Formatter):
    """Log lines (tracebacks included) never show a URL's password."""

    def format(self, record: logging.LogRecord) -> str:
        from tdlight.sweep.storage import mask_secrets

        return mask_secrets(super().format(record))


def main(command: str, args: list[str]) -> int:
    if any(a in ("-h", "--help") for a in args):
        print(USAGE + HELP + _settings_help())
        return 0
    handler = logging.StreamHandler()
    handler.setFormatter(_Masking("[%(asctime)s][%(name)s][%(levelname)s] - %(message)s"))
    logging.basicConfig(level=logging.INFO, handlers=[handler])
    logging.getLogger("optuna").setLevel(logging.WARNING)
    try:
        if command == "sweep-report":
            from tdlight.sweep.report import report

            storage = [a.split("=", 1)[1] for a in args[1:] if a.startswith("sweep.storage=")]
            refs = [a.split("=", 1) for a in args[1:] if a.startswith("reference.")]
            if not args or "=" in args[0] or len(args) != 1 + len(storage) + len(refs) or len(storage) > 1:
                raise TdlightError(f"sweep-report takes one sweep directory and optionally sweep.storage=URL and "
                                   f"reference.NAME=RUN_DIR[,RUN_DIR...]; got {args}\n{USAGE}")
            references: dict[str, list[str]] = {}
            for key, dirs in refs:
                name = key.removeprefix("reference.")
                if not name or "." in name or name in references or not all(dirs.split(",")):
                    raise TdlightError(f"{key}={dirs}: a reference is reference.NAME=RUN_DIR[,RUN_DIR...] with a new "
                                       f"NAME (no dot) and one finished run directory per sweep task")
                references[name] = dirs.split(",")
            report(args[0], storage=storage[0] if storage else None, references=references)
            return 0
        from tdlight.sweep.report import report
        from tdlight.sweep.runner import Runner, WorkerCrashed
        from tdlight.sweep.spec import load

        if not args or "=" in args[0]:
            raise TdlightError(f"tdlight sweep needs a sweep file first\n{USAGE}")
        runner = Runner(load(args[0], args[1:]))
        try:
            runner.run()
        except WorkerCrashed as e:  # not bad input: the sweep failed (its trials are recorded; report it later)
            print(f"tdlight: error: {_masked(str(e))}", file=sys.stderr, flush=True)
            return 1
        except KeyboardInterrupt:
            print(f"\ntdlight sweep: interrupted; running trials were stopped and re-queued. Rerun the same command "
                  f"to resume ({runner.dir}).", file=sys.stderr, flush=True)
            return 130
        report(runner.dir, Console(), storage=runner.s.storage)
        return 0
    except TdlightError as e:
        print(f"tdlight: error: {_masked(str(e))}", file=sys.stderr, flush=True)
        return 2


def _masked(text: str) -> str:
    from tdlight.sweep.storage import mask_secrets

    return mask_secrets(text)
