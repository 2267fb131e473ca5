"""A throwaway PostgreSQL server for the tests: `initdb` into a temp dir, `pg_ctl start` on
127.0.0.1 at a free port with its unix socket in the same dir, stopped (by its postmaster's pid
file, `pg_ctl -m immediate stop`) at the end.

initdb refuses to run as root: then it runs as the `postgres` user the Debian package creates
(`runuser -u postgres --`), which must be able to enter the temp dir. Without PostgreSQL the
tests skip, or fail under RELAY_REQUIRE_TOOLS=1 (tests/support/tools.py).
"""
from __future__ import annotations

import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import uuid


def binaries() -> str | None:
    """The directory holding initdb and pg_ctl (Debian keeps them out of PATH), or None."""
    found = shutil.which("pg_ctl")
    if found and shutil.which("initdb"):
        return os.path.dirname(os.path.realpath(found))
    for d in sorted(glob.glob("/usr/lib/postgresql/*/bin"), reverse=True):
        if os.access(os.path.join(d, "initdb"), os.X_OK) and os.access(os.path.join(d, "pg_ctl"), os.X_OK):
            return d
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class PostgresServer:
    USER = "relay"

    def __init__(self, bindir: str, *, durable: bool = False):
        # Tests run with fsync off (speed; a crash of the test server loses nothing that
        # matters); bench/pg_enqueue.py asks for a durable one to measure real commits.
        self.durable = durable
        self.bindir = bindir
        self.base = tempfile.mkdtemp(prefix="relay-pg-")
        self.data = os.path.join(self.base, "data")
        self.sock = os.path.join(self.base, "sock")
        self.port = _free_port()
        self._as: list[str] = []
        if os.geteuid() == 0:
            try:
                pw = pwd.getpwnam("postgres")
            except KeyError:
                raise RuntimeError("running as root and there is no 'postgres' user for initdb") from None
            os.chmod(self.base, 0o755)
            os.chown(self.base, pw.pw_uid, pw.pw_gid)
            self._as = ["runuser", "-u", "postgres", "--"]
        os.makedirs(self.sock, exist_ok=True)
        if self._as:
            os.chown(self.sock, pw.pw_uid, pw.pw_gid)

    def _run(self, *args: str, timeout: float = 60) -> None:
        subprocess.run([*self._as, *args], check=True, timeout=timeout, cwd=self.base,
                       stdout=subprocess.PIPE, stderr=subprocess.STDOUT)

    def start(self) -> "PostgresServer":
        self._run(os.path.join(self.bindir, "initdb"), "-D", self.data, "-U", self.USER, "--auth=trust",
                  "-E", "UTF8", "--no-sync")
        opts = (f"-c listen_addresses=127.0.0.1 -p {self.port} -c unix_socket_directories={self.sock} "
                + ("" if self.durable else "-c fsync=off -c full_page_writes=off ")
                + "-c max_connections=100 -c log_min_messages=warning")
        self._run(os.path.join(self.bindir, "pg_ctl"), "-D", self.data, "-w", "-t", "60", "-o", opts,
                  "-l", os.path.join(self.base, "log"), "start", timeout=90)
        return self

    def dsn(self, database: str = "postgres") -> str:
        return f"postgresql://{self.USER}@127.0.0.1:{self.port}/{database}"

    async def new_database(self) -> str:
        """A fresh empty database (one per test); returns its DSN."""
        import asyncpg
        name = "t_" + uuid.uuid4().hex[:12]
        conn = await asyncpg.connect(self.dsn())
        try:
            await conn.execute(f'CREATE DATABASE "{name}"')
        finally:
            await conn.close()
        return self.dsn(name)

    def stop(self) -> None:
        try:
            self._run(os.path.join(self.bindir, "pg_ctl"), "-D", self.data, "-m", "immediate", "-w", "stop",
                      timeout=60)
        except (subprocess.SubprocessError, OSError):
            pass
        shutil.rmtree(self.base, ignore_errors=True)
