"""The state database's schema: its migrations, applied in order, and the connection settings.

A database from a newer rollbackd, or one that is not a rollbackd store, is refused.
"""

from __future__ import annotations

import itertools
import json
import re
import secrets
import sqlite3
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from rollbackd.codec import compact
from rollbackd.engine import Event, MonitorState, Outcome, Phase
from rollbackd.errors import StateError
from rollbackd.records import IncidentDraft, IncidentRecord, StepRecord, StepStatus

MIGRATIONS: tuple[tuple[str, ...], ...] = (
    # 1: the first schema. Check results are compact JSON rows (see codec.encode_results).
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
                ('pending', 'running', 'ok', 'failed', 'skipped', 'would_run')),  -- StepStatus
            attempts INTEGER NOT NULL DEFAULT 0, started_at REAL, finished_at REAL,
            detail TEXT NOT NULL DEFAULT '',
            PRIMARY KEY (incident_id, step)) WITHOUT ROWID""",
    ),
    # 2: retries bounded by time for transient failures, and interrupted attempts counted apart
    # from failed ones (a daemon killed mid-step must not use up the step's retries).
    (
        "ALTER TABLE steps ADD COLUMN failures INTEGER NOT NULL DEFAULT 0",
        "ALTER TABLE steps ADD COLUMN interruptions INTEGER NOT NULL DEFAULT 0",
        "ALTER TABLE steps ADD COLUMN first_started_at REAL",
    ),
    # 3: decisions at the 5 % stage: shadow rules' own streak, dependency holds, and plans
    # that wait (for an operator's approval past max_rollbacks, or a re-arm's cooldown).
    (
        "ALTER TABLE monitors ADD COLUMN shadow_failures INTEGER NOT NULL DEFAULT 0",
        "ALTER TABLE monitors ADD COLUMN shadow_alerted INTEGER NOT NULL DEFAULT 0",
        "ALTER TABLE monitors ADD COLUMN held_alerted INTEGER NOT NULL DEFAULT 0",
        "ALTER TABLE incidents ADD COLUMN waiting TEXT",
        "ALTER TABLE incidents ADD COLUMN approved_at REAL",
    ),
    # 4: progressive rollouts (rolloutlog.py): one row per rollout; its promotions are
    # incidents (event 'promote', monitor 'rollout:NAME').
    (
        """CREATE TABLE rollouts (
            name TEXT PRIMARY KEY, run INTEGER NOT NULL, step INTEGER NOT NULL,
            confirmed INTEGER NOT NULL, percent INTEGER NOT NULL, phase TEXT NOT NULL,
            hold_started_at REAL, baseline INTEGER NOT NULL, hold_done INTEGER NOT NULL,
            promoting TEXT, paused_by TEXT, latched TEXT NOT NULL, reason TEXT NOT NULL,
            updated_at REAL NOT NULL)""",
    ),
)
"""``MIGRATIONS[i]`` takes the schema from version ``i`` to ``i + 1``; append, never edit."""

SCHEMA_VERSION = len(MIGRATIONS)
_SLUG = re.compile(r"[^A-Za-z0-9_.-]+")

SAVE_STATE = (
    "INSERT OR REPLACE INTO monitors (name, phase, consecutive_failures, consecutive_errors, "
    "alerted, blind_alerted, failure_times, incident_id, checks, last_check_at, last_outcome, "
    "shadow_failures, shadow_alerted, held_alerted) "
    "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
)


def state_row(monitor: str, state: MonitorState) -> tuple[Any, ...]:
    """The ``monitors`` row of a monitor's state (``SAVE_STATE``'s parameters)."""
    return (
        monitor,
        state.phase.value,
        state.consecutive_failures,
        state.consecutive_errors,
        int(state.alerted),
        int(state.blind_alerted),
        compact(state.failure_times),
        state.incident_id,
        state.checks,
        state.last_check_at,
        None if state.last_outcome is None else state.last_outcome.value,
        state.shadow_failures,
        int(state.shadow_alerted),
        int(state.held_alerted),
    )


def state_from_row(row: tuple[Any, ...]) -> MonitorState:
    """The monitor state ``state_row`` wrote (``SELECT *`` of ``monitors``)."""
    return MonitorState(
        phase=Phase(row[1]),
        consecutive_failures=row[2],
        consecutive_errors=row[3],
        alerted=bool(row[4]),
        blind_alerted=bool(row[5]),
        failure_times=tuple(json.loads(row[6])),
        incident_id=row[7],
        checks=row[8],
        last_check_at=row[9],
        last_outcome=None if row[10] is None else Outcome(row[10]),
        shadow_failures=row[11],
        shadow_alerted=bool(row[12]),
        held_alerted=bool(row[13]),
    )


def step_from_row(*row: Any) -> StepRecord:
    """A ``steps`` row (in column order) as a StepRecord."""
    (incident_id, step, action, status, attempts, started_at, finished_at, detail, failures,
     interruptions, first_started_at) = row  # fmt: skip
    return StepRecord(
        incident_id, step, action, StepStatus(status), attempts, started_at, finished_at, detail,
        failures, interruptions, first_started_at,
    )  # fmt: skip


def connect(path: Path) -> sqlite3.Connection:
    """Open (creating if needed) the database at ``path``, configured and migrated."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise StateError(f"cannot create state directory {path.parent}: {exc.strerror}") from exc
    conn: sqlite3.Connection | None = None
    try:
        conn = sqlite3.connect(path, timeout=10.0, isolation_level=None, check_same_thread=False)
        configure(conn, path)
        migrate(conn, path)
    except (sqlite3.Error, StateError) as exc:
        if conn is not None:
            conn.close()
        if isinstance(exc, StateError):
            raise
        raise _open_error(path, exc) from exc
    return conn


CACHE_KIB = 256
"""SQLite's page cache (its default is 2,000 KiB), all of it RSS once filled: the pages a group
commit touches fit; the rest of the history (~1 MiB for 100 monitors' last 50 checks) is read
back from the OS's file cache when /status or the page asks, at no measurable cost per check."""


def configure(conn: sqlite3.Connection, path: Path) -> None:
    """WAL with synchronous=FULL: a committed check survives a power cut, readers never block."""
    mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
    if str(mode).lower() != "wal":
        raise StateError(f"state database {path}: cannot use WAL journaling (got {mode})")
    conn.execute("PRAGMA synchronous = FULL")
    conn.execute("PRAGMA foreign_keys = ON")
    conn.execute(f"PRAGMA cache_size = -{CACHE_KIB}")  # negative: KiB, not pages


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


def _open_error(path: Path, exc: sqlite3.Error) -> StateError:
    """Say what to do: permissions and disk for an unopenable file, a backup for a damaged one."""
    if isinstance(exc, sqlite3.OperationalError):  # the file itself may be fine
        return StateError(
            f"state database {path} cannot be opened ({exc}): check that the daemon's user "
            "can read and write it and its directory, and that the disk is not full"
        )
    return StateError(
        f"state database {path} cannot be read ({exc}); it is not overwritten: move it "
        "aside to start with empty state, or restore it from a backup"
    )


# --- statements the store runs ---------------------------------------------------------

INCIDENT = (
    "SELECT id, monitor, event, reason, mode, opened_at, finished_at, details, waiting, "
    "approved_at FROM incidents"
)
NEWEST = "ORDER BY opened_at DESC, rowid DESC LIMIT ?"
STEPS = (
    "SELECT incident_id, step, action, status, attempts, started_at, finished_at, detail, "
    "failures, interruptions, first_started_at FROM steps WHERE incident_id = ? ORDER BY step"
)


INSERT_CHECK = "INSERT INTO checks (monitor, at, outcome, results) VALUES (?, ?, ?, ?)"
TRIM_CHECKS = (
    "DELETE FROM checks WHERE monitor = ? AND id <= (SELECT id FROM checks "
    "WHERE monitor = ? ORDER BY id DESC LIMIT 1 OFFSET ?)"
)
"""Keep a monitor's newest ``history`` checks: parameters (monitor, monitor, history)."""


def insert_checks(
    conn: sqlite3.Connection, monitor: str, rows: list[tuple[str, float, str, str]], history: int
) -> None:
    """Append checks of one monitor and keep only its newest ``history``."""
    conn.executemany(INSERT_CHECK, rows)
    conn.execute(TRIM_CHECKS, (monitor, monitor, max(history, 1)))


INSERT_INCIDENT = (
    "INSERT INTO incidents (id, monitor, event, reason, mode, opened_at, details, waiting) "
    "VALUES (?, ?, ?, ?, ?, ?, ?, ?)"
)
INSERT_STEP = "INSERT INTO steps (incident_id, step, action, status) VALUES (?, ?, ?, ?)"


def insert_incident(conn: sqlite3.Connection, draft: IncidentDraft) -> str:
    """Insert an incident and its pending steps; return its new id."""
    incident_id = next(
        candidate
        for candidate in incident_ids(draft.monitor, draft.opened_at)
        if conn.execute("SELECT 1 FROM incidents WHERE id = ?", (candidate,)).fetchone() is None
    )
    conn.execute(INSERT_INCIDENT, incident_row(incident_id, draft))
    conn.executemany(INSERT_STEP, pending_steps(incident_id, draft))
    return incident_id


def incident_ids(monitor: str, opened_at: float) -> Iterator[str]:
    """Candidate ids, the first one unused in the store wins: ``20261125T122301Z-payments-3f9a``.

    Readable and sortable by time; each candidate carries more random digits than the last.
    """
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(opened_at))
    slug = _SLUG.sub("-", monitor).strip("-")[:40] or "monitor"
    for size in itertools.count(2):
        yield f"{stamp}-{slug}-{secrets.token_hex(size)}"


def incident_row(incident_id: str, draft: IncidentDraft) -> tuple[Any, ...]:
    """The ``INSERT_INCIDENT`` values of ``draft``."""
    details = json.dumps(draft.details, separators=(",", ":"), default=str)
    return (
        incident_id,
        draft.monitor,
        draft.event,
        draft.reason,
        draft.mode,
        draft.opened_at,
        details,
        draft.waiting,
    )


def pending_steps(incident_id: str, draft: IncidentDraft) -> list[tuple[Any, ...]]:
    """The ``INSERT_STEP`` values of ``draft``'s plan, every step pending."""
    return [(incident_id, i, action, StepStatus.PENDING) for i, action in enumerate(draft.actions)]


def incident_from_row(row: Sequence[Any], steps: Sequence[StepRecord]) -> IncidentRecord:
    """An incident from an ``INCIDENT`` row and its steps."""
    return IncidentRecord(
        id=row[0],
        monitor=row[1],
        event=Event(row[2]),
        reason=row[3],
        mode=row[4],
        opened_at=row[5],
        finished_at=row[6],
        details=json.loads(row[7]),
        steps=tuple(steps),
        waiting=row[8],
        approved_at=row[9],
    )
