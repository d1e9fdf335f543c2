"""A real PostgreSQL for the high-availability tests: initdb + pg_ctl in a temporary directory.

It listens on 127.0.0.1 on a free port (password auth, scram) and on a Unix socket in its
directory (trust, for the test's administrator). initdb refuses to run as root: as root, the
server runs as a throwaway unprivileged user (useradd), removed afterwards. Debian's
``postgresql`` package provides the binaries (``scripts/setup --test`` installs it).

Also the configs on it: the ``[daemon]`` keys of a store on PostgreSQL, a node of an HA group
as a daemon process, and a takeover (:func:`lead`) for tests that drive a ``PgState`` directly.
"""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import psycopg
import pytest

from rollbackd.config import DaemonConfig, from_dict
from rollbackd.pgstate import PgState
from tests.helpers import config_file, daemon_table
from tests.servers import Rollbackd, free_port

ROLE = "rollbackd"
PASSWORD = "pg-" + secrets.token_hex(12)
PASSWORD_ENV = "RBD_TEST_PG_PASSWORD"
"""Where the configs below say the role's password is: set it to ``PASSWORD`` (monkeypatch)."""


def bin_dir() -> Path | None:
    """The newest ``/usr/lib/postgresql/*/bin`` holding initdb, or None."""
    found = sorted(
        Path("/usr/lib/postgresql").glob("*/bin/initdb"),
        key=lambda p: int(p.parent.parent.name) if p.parent.parent.name.isdigit() else 0,
    )
    return found[-1].parent if found else None


class Postgres:
    """One PostgreSQL cluster; ``database()`` makes a fresh database for a test."""

    def __init__(self, bindir: Path, top: Path, user: str | None) -> None:
        self.bindir, self.top, self.user = bindir, top, user
        self.data = top / "data"
        self.port = free_port()
        self.databases = 0

    def _run(self, *argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        command = [str(self.bindir / argv[0]), *argv[1:]]
        if self.user is not None:
            command = ["runuser", "-u", self.user, "--", *command]
        return subprocess.run(command, check=check, capture_output=True, text=True, timeout=120)

    def init(self) -> None:
        """initdb: trust on the socket (the test's administrator), scram on TCP."""
        self._run(
            "initdb", "-D", str(self.data), "-U", "postgres", "--auth-local=trust",
            "--auth-host=scram-sha-256", "-E", "UTF8", "--no-sync",
        )  # fmt: skip
        with (self.data / "postgresql.conf").open("a") as conf:
            conf.write(
                f"listen_addresses = '127.0.0.1'\nport = {self.port}\n"
                f"unix_socket_directories = '{self.top}'\nfsync = off\n"
                "max_connections = 100\nshared_buffers = 16MB\n"
            )

    def start(self) -> None:
        """pg_ctl start, waiting until it accepts connections."""
        self._run("pg_ctl", "-D", str(self.data), "-l", str(self.top / "server.log"), "-w", "start")

    def stop(self, mode: str = "fast") -> None:
        """pg_ctl stop (fast: sessions are cut, as in a restart)."""
        self._run("pg_ctl", "-D", str(self.data), "-m", mode, "-w", "stop", check=False)

    def restart(self, down_for: float = 0.0) -> None:
        """Stop, stay down ``down_for`` seconds, start again (same port)."""
        self.stop()
        time.sleep(down_for)
        self.start()

    def admin(self, database: str = "postgres") -> psycopg.Connection[tuple[Any, ...]]:
        """A superuser connection over the socket (autocommit)."""
        return psycopg.connect(
            host=str(self.top), port=self.port, user="postgres", dbname=database, autocommit=True
        )

    def sql(self, statement: str, database: str = "postgres") -> list[tuple[Any, ...]]:
        """Run one statement as the superuser; its rows (empty when it returns none)."""
        with self.admin(database) as conn:
            cur = conn.execute(statement.encode())
            return cur.fetchall() if cur.description else []

    def database(self, *, grant: bool = True) -> str:
        """A fresh database the rollbackd role may connect to (and create tables in)."""
        self.databases += 1
        name = f"rbd{self.databases}"
        self.sql(f"CREATE DATABASE {name}")
        self.sql(f"GRANT CONNECT ON DATABASE {name} TO {ROLE}")
        if grant:
            self.sql(f"GRANT USAGE, CREATE ON SCHEMA public TO {ROLE}", name)
        return name

    def url(self, database: str) -> str:
        """The ``daemon.state`` URL of ``database`` (no credentials)."""
        return f"postgresql://127.0.0.1:{self.port}/{database}?sslmode=disable"

    def log_lines(self) -> list[str]:
        """Every line the server logged so far."""
        path = self.top / "server.log"
        return path.read_text(errors="replace").splitlines() if path.exists() else []

    def log(self) -> str:
        """The server's log (its end)."""
        path = self.top / "server.log"
        return path.read_text(errors="replace")[-4000:] if path.exists() else ""


@contextmanager
def running() -> Iterator[Postgres]:
    """A started cluster with the ``rollbackd`` role (password ``PASSWORD``); removed after."""
    bindir = bin_dir()
    if bindir is None:
        pytest.skip("PostgreSQL is not installed (scripts/setup --test installs postgresql)")
    top = Path(tempfile.mkdtemp(prefix="rollbackd-pg-"))
    user = None
    try:
        if os.geteuid() == 0:
            if shutil.which("useradd") is None or shutil.which("runuser") is None:
                pytest.skip("as root, needs useradd and runuser to run PostgreSQL unprivileged")
            user = f"rbdpg{secrets.token_hex(3)}"
            subprocess.run(
                ["useradd", "-M", "-N", "-s", "/usr/sbin/nologin", user],
                check=True,
                capture_output=True,
            )
            shutil.chown(top, user)
        top.chmod(0o755)
        server = Postgres(bindir, top, user)
        server.init()
        server.start()
        try:
            server.sql(f"CREATE ROLE {ROLE} LOGIN PASSWORD '{PASSWORD}'")
            yield server
        finally:
            server.stop("immediate")
    finally:
        shutil.rmtree(top, ignore_errors=True)
        if user is not None:
            subprocess.run(["userdel", user], check=False, capture_output=True)


def state_keys(url: str) -> dict[str, Any]:
    """The ``[daemon]`` keys of a store on ``url``, as the rollbackd role (password from env)."""
    return {"state": url, "state_user": ROLE, "state_password": {"env": PASSWORD_ENV}}


def daemon_of(url: str, **more: Any) -> DaemonConfig:
    """A ``[daemon]`` table on ``url`` as the rollbackd role (and ``more`` keys), parsed."""
    return from_dict({"daemon": {**state_keys(url), **more}}).daemon


async def lead(store: PgState) -> int:
    """Take the lead as a takeover does: raise the generation, act with it; the generation."""
    async with store._tx("test takeover") as cur:
        await cur.execute("UPDATE leadership SET generation = generation + 1 RETURNING generation")
        row = await cur.fetchone()
    assert row is not None
    store.lead(int(row[0]))
    return int(row[0])


def ha_node(
    home: Path,
    url: str,
    node: str,
    tables: dict[str, Any],
    *,
    takeover_after: str = "1s",
    environment: str = "test",
    daemon_keys: dict[str, Any] | None = None,
) -> Rollbackd:
    """Node ``node`` of an HA group on ``url``: a daemon process in ``home`` (made), not started.

    Its config (``home/rollbackd.toml``): armed, listening on a free port, state on ``url``
    (:func:`state_keys`), ``[ha]`` with ``takeover_after``; ``tables`` adds the sources,
    monitors, actions (and rollouts); ``daemon_keys`` more ``[daemon]`` keys (``max_rollbacks``).
    """
    home.mkdir()
    port = free_port()
    daemon = {
        **daemon_table(home / "state", environment=environment, listen=f"127.0.0.1:{port}"),
        **state_keys(url),
        **(daemon_keys or {}),
    }
    ha = {"takeover_after": takeover_after, "node": node}
    return Rollbackd(config_file(home, {"daemon": daemon, "ha": ha, **tables}), port, home)
