"""A real PostgreSQL server for the tests, started from the machine's binaries and stopped after.

Never a mock: ``initdb`` makes a throwaway cluster in a temporary directory, ``pg_ctl`` starts it
on a free loopback port (password authentication over TCP, as a remote sweep host would connect),
and each test gets databases of its own. Run as root, the server runs as the ``postgres`` (or
``nobody``) user — PostgreSQL refuses to run as root. Without PostgreSQL binaries on the machine
(``initdb`` on the PATH or under /usr/lib/postgresql/<version>/bin; Debian's ``postgresql``
package, which ``.ci/run`` installs when it can) the tests that need it are skipped with that reason.

The server dies with the test process, whatever kills it (a CI timeout's SIGKILL included): a small
watchdog, in a session of its own so that a signal to the test's process group spares it, waits
for the test process to go (its parent changes), then stops the server and removes its directory.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path

USER, PASSWORD = "tdlight", "pg-secret-4u"


def binaries() -> Path | None:
    """The directory holding initdb, pg_ctl and postgres, or None."""
    found = shutil.which("initdb")
    if found and shutil.which("pg_ctl"):
        return Path(os.path.realpath(found)).parent
    versions = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(Path(p).parent.parent.name)
                      if Path(p).parent.parent.name.isdigit() else 0)
    return Path(versions[-1]).parent if versions else None


# argv: the test process's pid, the server's root directory. Stops the postmaster (immediate shutdown: it
# takes its backends with it) and removes the directory once the test process is gone; exits on its own
# once the directory is gone (stopped normally).
WATCHDOG = r"""
import os, shutil, signal, sys, time
parent, root = int(sys.argv[1]), sys.argv[2]
signal.signal(signal.SIGINT, signal.SIG_IGN)
while os.getppid() == parent and os.path.isdir(root):
    time.sleep(0.2)

def running():
    try:
        pid = int(open(os.path.join(root, "data", "postmaster.pid")).readline())
        if not os.path.isdir("/proc"):
            os.kill(pid, 0)
            return pid
        state = open("/proc/%d/stat" % pid).read().rsplit(")", 1)[1].split()[0]
    except (OSError, ValueError, IndexError):  # no pid file yet / any more, or no such process
        return None
    return None if state == "Z" else pid  # (a zombie: dead, its reaper slow)

t0 = time.monotonic()
while os.path.isdir(root) and time.monotonic() - t0 < 30:
    pid = running()
    if pid is None and time.monotonic() - t0 > 3:  # (a pg_ctl start under way may yet start it)
        break
    if pid is not None:
        try:  # immediate shutdown: the postmaster takes its backends with it; then the hard way
            os.kill(pid, signal.SIGQUIT if time.monotonic() - t0 < 15 else signal.SIGKILL)
        except ProcessLookupError:
            pass
    time.sleep(0.2)
shutil.rmtree(root, ignore_errors=True)
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class PostgresServer:
    def __init__(self, bindir: Path):
        self.bindir = bindir
        self.run_as = None
        if os.geteuid() == 0:
            for name in ("postgres", "nobody"):
                try:
                    self.run_as = pwd.getpwnam(name)
                    break
                except KeyError:
                    continue
            if self.run_as is None:
                raise RuntimeError("running as root and no 'postgres' or 'nobody' user to run the server as")
        # not under pytest's tmp dirs: those are 0700 root, which the server's user cannot enter
        self.root = Path(tempfile.mkdtemp(prefix="tdlight-pg-"))
        self.data = self.root / "data"
        self.port = free_port()
        # before anything is made under root: a test killed during initdb leaves nothing either
        self.watchdog = subprocess.Popen([sys.executable, "-c", WATCHDOG, str(os.getpid()), str(self.root)],
                                         stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                         stderr=subprocess.DEVNULL, start_new_session=True)

    def postmaster_pid(self) -> int | None:
        try:
            return int((self.data / "postmaster.pid").read_text().splitlines()[0])
        except (OSError, ValueError, IndexError):
            return None

    def _cmd(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        cmd = list(args)
        if self.run_as is not None:
            cmd = ["runuser", "-u", self.run_as.pw_name, "--", *cmd]
        return subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=check, cwd=self.root)

    def start(self) -> "PostgresServer":
        pwfile = self.root / "pw"
        pwfile.write_text(PASSWORD + "\n")
        if self.run_as is not None:
            for p in (self.root, pwfile):
                os.chown(p, self.run_as.pw_uid, self.run_as.pw_gid)
        self._cmd(str(self.bindir / "initdb"), "-D", str(self.data), "-U", USER, f"--pwfile={pwfile}",
                  "--auth-local=trust", "--auth-host=scram-sha-256", "-E", "UTF8", "--no-sync")
        opts = f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1 -c fsync=off -c max_connections=100"
        r = self._cmd(str(self.bindir / "pg_ctl"), "-D", str(self.data), "-l", str(self.root / "server.log"),
                      "-o", opts, "-w", "-t", "60", "start", check=False)
        if r.returncode != 0:
            log = (self.root / "server.log").read_text() if (self.root / "server.log").exists() else ""
            raise RuntimeError(f"pg_ctl start failed: {r.stdout}{r.stderr}{log[-2000:]}")
        return self

    def url(self, database: str, password: str = PASSWORD, port: int | None = None) -> str:
        return f"postgresql://{USER}:{password}@127.0.0.1:{port or self.port}/{database}"

    def new_database(self) -> str:
        """A new empty database; its URL."""
        name = f"t_{uuid.uuid4().hex[:12]}"
        self.execute(self.url("postgres"), f"CREATE DATABASE {name}")
        return self.url(name)

    def execute(self, url: str, sql: str) -> list:
        import psycopg

        with psycopg.connect(url, autocommit=True) as conn:
            cur = conn.execute(sql)
            return cur.fetchall() if cur.description else []

    def stop(self) -> None:
        self._cmd(str(self.bindir / "pg_ctl"), "-D", str(self.data), "-m", "immediate", "-w", "stop", check=False)
        shutil.rmtree(self.root, ignore_errors=True)
        self.watchdog.send_signal(signal.SIGTERM)
        try:
            self.watchdog.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.watchdog.kill()
            self.watchdog.wait()
