"""A throwaway PostgreSQL server for tests: initdb into a temporary directory, started with
pg_ctl on 127.0.0.1 and a free port, stopped (by its postmaster's pid) afterwards.

PostgreSQL refuses to run as root: as root, the server runs as the ``postgres`` user
(``runuser``), which owns its data directory. The binaries come from ``pg_config
--bindir``, PATH, or Debian's /usr/lib/postgresql/<version>/bin (``./dev`` installs the
``postgresql`` package where it is missing).
"""

from __future__ import annotations

import glob
import os
import shutil
import signal
import subprocess
import tempfile
from pathlib import Path

from clusters import free_port


def postgres_bindir() -> Path:
    found = shutil.which("initdb")
    if found:
        return Path(found).parent
    candidates = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), reverse=True)
    if candidates:
        return Path(candidates[0]).parent
    raise RuntimeError(
        "PostgreSQL's initdb was not found (PATH, /usr/lib/postgresql/*/bin): install the "
        "server, e.g. apt-get install postgresql (./dev does this where it can)"
    )


class PostgresServer:
    """``with PostgresServer() as server: server.url`` (a SQLAlchemy URL, psycopg driver)."""

    def __init__(self) -> None:
        self.bindir = postgres_bindir()
        self.port = free_port()
        self.root = Path(tempfile.mkdtemp(prefix="psoups-pg-"))
        self.data = self.root / "data"
        self.log = self.root / "server.log"
        self.as_postgres = os.geteuid() == 0
        self.url = f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/postgres"

    def _run(self, *command: str) -> subprocess.CompletedProcess:
        argv = [str(self.bindir / command[0]), *command[1:]]
        if self.as_postgres:
            argv = ["runuser", "-u", "postgres", "--", *argv]
        return subprocess.run(argv, capture_output=True, text=True, timeout=120)

    def __enter__(self) -> PostgresServer:
        try:
            return self._start()
        except BaseException:
            shutil.rmtree(self.root, ignore_errors=True)
            raise

    def _start(self) -> PostgresServer:
        if self.as_postgres:
            shutil.chown(self.root, "postgres", "postgres")
            self.root.chmod(0o700)
        result = self._run("initdb", "-D", str(self.data), "-U", "postgres", "--auth=trust",
                           "--no-sync", "-E", "UTF8")  # fmt: skip
        if result.returncode:
            raise RuntimeError(f"initdb failed: {result.stderr[-2000:]}")
        options = f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1 -c fsync=off"
        result = self._run("pg_ctl", "-D", str(self.data), "-o", options, "-l", str(self.log),
                           "-w", "-t", "60", "start")  # fmt: skip
        if result.returncode:
            log = self.log.read_text() if self.log.exists() else ""
            raise RuntimeError(f"pg_ctl start failed: {result.stderr[-2000:]}{log[-2000:]}")
        return self

    @property
    def pid(self) -> int:
        return int((self.data / "postmaster.pid").read_text().split()[0])

    def __exit__(self, *exc) -> None:
        try:
            pid = self.pid
            result = self._run("pg_ctl", "-D", str(self.data), "-m", "fast", "-w", "stop")
            if result.returncode:  # pg_ctl could not stop it: the postmaster, by its pid
                os.kill(pid, signal.SIGTERM)
        except (FileNotFoundError, ProcessLookupError):
            pass
        finally:
            shutil.rmtree(self.root, ignore_errors=True)
