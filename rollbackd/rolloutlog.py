"""The store's record of rollouts: their state, their promotions, what their gates did.

Every read and write of a rollout in the SQLite ``Store`` is here, each one transaction;
``stores.SqliteState`` offers them to the daemon, ``pgstate.PgState`` does the same with this
module's statements and rows on PostgreSQL (fenced by the leadership generation).
``rollouts`` decides and ``ramp`` runs the daemon's side. A promotion is an incident (event
``promote``, monitor ``rollout:NAME``) opened in the same transaction as the state that
points at it, so the plan runner's exactly-once machinery runs and resumes it.
"""

from __future__ import annotations

import json
import sqlite3
from dataclasses import dataclass, replace
from typing import Any

from rollbackd.engine import Event
from rollbackd.records import IncidentDraft, IncidentRecord
from rollbackd.rollouts import Phase, Promotion, RolloutState
from rollbackd.schema import insert_incident
from rollbackd.state import Store

SELECT = (
    "SELECT run, step, confirmed, percent, phase, hold_started_at, baseline, hold_done, "
    "promoting, paused_by, latched, reason, updated_at FROM rollouts WHERE name = ?"
)
UPDATE = (
    "UPDATE rollouts SET run = ?, step = ?, confirmed = ?, percent = ?, phase = ?, "
    "hold_started_at = ?, baseline = ?, hold_done = ?, promoting = ?, paused_by = ?, "
    "latched = ?, reason = ?, updated_at = ? WHERE name = ?"
)
INSERT = (
    "INSERT INTO rollouts (name, run, step, confirmed, percent, phase, hold_started_at, "
    "baseline, hold_done, promoting, paused_by, latched, reason, updated_at) "
    "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
)


def owner(rollout: str) -> str:
    """The ``monitor`` of a rollout's incidents (no configured name holds a ``:``)."""
    return f"rollout:{rollout}"


@dataclass(frozen=True, slots=True)
class GateChecks:
    """A gate monitor's checks after a hold's baseline, and whether an incident of it runs."""

    ok: int
    breaches: int
    open_incident: bool


GATE_CHECKS = (
    "SELECT outcome, COUNT(*) FROM (SELECT outcome FROM checks WHERE monitor = ? AND id > ? "
    "ORDER BY id DESC LIMIT ?) AS newest GROUP BY outcome"
)
"""A gate's checks by outcome: parameters (monitor, baseline id, ``history``)."""


@dataclass(frozen=True, slots=True)
class RolloutLog:
    """Rollout rows and their promotions in one store."""

    store: Store

    def load(self, name: str) -> RolloutState | None:
        """The saved state of rollout ``name``, or None if it never ran."""
        with self.store.transaction("reading a rollout") as conn:
            row = conn.execute(SELECT, (name,)).fetchone()
        return None if row is None else state_of(row)

    def save(self, name: str, state: RolloutState, now: float) -> None:
        """Write the state of rollout ``name``."""
        with self.store.transaction("saving a rollout", write=True) as conn:
            _write(conn, name, state, now)

    def replace_if(
        self,
        name: str,
        expected: RolloutState,
        state: RolloutState,
        now: float,
        draft: IncidentDraft | None = None,
    ) -> str | bool:
        """Write ``state`` only if the saved state is still ``expected``, opening ``draft``.

        Returns the new incident's id (with a draft), True (without), or False when the
        saved state changed meanwhile (a concurrent request won). A promotion's draft
        becomes the state's ``promoting`` in the same transaction: a promotion is never
        recorded without its plan, nor its plan without the state that waits for it.
        """
        with self.store.transaction("changing a rollout", write=True) as conn:
            row = conn.execute(SELECT, (name,)).fetchone()
            if changed(None if row is None else state_of(row), expected):
                return False
            incident_id = None if draft is None else insert_incident(conn, draft)
            if incident_id is not None and draft is not None and draft.event is Event.PROMOTE:
                state = replace(state, promoting=incident_id)
            _write(conn, name, state, now)
        return True if incident_id is None else incident_id

    def gate_checks(self, monitor: str, after: int, within: int) -> GateChecks:
        """Ok and breaching checks of ``monitor`` after ``after``; whether an incident runs.

        Counted among its newest ``within`` (``history``: the database may hold a few more
        until they are trimmed).
        """
        with self.store.transaction("reading a gate's checks") as conn:
            counts = dict(conn.execute(GATE_CHECKS, (monitor, after, max(within, 1))).fetchall())
            running = conn.execute(
                "SELECT COUNT(*) FROM incidents WHERE monitor = ? AND finished_at IS NULL",
                (monitor,),
            ).fetchone()[0]
        return GateChecks(counts.get("ok", 0), counts.get("breach", 0), bool(running))

    def newest_check(self) -> int:
        """The id of the newest check of any monitor (0 when there is none)."""
        with self.store.transaction("reading the newest check") as conn:
            row = conn.execute("SELECT MAX(id) FROM checks").fetchone()
        return int(row[0] or 0)

    def promotion(self, incident_id: str) -> Promotion:
        """Where a promotion stands: ``running``, ``ok`` (set step ok / would_run), ``failed``."""
        return promotion_of(self.store.incident(incident_id))


def promotion_of(record: IncidentRecord) -> Promotion:
    """Where a promotion's incident stands: ``running``, ``ok`` (set step ran), ``failed``."""
    if record.finished_at is None:
        return "running"
    first = record.steps[0] if record.steps else None
    return "ok" if first is not None and first.status in ("ok", "would_run") else "failed"


def changed(saved: RolloutState | None, expected: RolloutState) -> bool:
    """Whether ``saved`` moved away from ``expected`` (a concurrent change won).

    What a concurrent change would have moved: the reason and the hold's start are not it.
    """
    return saved is not None and _key(saved) != _key(expected)


def _key(state: RolloutState) -> tuple[Any, ...]:
    return (state.run, state.step, state.confirmed, state.phase, state.promoting, state.hold_done)


def values_of(state: RolloutState, now: float) -> tuple[Any, ...]:
    """The row of ``state`` after its name: ``UPDATE``'s and ``INSERT``'s parameters."""
    return (
        state.run,
        state.step,
        int(state.confirmed),
        state.percent,
        state.phase.value,
        state.hold_started_at,
        state.baseline,
        int(state.hold_done),
        state.promoting,
        state.paused_by,
        json.dumps(list(state.latched)),
        state.reason,
        now,
    )


def _write(conn: sqlite3.Connection, name: str, state: RolloutState, now: float) -> None:
    values = values_of(state, now)
    if conn.execute(UPDATE, (*values, name)).rowcount == 0:
        conn.execute(INSERT, (name, *values))


def state_of(row: tuple[Any, ...]) -> RolloutState:
    """The state of a row ``SELECT`` read."""
    (run, step, confirmed, percent, phase, hold_started_at, baseline, hold_done, promoting,
     paused_by, latched, reason, _updated_at) = row  # fmt: skip
    return RolloutState(
        run=run,
        step=step,
        confirmed=bool(confirmed),
        percent=percent,
        phase=Phase(phase),
        hold_started_at=hold_started_at,
        baseline=baseline,
        hold_done=bool(hold_done),
        promoting=promoting,
        paused_by=paused_by,
        latched=tuple(json.loads(latched)),
        reason=reason,
    )
