"""A throwaway PostgreSQL server for tests: its own cluster in a temporary directory.

Why a real server: the PostgreSQL journal's guarantees (group commit durable at
COMMIT, reconnect after the server went away) are the server's behaviour, which no
mock has. Debian's `postgresql` package provides initdb and pg_ctl; a clean CI image
lacks it, so the helper installs it with apt-get (CI runs as root) rather than
skipping: a job that cannot run these tests must fail, not go green without them.

initdb refuses to run as root, so as root the cluster belongs to `nobody`, in a
directory of its own under /tmp (pytest's own temp dirs are root's, mode 0700). The
server listens on 127.0.0.1 (a free port) and on a unix socket inside that directory,
with trust authentication for those local connections only. fsync stays on: the
journal's durability is what the tests are about.
"""
from __future__ import annotations

import contextlib
import glob
import itertools
import os
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Iterator

import pytest

SUPERUSER = "postgres"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def postgres_bin() -> Path:
    """The newest installed PostgreSQL's bin directory; installs Debian's package if none."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(Path(p).parts[-3]))
    if not found:
        if os.geteuid() != 0:
            raise RuntimeError("PostgreSQL is not installed (no /usr/lib/postgresql/*/bin/initdb) and this "
                               "user cannot install it: run `apt-get install -y postgresql` as root")
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        for cmd in (["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", "postgresql"]):
            out = subprocess.run(cmd, env=env, capture_output=True, text=True)
            if out.returncode != 0:
                raise RuntimeError(f"{' '.join(cmd)} failed: {out.stderr.strip()[-2000:]}")
        found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(Path(p).parts[-3]))
    return Path(found[-1]).parent


class Postgres:
    """One cluster: `start`, `stop` (fast shutdown, as an operator's restart does),
    `url(db)`, and `new_database()` for a test of its own."""

    def __init__(self, root: Path, bin_dir: Path):
        self.root, self.bin = root, bin_dir
        self.data, self.sockets, self.log = root / "data", root / "sockets", root / "server.log"
        self.port = _free_port()
        self._names = itertools.count(1)
        self.startup_s = 0.0  # initdb + first start, for the report

    def _as_owner(self, *cmd: str | Path) -> subprocess.CompletedProcess:
        prefix = ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups"] if os.geteuid() == 0 else []
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LC_ALL": "C.UTF-8", "HOME": str(self.root)}
        out = subprocess.run([*prefix, *map(str, cmd)], cwd=self.root, env=env, capture_output=True, text=True,
                             timeout=120)
        if out.returncode != 0:
            log = self.log.read_text(errors="replace")[-2000:] if self.log.exists() else ""
            raise RuntimeError(f"{Path(cmd[0]).name} failed ({out.returncode}): {out.stderr.strip()}\n{log}")
        return out

    def init(self) -> None:
        self.sockets.mkdir()
        if os.geteuid() == 0:
            for path in (self.root, self.sockets):
                shutil.chown(path, "nobody", "nogroup")
        self._as_owner(self.bin / "initdb", "-D", self.data, "-U", SUPERUSER, "--auth=trust",
                       "-E", "UTF8", "--locale=C")

    def start(self) -> None:
        opts = (f"-p {self.port} -k {self.sockets} -c listen_addresses=127.0.0.1 "
                "-c max_connections=40 -c shared_buffers=16MB")
        self._as_owner(self.bin / "pg_ctl", "-D", self.data, "-l", self.log, "-o", opts, "-w", "-t", "60", "start")

    def stop(self) -> None:
        self._as_owner(self.bin / "pg_ctl", "-D", self.data, "-m", "fast", "-w", "stop")

    @property
    def running(self) -> bool:
        return (self.data / "postmaster.pid").exists()

    def url(self, db: str = "postgres", socket_dir: bool = False) -> str:
        if socket_dir:
            return f"postgresql://{SUPERUSER}@/{db}?host={self.sockets}&port={self.port}"
        return f"postgresql://{SUPERUSER}@127.0.0.1:{self.port}/{db}"

    def sql(self, statement: str, db: str = "postgres") -> list[tuple]:
        """Run one statement as the superuser, outside any transaction (CREATE DATABASE)."""
        import psycopg

        with psycopg.connect(self.url(db), autocommit=True) as conn:
            cur = conn.execute(statement)
            return cur.fetchall() if cur.description else []

    def new_database(self) -> str:
        name = f"test_{os.getpid()}_{next(self._names)}"
        self.sql(f"CREATE DATABASE {name}")
        return self.url(name)


@contextlib.contextmanager
def throwaway_postgres() -> Iterator[Postgres]:
    """A started cluster; stopped and deleted afterwards, whatever happened."""
    root = Path(tempfile.mkdtemp(prefix="pg-"))  # short: the socket path must fit in 107 bytes
    pg = Postgres(root, postgres_bin())
    try:
        t0 = time.monotonic()
        pg.init()
        pg.start()
        pg.startup_s = time.monotonic() - t0
        yield pg
    finally:
        try:
            if pg.running:
                pg.stop()
        finally:
            shutil.rmtree(root, ignore_errors=True)


_shared: list = []  # [ExitStack, Postgres, users] while a session fixture holds the server


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[Postgres]:
    """One server for the session. Test modules import this fixture (conftest.py is not
    ours to change), and pytest then makes one session fixture per importing module:
    they share the server, which the last of them stops."""
    if not _shared:
        stack = contextlib.ExitStack()
        _shared[:] = [stack, stack.enter_context(throwaway_postgres()), 0]
    _shared[2] += 1
    try:
        yield _shared[1]
    finally:
        _shared[2] -= 1
        if _shared[2] == 0:
            stack = _shared[0]
            _shared.clear()
            stack.close()


@pytest.fixture
def postgres_url(postgres_server: Postgres) -> str:
    """A fresh, empty database on the session's server, for this test alone."""
    if not postgres_server.running:  # a test that stopped it failed before starting it again
        postgres_server.start()
    return postgres_server.new_database()
