"""The state database's schema: its migrations, applied in order, and the connection settings.

A database from a newer rollbackd, or one that is not a rollbackd store, is refused.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

from rollbackd.errors import StateError

MIGRATIONS: tuple[tuple[str, ...], ...] = (
    # 1: the first schema. Check results are compact JSON rows (see _encode_results).
    (
        """CREATE TABLE monitors (
            name TEXT PRIMARY KEY, phase TEXT NOT NULL,
            consecutive_failures INTEGER NOT NULL, consecutive_errors INTEGER NOT NULL,
            alerted INTEGER NOT NULL, blind_alerted INTEGER NOT NULL,
            failure_times TEXT NOT NULL, incident_id TEXT,
            checks INTEGER NOT NULL, last_check_at REAL, last_outcome TEXT)""",
        """CREATE TABLE checks (
            id INTEGER PRIMARY KEY, monitor TEXT NOT NULL, at REAL NOT NULL,
            outcome TEXT NOT NULL, results TEXT NOT NULL)""",
        "CREATE INDEX checks_by_monitor ON checks (monitor, id)",
        """CREATE TABLE incidents (
            id TEXT PRIMARY KEY, monitor TEXT NOT NULL, event TEXT NOT NULL,
            reason TEXT NOT NULL, mode TEXT NOT NULL,
            opened_at REAL NOT NULL, finished_at REAL, details TEXT NOT NULL)""",
        "CREATE INDEX incidents_by_monitor ON incidents (monitor, opened_at)",
        "CREATE INDEX incidents_unfinished ON incidents (opened_at) WHERE finished_at IS NULL",
        """CREATE TABLE steps (
            incident_id TEXT NOT NULL REFERENCES incidents (id), step INTEGER NOT NULL,
            action TEXT NOT NULL,
            status TEXT NOT NULL CHECK (status IN
                ('pending', 'running', 'ok', 'failed', 'skipped', 'would_run')),
            attempts INTEGER NOT NULL DEFAULT 0, started_at REAL, finished_at REAL,
            detail TEXT NOT NULL DEFAULT '',
            PRIMARY KEY (incident_id, step)) WITHOUT ROWID""",
    ),
)
"""``MIGRATIONS[i]`` takes the schema from version ``i`` to ``i + 1``; append, never edit."""

SCHEMA_VERSION = len(MIGRATIONS)


def configure(conn: sqlite3.Connection, path: Path) -> None:
    """WAL with synchronous=FULL: a committed check survives a power cut, readers never block."""
    mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
    if str(mode).lower() != "wal":
        raise StateError(f"state database {path}: cannot use WAL journaling (got {mode})")
    conn.execute("PRAGMA synchronous = FULL")
    conn.execute("PRAGMA foreign_keys = ON")


def migrate(conn: sqlite3.Connection, path: Path) -> None:
    """Apply the missing migrations in order, each in its own transaction."""
    while True:
        conn.execute("BEGIN IMMEDIATE")  # another process may be migrating: decide under lock
        try:
            done = _migrate_one(conn, path)
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")
        if done:
            return


def _migrate_one(conn: sqlite3.Connection, path: Path) -> bool:
    """Apply the next migration; True when the schema is already current."""
    tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    if "schema_version" not in tables:
        if tables:
            raise StateError(
                f"{path} is an SQLite database but not a rollbackd state store (no schema_version "
                "table): point daemon.state_dir at another directory"
            )
        conn.execute("CREATE TABLE schema_version (version INTEGER NOT NULL)")
        conn.execute("INSERT INTO schema_version VALUES (0)")
    rows = conn.execute("SELECT version FROM schema_version").fetchall()
    if len(rows) != 1 or not isinstance(rows[0][0], int):
        raise StateError(
            f"state database {path} has a damaged schema_version table: restore it from a "
            "backup, or move it aside to start with empty state"
        )
    version: int = rows[0][0]
    if version > SCHEMA_VERSION:
        raise StateError(
            f"state database {path} has schema version {version}, newer than this rollbackd "
            f"understands ({SCHEMA_VERSION}): run the newer rollbackd, or move the file aside "
            "to start with empty state"
        )
    if version == SCHEMA_VERSION:
        return True
    for statement in MIGRATIONS[version]:
        conn.execute(statement)
    conn.execute("UPDATE schema_version SET version = ?", (version + 1,))
    return False
