"""A throw-away Postgres cluster for tests and benchmarks: initdb in a temporary directory,
pg_ctl start on a free port, trust authentication on 127.0.0.1 only, removed by stop().

The binaries come from PATH or Debian's /usr/lib/postgresql/<version>/bin (`.ci/run` installs the
`postgresql` package when neither has them). initdb refuses to run as root, so as root the
cluster runs as the `postgres` user the package creates (through runuser), in a directory that
user owns.
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import shutil
import subprocess
import tempfile
import uuid

from harness.servers import free_port

SUPERUSER = "postgres"  # the cluster's superuser role (initdb -U), whatever OS user runs it


def postgres_bin(tool: str) -> str | None:
    """The path of a Postgres server tool (initdb, pg_ctl), None when not installed."""
    found = shutil.which(tool)
    if found:
        return found
    versions = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{tool}"), key=lambda p: int(p.split("/")[4]))
    return versions[-1] if versions else None


def missing() -> str | None:
    """Why no cluster can be started here, or None."""
    for tool in ("initdb", "pg_ctl"):
        if postgres_bin(tool) is None:
            return f"{tool} not found (install Debian's postgresql package)"
    if os.geteuid() == 0:
        try:
            pwd.getpwnam("postgres")
        except KeyError:
            return "running as root and there is no postgres user to run the cluster as"
    return None


class PostgresCluster:
    def __init__(self) -> None:
        problem = missing()
        if problem:
            raise RuntimeError(problem)
        self.directory = tempfile.mkdtemp(prefix="pg-")
        self._prefix: list[str] = []
        if os.geteuid() == 0:
            os.chown(self.directory, pwd.getpwnam("postgres").pw_uid, pwd.getpwnam("postgres").pw_gid)
            self._prefix = ["runuser", "-u", "postgres", "--"]
        self.data = os.path.join(self.directory, "data")
        self.port = free_port()
        self._started = False
        try:
            self._run("initdb", "-D", self.data, "-U", SUPERUSER, "-A", "trust", "--no-sync", "-E", "UTF8")
            options = f"-p {self.port} -k {self.directory} -c listen_addresses=127.0.0.1"
            log = os.path.join(self.directory, "server.log")
            self._run("pg_ctl", "-D", self.data, "-l", log, "-o", options, "-w", "-t", "60", "start")
            self._started = True
        except BaseException:
            self.stop()
            raise

    def _run(self, tool: str, *args: str) -> None:
        command = [*self._prefix, postgres_bin(tool) or tool, *args]
        result = subprocess.run(command, capture_output=True, text=True, cwd=self.directory, timeout=120)
        if result.returncode != 0:
            raise RuntimeError(f"{tool} failed ({result.returncode}): {result.stderr.strip()[-2000:]}")

    def dsn(self, database: str = "postgres") -> str:
        return f"host=127.0.0.1 port={self.port} user={SUPERUSER} dbname={database}"

    def create_database(self, prefix: str = "store") -> str:
        """A new empty database; its DSN."""
        import psycopg

        name = f"{prefix}_{uuid.uuid4().hex[:12]}"
        with psycopg.connect(self.dsn(), autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return self.dsn(name)

    def stop(self) -> None:
        if self._started:
            with contextlib.suppress(RuntimeError, subprocess.TimeoutExpired):
                self._run("pg_ctl", "-D", self.data, "-m", "immediate", "-w", "stop")
            self._started = False
        shutil.rmtree(self.directory, ignore_errors=True)

    def __enter__(self) -> PostgresCluster:
        return self

    def __exit__(self, *exc_info) -> None:
        self.stop()
