"""``tdlight sweep <file.yaml> [key=value ...]`` and ``tdlight sweep-report <sweep dir>``."""

from __future__ import annotations

import logging
import sys

from rich.console import Console

from tdlight.errors import TdlightError

USAGE = ("usage: tdlight sweep <sweeps/NAME.yaml> [sweep.workers=N sweep.n_trials=N space.KEY='choice(..)' ...]\n"
         "       tdlight sweep-report <sweep dir>")


HELP = ("\n\nsweep: run (or resume: the same command again) an Optuna study whose trials are tdlight runs; "
        "the sweep file's\n  sweep:, tasks:, base: and space: keys, and any of them as key=value overrides, are "
        "described in the README\n  (section 'Sweeps'); examples in sweeps/.\n"
        "sweep-report: print the Pareto front and rewrite trials.md and pareto.png of a sweep directory.")


def main(command: str, args: list[str]) -> int:
    if any(a in ("-h", "--help") for a in args):
        print(USAGE + HELP)
        return 0
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s][%(name)s][%(levelname)s] - %(message)s")
    logging.getLogger("optuna").setLevel(logging.WARNING)
    try:
        if command == "sweep-report":
            from tdlight.sweep.report import report

            if len(args) != 1:
                raise TdlightError(f"sweep-report takes one sweep directory; got {args}\n{USAGE}")
            report(args[0])
            return 0
        from tdlight.sweep.report import report
        from tdlight.sweep.runner import Runner
        from tdlight.sweep.spec import load

        if not args or "=" in args[0]:
            raise TdlightError(f"tdlight sweep needs a sweep file first\n{USAGE}")
        runner = Runner(load(args[0], args[1:]))
        try:
            runner.run()
        except KeyboardInterrupt:
            print(f"\ntdlight sweep: interrupted; running trials were stopped and re-queued. Rerun the same command "
                  f"to resume ({runner.dir}).", file=sys.stderr, flush=True)
            return 130
        report(runner.dir, Console())
        return 0
    except TdlightError as e:
        print(f"tdlight: error: {e}", file=sys.stderr, flush=True)
        return 2
