"""A command's run directory: checked before Hydra makes it, removed again when the command
fails before any work.

Hydra creates ``hydra.run.dir`` (``${paths.output_dir}/<stage>/<time>_<id>``) before it calls
tdlight, and reports a directory it cannot make or an interpolation it cannot resolve with a
traceback. :class:`RunDirCheck` is a Hydra callback (``hydra.callbacks`` in ``conf/config.yaml``)
that checks the directory first and records which of its parents already existed, so that a
command that ends in an error (or a resume, which works in the resumed run's directory) removes
every folder it created, up to and including a fresh output root, and nothing else.

Its own module, not :mod:`tdlight.cli`: Hydra instantiates the callback by its import path, and
``python -m tdlight.cli`` runs the CLI as ``__main__`` — a second copy of any state kept there.
"""

from __future__ import annotations

import logging
import shutil
import sys
from pathlib import Path
from typing import Any, Optional

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from tdlight.files import nearest_existing, write_obstacle

_existing: Optional[Path] = None  # the nearest parent of the run directory that existed before the command


def check_run_dir(config: DictConfig, key: str) -> None:
    """Exit 2 with one line when ``key`` (``hydra.run.dir`` / ``hydra.sweep.dir``) cannot be
    resolved or created; else remember its nearest existing parent (:func:`discard`)."""
    global _existing
    given = None
    for name in ("paths.output_dir", key):
        try:
            value = OmegaConf.select(config, name)
        except Exception as e:  # omegaconf's interpolation errors: a `${x}` that names nothing
            *parents, leaf = name.split(".")
            written = OmegaConf.to_container(OmegaConf.select(config, ".".join(parents)), resolve=False)[leaf]
            first = str(e).strip().splitlines()[0]
            _fail(f"{name}={written!r} cannot be resolved: {first}; valid: a directory path whose interpolations "
                  "name a config key or a resolver (e.g. ${oc.env:HOME}/runs)")
        given = value if given is None else given
    resolved = value
    path = Path(str(resolved)).absolute()
    why = write_obstacle(path)
    if why is not None:
        _fail(f"paths.output_dir={given!r}: cannot create the run directory {str(path)!r}: {why}; valid: a directory "
              "you can write to")
    _existing = nearest_existing(path)


def _fail(message: str) -> None:
    print(f"tdlight: error: {message}", file=sys.stderr, flush=True)
    sys.exit(2)


def discard(run_dir: Path) -> None:
    """Remove a run directory that holds nothing but what Hydra wrote at start-up, then each parent
    folder the command created (empty ones only), up to the parent that existed before it."""
    if not run_dir.is_dir():
        return
    if not all(p.name == ".hydra" or p.suffix == ".log" for p in run_dir.iterdir()):
        return
    _close_file_handlers(run_dir)
    shutil.rmtree(run_dir, ignore_errors=True)
    stop = _existing.resolve() if _existing is not None else None
    p = run_dir.resolve().parent
    # without the record (a run started by another entry point) only the <stage>/ folder goes
    for _ in range(64 if stop is not None else 1):
        if p == stop or p == p.parent:
            break
        try:
            p.rmdir()  # only when empty: another run's files are never touched
        except OSError:
            break
        p = p.parent


def _close_file_handlers(run_dir: Path) -> None:
    """Detach the logging handlers that write into ``run_dir`` (Hydra's ``tdlight.log``): a handler
    left on a removed directory fails on the next log line of this process (a command run in-process
    by a test or a notebook, then anything that logs)."""
    inside = run_dir.resolve()
    loggers = [logging.getLogger(), *(lg for lg in logging.Logger.manager.loggerDict.values()
                                      if isinstance(lg, logging.Logger))]
    for lg in loggers:
        for h in list(lg.handlers):
            if isinstance(h, logging.FileHandler) and Path(h.baseFilename).resolve().is_relative_to(inside):
                lg.removeHandler(h)
                h.close()


class RunDirCheck(Callback):
    """Hydra callback: :func:`check_run_dir` before the run (or the multirun) directory is made."""

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        check_run_dir(config, "hydra.run.dir")

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        check_run_dir(config, "hydra.sweep.dir")
