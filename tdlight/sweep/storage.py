"""Where a sweep's study lives and who runs its trials: the Optuna storage (a journal file or an RDB
URL, the password of which is never shown or stored), the heartbeats that tell another sweep process
a running trial from a dead one, and this machine's identity as trials record it.
"""

from __future__ import annotations

import os
import re
import socket
import time
import warnings
from pathlib import Path

import optuna

from tdlight.sweep.spec import SweepError


# --- the storage, its URL and its password --------------------------------------------------------
def open_storage(url: str | None, sweep_dir: Path, *, heartbeat_interval: int = 30, grace_period: int = 120):
    """The study's storage: ``<sweep dir>/study.journal`` by default, or any Optuna storage URL
    (an RDB URL with heartbeats: see ``sweep.heartbeat_interval`` / ``sweep.grace_period``)."""
    if url is None or url.endswith(".journal"):
        from optuna.storages import JournalStorage
        from optuna.storages.journal import JournalFileBackend

        path = Path(url) if url else sweep_dir / "study.journal"
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            return JournalStorage(JournalFileBackend(str(path)))
        except OSError as e:
            raise SweepError(f"cannot open the sweep journal {str(path)!r}: {e}") from e
    if "://" not in url:
        raise SweepError(f"sweep.storage={url!r}: valid: null (a journal file in the sweep directory), a path ending "
                         "in .journal, or an Optuna RDB URL such as sqlite:///sweep.db or postgresql://user@host/db")
    shown = safe_url(url)
    if _is_postgres(url):
        try:
            import psycopg  # noqa: F401 - SQLAlchemy 2's default PostgreSQL driver
        except ImportError:
            raise SweepError(f"sweep.storage={shown!r} needs the PostgreSQL driver: pip install 'tdlight[postgres]' "
                             "(psycopg 3)") from None
    from sqlalchemy.exc import IntegrityError, ProgrammingError

    for attempt in range(4):
        try:
            # heartbeats let another machine tell a dead worker's trial from a running one
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                return optuna.storages.RDBStorage(url, heartbeat_interval=heartbeat_interval, grace_period=grace_period,
                                                  heartbeat_stale_trial_callback=_requeue_stale,
                                                  engine_kwargs=_engine_kwargs(url))
        except (IntegrityError, ProgrammingError) as e:
            # sweep processes started together on an empty database race to create Optuna's tables
            # (one gets "duplicate key ... pg_type"): the tables are there a moment later
            if attempt == 3:
                raise SweepError(f"cannot open sweep.storage={shown!r}: {first_line(e, url)}") from e
            time.sleep(1.0 + attempt)
        except Exception as e:  # SQLAlchemy raises many kinds: any of them means "cannot open"
            hint = ""
            if _is_postgres(url) and _parsed(url).password is None and "password" in str(e):
                hint = ("; a URL without a password takes it from PGPASSWORD, ~/.pgpass or PGSERVICE (libpq): "
                        "set one of them (sweep.yaml never stores a password)")
            raise SweepError(f"cannot open sweep.storage={shown!r}: {first_line(e, url)}{hint}") from e


def _parsed(url: str):
    from sqlalchemy.engine import make_url

    try:
        return make_url(url)
    except Exception:  # noqa: BLE001 - not a URL SQLAlchemy can parse
        return None


def safe_url(url: str) -> str:
    """``url`` with its password (if any) replaced by ``***``: what messages and logs show."""
    u = _parsed(url)
    return u.render_as_string(hide_password=True) if u is not None else mask_secrets(url)


def stored_url(url: str | None) -> str | None:
    """``url`` as written to ``sweep.yaml``: without its password, which libpq then takes from
    ``PGPASSWORD``, ``~/.pgpass`` or ``PGSERVICE`` (a masked ``***`` would be sent as the password)."""
    u = _parsed(url) if url else None
    if u is None or u.password is None:
        return url
    from sqlalchemy.engine import URL

    bare = URL.create(u.drivername, username=u.username, host=u.host, port=u.port, database=u.database, query=u.query)
    return bare.render_as_string(hide_password=False)


# scheme://user:password@ in any text: the last guard of messages and logs
_SECRET = re.compile(r"(?P<head>\b[A-Za-z][A-Za-z0-9+.\-]*://[^\s:/@'\"]*):(?P<password>[^\s@'\"/]+)@")


def mask_secrets(text: str) -> str:
    """``text`` with the password of every URL in it replaced by ``***``."""
    return _SECRET.sub(lambda m: f"{m['head']}:***@", text)


def storage_name(url: str | None, sweep_dir: Path) -> str:
    """Where a sweep's study lives, as messages name it: its URL (password masked) or its directory."""
    return safe_url(url) if url else str(sweep_dir)


def _is_postgres(url: str) -> bool:
    u = _parsed(url)
    return u is not None and u.get_backend_name() == "postgresql"


def _engine_kwargs(url: str) -> dict:
    # a database that does not answer fails within seconds instead of the driver's minutes
    return {"connect_args": {"connect_timeout": 10}} if _is_postgres(url) else {}


def first_line(e: Exception, url: str) -> str:
    """The first line of an error that says something, the password never in it."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    text = lines[0] if lines else type(e).__name__
    password = getattr(_parsed(url), "password", None) if url else None
    return text.replace(password, "***") if password else text


def _requeue_stale(study: optuna.Study, t: optuna.trial.FrozenTrial) -> None:
    study.enqueue_trial(t.params, user_attrs={"retry_of": t.number}, skip_if_exists=False)


# --- who runs a trial: this machine, and the heartbeats of its running trials ---------------------
def host_id() -> str:
    """This machine, as recorded on its trials: ``$TDLIGHT_HOST_ID`` if set, else the host name and
    the kernel's boot id — containers on several machines often share one host name, and a pid
    is only meaningful on the machine (and boot) that issued it."""
    if os.environ.get("TDLIGHT_HOST_ID"):
        return os.environ["TDLIGHT_HOST_ID"]
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()[:8]
    except OSError:
        boot = ""
    return f"{socket.gethostname()}-{boot}" if boot else socket.gethostname()


def heartbeats_enabled(study: optuna.Study) -> bool:
    from optuna.storages._heartbeat import BaseHeartbeat, is_heartbeat_enabled

    return isinstance(study._storage, BaseHeartbeat) and is_heartbeat_enabled(study._storage)


def has_heartbeat(study: optuna.Study, trial_id: int) -> bool:
    """Whether a heartbeat was ever recorded for the trial (RDB storages; Optuna has no public getter)."""
    if not heartbeats_enabled(study):
        return False
    from optuna.storages._rdb import models
    from optuna.storages._rdb.storage import _create_scoped_session

    rdb = getattr(study._storage, "_backend", study._storage)  # create_study wraps an RDBStorage in a cache
    with _create_scoped_session(rdb.scoped_session) as session:
        return models.TrialHeartbeatModel.where_trial_id(trial_id, session) is not None


def heartbeat(study: optuna.Study, trial: optuna.Trial):
    """The function a running trial calls while it waits (None where the storage has no heartbeats): it
    records Optuna heartbeats (three per ``sweep.heartbeat_interval``, at most one every 10 s)."""
    if not heartbeats_enabled(study):
        return None
    storage = study._storage
    every = min(10.0, storage.get_heartbeat_interval() / 3)
    last = [0.0]

    def beat():
        if time.monotonic() - last[0] >= every:
            storage.record_heartbeat(trial._trial_id)
            last[0] = time.monotonic()

    beat()
    return beat
