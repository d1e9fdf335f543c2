"""The SQLite store in the state directory: counters, latches, history, incidents, plan progress.

Every write is one short transaction (WAL, synchronous=FULL), so a crash leaves the last
committed state; a database the code cannot read is an error, never a silent reset.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, fields, replace
from operator import attrgetter
from pathlib import Path
from typing import Any

from rollbackd import statedir
from rollbackd.codec import decode_results, encode_results
from rollbackd.engine import Check, MonitorState, Outcome
from rollbackd.errors import NoIncidentError, StateError
from rollbackd.records import IncidentDraft, IncidentRecord, StepRecord, StepStatus
from rollbackd.schema import (
    INCIDENT,
    INSERT_CHECK,
    NEWEST,
    SAVE_STATE,
    STEPS,
    TRIM_CHECKS,
    connect,
    incident_from_row,
    insert_checks,
    insert_incident,
    state_from_row,
    state_row,
    step_from_row,
)

DB_NAME = "state.db"


GROUP_COMMIT_SECONDS = 1.0
"""Quiet checks (counters, latch and incident unchanged) are written together at most this late."""


@dataclass(slots=True)
class _Quiet:
    """Checks of one monitor waiting for the next group commit, with its latest state."""

    rows: list[tuple[str, float, str, str]]
    state: MonitorState
    history: int


class QuietChecks:
    """Quiet checks waiting for the next group commit: per monitor its rows and latest state.

    A monitor keeps at most its ``history`` newest rows (the store keeps no more), so the
    group stays bounded while the store cannot be written. Both stores use it.
    """

    def __init__(self, clock: Callable[[], float]) -> None:
        self._clock = clock
        self.waiting: dict[str, _Quiet] = {}
        self._since: float | None = None

    def __bool__(self) -> bool:
        return bool(self.waiting)

    def get(self, monitor: str) -> _Quiet | None:
        """What ``monitor`` has waiting, if anything."""
        return self.waiting.get(monitor)

    def hold(self, row: tuple[str, float, str, str], state: MonitorState, history: int) -> bool:
        """Keep a quiet check (``row``) and its state; True once the group is due."""
        monitor = row[0]
        waiting = self.waiting.get(monitor)
        if waiting is None:
            self.waiting[monitor] = _Quiet([row], state, history)
        else:
            waiting.rows.append(row)
            if len(waiting.rows) > history:
                del waiting.rows[: len(waiting.rows) - history]
            waiting.state, waiting.history = state, history
        now = self._clock()
        if self._since is None:
            self._since = now
            return False
        return now - self._since >= GROUP_COMMIT_SECONDS

    def written(self) -> None:
        """The group is written (or must never be): start the next one."""
        self.waiting, self._since = {}, None


_durable = attrgetter(
    *(
        f.name
        for f in fields(MonitorState)
        if f.name not in {"checks", "last_check_at", "last_outcome"}
    )
)
"""The part of a state that decides anything: what a quiet check must leave unchanged."""


class Store:
    """The state database of one daemon; every method is one short transaction.

    A check that changes no counter, latch or incident (a healthy system checked again) is
    kept in memory and written with the next transaction, at most ``GROUP_COMMIT_SECONDS``
    later: a crash can lose that much check history, never a decision. Every other check is
    committed before ``commit_check`` returns.
    """

    def __init__(
        self,
        conn: sqlite3.Connection,
        path: Path,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """Use ``Store.open``; this only wraps an already migrated connection.

        ``clock`` times the group-commit window (monotonic seconds).
        """
        self._conn = conn
        self.path = path
        self._identity = _identity(path)
        self._lock = threading.RLock()
        self._quiet = QuietChecks(clock)
        self._saved: dict[str, MonitorState] = {}
        self._stored: dict[str, int] = {}
        """Per monitor, how many checks the database holds, once counted: a group commit then
        deletes just the oldest past ``history`` instead of seeking the cut."""

    @classmethod
    def open(cls, state_dir: Path, *, clock: Callable[[], float] = time.monotonic) -> Store:
        """Open (creating if needed) ``state_dir/state.db`` and bring its schema up to date."""
        path = Path(state_dir) / DB_NAME
        statedir.refuse_lost_database(path)
        conn = connect(path)
        statedir.mark_database(path)
        return cls(conn, path, clock=clock)

    def close(self) -> None:
        """Write the waiting quiet checks and close the database (later calls raise StateError)."""
        with self._lock:
            try:
                self.flush()
            finally:
                self._conn.close()

    def flush(self) -> None:
        """Write the quiet checks now (the daemon calls this every second)."""
        with self._lock:
            if self._quiet:
                # Every transaction begins by writing the quiet checks: an empty one flushes.
                with self._tx("writing checks", write=True):
                    pass

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @contextmanager
    def _tx(self, what: str, *, write: bool = False) -> Iterator[sqlite3.Connection]:
        """Run the block as one transaction; sqlite errors become StateError."""
        with self._lock:
            conn = self._conn
            quiet = self._quiet
            if write or quiet:
                self._check_identity(what)
            try:
                conn.execute("BEGIN IMMEDIATE" if write or quiet else "BEGIN")
                try:
                    stored = _write_quiet(conn, quiet.waiting, self._stored)  # reads see them
                    yield conn
                except BaseException:
                    conn.execute("ROLLBACK")
                    raise
                conn.execute("COMMIT")
            except sqlite3.Error as exc:
                raise StateError(f"state database {self.path}: {what} failed: {exc}") from exc
            self._stored.update(stored)
            quiet.written()

    def transaction(
        self, what: str, *, write: bool = False
    ) -> AbstractContextManager[sqlite3.Connection]:
        """One transaction for a concern's own statements (``with store.transaction(...)``)."""
        return self._tx(what, write=write)

    def select_incidents(self, where: str, args: tuple[Any, ...]) -> list[IncidentRecord]:
        """Incidents matching ``where`` (SQL after ``FROM incidents``), with their steps."""
        return self._incidents(f"{INCIDENT} {where}", args)

    def _check_identity(self, what: str) -> None:
        """Refuse to write into a database file that was deleted or replaced under us."""
        try:
            now = _identity(self.path)
        except FileNotFoundError:
            now = None
        if now != self._identity:
            change = "deleted" if now is None else "replaced by another file"
            raise StateError(
                f"state database {self.path}: {what} refused: the file was {change} while "
                "rollbackd ran, so nothing more can be recorded; stop rollbackd and restore "
                "state.db (the running daemon's state since then is lost)"
            )

    # --- monitors and checks --------------------------------------------------------------

    def monitor_state(self, monitor: str) -> MonitorState | None:
        """Return the saved state of ``monitor``, or None if it never committed a check."""
        with self._tx("reading monitor state") as conn:
            row = conn.execute("SELECT * FROM monitors WHERE name = ?", (monitor,)).fetchone()
        return None if row is None else state_from_row(row)

    def monitor_names(self) -> list[str]:
        """Return every monitor with saved state, sorted."""
        with self._tx("listing monitors") as conn:
            return [r[0] for r in conn.execute("SELECT name FROM monitors ORDER BY name")]

    def commit_check(
        self,
        check: Check,
        state: MonitorState,
        history: int,
        incident: IncidentDraft | None = None,
    ) -> str | None:
        """Append ``check`` (keeping the newest ``history``), save ``state`` and open ``incident``.

        All in one transaction; with an incident, the state is saved with its id as
        ``incident_id``, so a latch never exists without its incident or the other way round.
        """
        monitor = check.monitor
        row = (monitor, check.at, check.outcome.value, encode_results(check.results))
        with self._lock:
            previous = self._saved.get(monitor)
            if incident is None and previous is not None and _durable(previous) == _durable(state):
                self._hold(row, state, history)
                return None
            incident_id = None
            with self._tx("committing a check", write=True) as conn:
                insert_checks(conn, monitor, [row], history)
                if incident is not None:
                    incident_id = insert_incident(conn, incident)
                    state = replace(state, incident_id=incident_id)
                conn.execute(SAVE_STATE, state_row(monitor, state))
            self._saved[monitor] = state
            self._stored.pop(monitor, None)  # counted again at its next group commit
        return incident_id

    def _hold(self, row: tuple[str, float, str, str], state: MonitorState, history: int) -> None:
        """Keep a quiet check for the next group commit; write the group when it is due."""
        self._saved[row[0]] = state
        if self._quiet.hold(row, state, history):
            self.flush()

    def recent_checks(self, monitor: str, limit: int) -> list[Check]:
        """Return the newest ``limit`` checks of ``monitor``, oldest first.

        Ask for at most ``history`` (the database may hold up to ``TRIM_SLACK`` more).
        """
        with self._tx("reading checks") as conn:
            rows = conn.execute(
                "SELECT at, outcome, results FROM checks WHERE monitor = ? "
                "ORDER BY id DESC LIMIT ?",
                (monitor, max(limit, 0)),
            ).fetchall()
        return [
            Check(monitor, at, Outcome(outcome), decode_results(results))
            for at, outcome, results in reversed(rows)
        ]

    def save_state(
        self, monitor: str, state: MonitorState, incident: IncidentDraft | None = None
    ) -> str | None:
        """Replace the saved state of ``monitor`` (a re-arm), opening ``incident`` with it."""
        with self._lock:
            incident_id = None
            with self._tx("saving monitor state", write=True) as conn:
                if incident is not None:
                    incident_id = insert_incident(conn, incident)
                conn.execute(SAVE_STATE, state_row(monitor, state))
            self._saved[monitor] = state
        return incident_id

    # --- incidents and plan progress ------------------------------------------------------

    def open_incident(self, draft: IncidentDraft) -> str:
        """Create an incident with pending steps outside a check (alerts, test-action)."""
        with self._tx("opening an incident", write=True) as conn:
            return insert_incident(conn, draft)

    def step_started(self, incident_id: str, step: int, now: float) -> int:
        """Mark a step running and count the attempt; return the attempt number (1-based)."""
        with self._tx("starting a step", write=True) as conn:
            row = conn.execute(
                "UPDATE steps SET status = 'running', attempts = attempts + 1, started_at = ?, "
                "first_started_at = COALESCE(first_started_at, ?), finished_at = NULL "
                "WHERE incident_id = ? AND step = ? RETURNING attempts",
                (now, now, incident_id, step),
            ).fetchone()
        if row is None:
            raise StateError(f"incident {incident_id!r} has no step {step}")
        return int(row[0])

    def step_failed(self, incident_id: str, step: int, *, lasting: bool) -> int:
        """Count a failed attempt (``lasting``: one that uses up retries); the lasting count."""
        with self._tx("counting a failed attempt", write=True) as conn:
            row = conn.execute(
                "UPDATE steps SET failures = failures + ? WHERE incident_id = ? AND step = ? "
                "RETURNING failures",
                (int(lasting), incident_id, step),
            ).fetchone()
        if row is None:
            raise StateError(f"incident {incident_id!r} has no step {step}")
        return int(row[0])

    def step_interrupted(self, incident_id: str, step: int) -> int:
        """A step found running at resume: count the interruption, make it pending; the count."""
        with self._tx("counting an interrupted attempt", write=True) as conn:
            row = conn.execute(
                "UPDATE steps SET interruptions = interruptions + 1, status = 'pending' "
                "WHERE incident_id = ? AND step = ? AND status = 'running' "
                "RETURNING interruptions",
                (incident_id, step),
            ).fetchone()
        if row is None:
            raise StateError(f"incident {incident_id!r} has no running step {step}")
        return int(row[0])

    def reopen_failed_steps(self, incident_id: str) -> list[int]:
        """``rollbackd retry``: a finished incident's failed steps become pending; their numbers.

        The incident becomes unfinished, so its plan runs (only those steps) again, also after
        a crash; each step's counters start afresh.
        """
        with self._tx("reopening failed steps", write=True) as conn:
            steps = [
                int(r[0])
                for r in conn.execute(
                    "UPDATE steps SET status = 'pending', failures = 0, interruptions = 0, "
                    "first_started_at = NULL WHERE incident_id = ? AND status = 'failed' "
                    "RETURNING step",
                    (incident_id,),
                )
            ]
            if steps:
                conn.execute("UPDATE incidents SET finished_at = NULL WHERE id = ?", (incident_id,))
        return sorted(steps)

    def step_finished(
        self, incident_id: str, step: int, status: str, detail: str, now: float
    ) -> None:
        """Record a step's final status (ok, failed, skipped, would_run) and its detail."""
        if not StepStatus(status).final:
            raise StateError(f"step status {status!r} is not final")
        with self._tx("finishing a step", write=True) as conn:
            updated = conn.execute(
                "UPDATE steps SET status = ?, detail = ?, finished_at = ? "
                "WHERE incident_id = ? AND step = ?",
                (status, detail, now, incident_id, step),
            ).rowcount
        if updated != 1:
            raise StateError(f"incident {incident_id!r} has no step {step}")

    def finish_incident(self, incident_id: str, now: float) -> None:
        """Mark an incident finished (its plan ran to the end); a repeat keeps the first time."""
        with self._tx("finishing an incident", write=True) as conn:
            found = conn.execute("SELECT 1 FROM incidents WHERE id = ?", (incident_id,)).fetchone()
            conn.execute(
                "UPDATE incidents SET finished_at = ? WHERE id = ? AND finished_at IS NULL",
                (now, incident_id),
            )
        if found is None:
            raise NoIncidentError(f"no incident {incident_id!r} in {self.path}")

    def incident(self, incident_id: str) -> IncidentRecord:
        """Return one incident with its steps; StateError if there is none with this id."""
        found = self._incidents(f"{INCIDENT} WHERE id = ?", (incident_id,))
        if not found:
            raise NoIncidentError(f"no incident {incident_id!r} in {self.path}")
        return found[0]

    def incidents(self, monitor: str | None = None, limit: int = 20) -> list[IncidentRecord]:
        """Return the newest incidents, of one monitor or of all, newest first."""
        if monitor is None:
            return self._incidents(f"{INCIDENT} {NEWEST}", (limit,))
        return self._incidents(f"{INCIDENT} WHERE monitor = ? {NEWEST}", (monitor, limit))

    def unfinished_incidents(self) -> list[IncidentRecord]:
        """Return the incidents whose plan has not finished, oldest first (resume these)."""
        return self._incidents(f"{INCIDENT} WHERE finished_at IS NULL ORDER BY opened_at", ())

    def _incidents(self, query: str, args: tuple[Any, ...]) -> list[IncidentRecord]:
        with self._tx("reading incidents") as conn:
            rows = conn.execute(query, args).fetchall()
            steps: dict[str, list[StepRecord]] = {row[0]: [] for row in rows}
            for incident_id, found in steps.items():
                found.extend(step_from_row(*s) for s in conn.execute(STEPS, (incident_id,)))
        return [incident_from_row(row, steps[row[0]]) for row in rows]


TRIM_SLACK = 9
"""A group commit trims a monitor once it has this many checks past ``history`` (then back to
``history``): deleting ten adjacent rows at once costs about a fifth of a flush less than one
row every second. Reads never see the extra rows: every caller asks for at most ``history``
checks (``recent_checks``'s limit, ``gate_checks``'s ``within``)."""

TRIM_OLDEST = (
    "DELETE FROM checks WHERE id IN (SELECT id FROM checks WHERE monitor = ? ORDER BY id LIMIT ?)"
)
"""Delete a monitor's oldest checks: parameters (monitor, how many)."""
COUNT_CHECKS = "SELECT count(*) FROM checks WHERE monitor = ?"

_TOUCH_STATE = "UPDATE monitors SET checks = ?, last_check_at = ?, last_outcome = ? WHERE name = ?"
"""A quiet check's state change: only the columns outside ``_durable`` differ from the row."""


def _write_quiet(
    conn: sqlite3.Connection, quiet: dict[str, _Quiet], stored: dict[str, int]
) -> dict[str, int]:
    """Write the held quiet checks and each monitor's latest state (a few statements for all).

    A monitor's checks are held only once its row is saved with the same ``_durable`` part,
    so updating the three other columns writes the same row as ``SAVE_STATE`` (about half
    its cost: no delete and re-insert); should a row be missing, all are saved whole.
    ``stored``: the checks each monitor has in the database, where known. A known count
    trims by deleting the oldest rows past ``history`` once it is ``TRIM_SLACK`` past it; an
    unknown one seeks the cut and is counted. Returns the counts after this write (to keep
    once it commits).
    """
    if not quiet:
        return {}
    rows = [row for waiting in quiet.values() for row in waiting.rows]
    conn.executemany(INSERT_CHECK, rows)
    counts: dict[str, int] = {}
    oldest: list[tuple[str, int]] = []
    unknown: list[str] = []
    for monitor, waiting in quiet.items():
        keep = max(waiting.history, 1)
        known = stored.get(monitor)
        if known is None:
            unknown.append(monitor)
            continue
        total = known + len(waiting.rows)
        if total > keep + TRIM_SLACK:
            oldest.append((monitor, total - keep))
            total = keep
        counts[monitor] = total
    if oldest:
        conn.executemany(TRIM_OLDEST, oldest)
    for monitor in unknown:
        conn.execute(TRIM_CHECKS, (monitor, monitor, max(quiet[monitor].history, 1)))
        counts[monitor] = conn.execute(COUNT_CHECKS, (monitor,)).fetchone()[0]
    touched = conn.executemany(_TOUCH_STATE, [_touch_row(m, w.state) for m, w in quiet.items()])
    if touched.rowcount != len(quiet):
        conn.executemany(SAVE_STATE, [state_row(m, w.state) for m, w in quiet.items()])
    return counts


def _touch_row(monitor: str, state: MonitorState) -> tuple[Any, ...]:
    outcome = state.last_outcome
    return state.checks, state.last_check_at, None if outcome is None else outcome.value, monitor


def _identity(path: Path) -> tuple[int, int]:
    info = path.stat()
    return info.st_dev, info.st_ino
