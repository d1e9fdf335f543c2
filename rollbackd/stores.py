"""The store as the daemon sees it: one async interface, SQLite or PostgreSQL behind it.

``StateStore`` is what monitors, plans and waiting plans ask of a store. ``SqliteState``
puts the embedded ``state.Store`` behind it: its calls stay synchronous and short (no thread
hop), so a check costs what it cost before. ``pgstate.PgState`` is the shared store of a
high-availability pair. Every method is one transaction; a check, its state change and its
incident are one transaction in both.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

from rollbackd.engine import Check, MonitorState
from rollbackd.records import IncidentDraft, IncidentRecord
from rollbackd.rolloutlog import GateChecks, RolloutLog
from rollbackd.rollouts import RolloutState
from rollbackd.state import Store
from rollbackd.waitlog import WaitLog

SHOWN_INCIDENTS = 10
"""Incidents /status lists."""


class StateStore(Protocol):
    """The daemon's state store: counters, latches, incidents, plan progress, waiting plans."""

    @property
    def where(self) -> str:
        """Where the state lives, for messages (a path or a redacted URL)."""

    @property
    def leading(self) -> bool:
        """True while this daemon may commit decisions and run plans (always, on SQLite)."""

    async def monitor_state(self, monitor: str) -> MonitorState | None:
        """The committed state of ``monitor``, or None if it never committed a check."""

    async def recent_checks(self, monitor: str, limit: int) -> list[Check]:
        """The newest ``limit`` checks of ``monitor``, oldest first (``limit`` <= ``history``)."""

    async def commit_check(
        self,
        check: Check,
        state: MonitorState,
        history: int,
        incident: IncidentDraft | None = None,
    ) -> str | None:
        """Append ``check``, save ``state``, open ``incident``: one transaction; the incident id."""

    async def save_state(
        self, monitor: str, state: MonitorState, incident: IncidentDraft | None = None
    ) -> str | None:
        """Replace the state of ``monitor`` (a re-arm), opening ``incident`` with it."""

    async def open_incident(self, draft: IncidentDraft) -> str:
        """Create an incident with pending steps outside a check; its id."""

    async def step_started(self, incident_id: str, step: int, now: float) -> int:
        """Mark a step running, count the attempt; the attempt number."""

    async def step_failed(self, incident_id: str, step: int, *, lasting: bool) -> int:
        """Count a failed attempt; the lasting failures."""

    async def step_interrupted(self, incident_id: str, step: int) -> int:
        """A step found running at resume becomes pending; the interruptions."""

    async def reopen_failed_steps(self, incident_id: str) -> list[int]:
        """``rollbackd retry``: failed steps become pending; their numbers."""

    async def step_finished(
        self, incident_id: str, step: int, status: str, detail: str, now: float
    ) -> None:
        """Record a step's final status and detail."""

    async def finish_incident(self, incident_id: str, now: float) -> None:
        """Mark an incident finished."""

    async def incident(self, incident_id: str) -> IncidentRecord:
        """One incident with its steps; StateError if there is none."""

    async def incidents(self, monitor: str | None = None, limit: int = 20) -> list[IncidentRecord]:
        """The newest incidents, of one monitor or of all, newest first."""

    async def unfinished_incidents(self) -> list[IncidentRecord]:
        """Incidents whose plan has not finished, oldest first."""

    async def rollbacks_released(self, since: float, mode: str) -> int:
        """Rollback plans of ``mode`` let run after ``since`` (``max_rollbacks``)."""

    async def rearmed_at(self, monitor: str) -> float | None:
        """When ``monitor`` was last re-armed, if ever."""

    async def waiting_incidents(self) -> list[IncidentRecord]:
        """Incidents whose plan waits (approval, cooldown), oldest first."""

    async def approve(self, incident_id: str, now: float) -> str | None:
        """Let a waiting plan run; what it waited for (None if it did not wait)."""

    async def release(self, incident_id: str, waiting: str) -> bool:
        """Let a plan waiting for ``waiting`` run; False if it did not wait for that."""

    async def rollout(self, name: str) -> RolloutState | None:
        """The saved state of rollout ``name``, or None if it never ran."""

    async def save_rollout(self, name: str, state: RolloutState, now: float) -> None:
        """Write the state of rollout ``name`` (fenced: only the leader writes)."""

    async def replace_rollout(
        self,
        name: str,
        expected: RolloutState,
        state: RolloutState,
        now: float,
        draft: IncidentDraft | None = None,
    ) -> str | bool:
        """Write ``state`` only if the saved state is still ``expected``, opening ``draft``.

        The new incident's id (with a draft), True (without), or False when the saved state
        changed meanwhile. A promotion's draft becomes ``promoting`` in the same transaction
        (see ``RolloutLog.replace_if``); fenced like ``commit_check``.
        """

    async def gate_checks(self, monitor: str, after: int, within: int) -> GateChecks:
        """A gate's ok and breaching checks since a hold began, and whether an incident runs.

        Counted among ``monitor``'s newest ``within`` (``history``) checks with an id after
        ``after`` (the hold's baseline).
        """

    async def newest_check(self) -> int:
        """The id of the newest check of any monitor (0 when there is none)."""

    async def flush(self) -> None:
        """Write the quiet checks held for the group commit (every second)."""

    async def close(self) -> None:
        """Flush and close."""

    def shown(self) -> tuple[list[IncidentRecord], list[IncidentRecord]]:
        """For /status, without waiting: the newest incidents and the waiting ones.

        SQLite reads them now; PostgreSQL answers what its last ``flush`` read (<= 1 s old).
        """

    def shown_released(self, since: float, mode: str) -> int:
        """For /status, without waiting: ``rollbacks_released`` (as of the last flush on PG)."""


class SqliteState:
    """``StateStore`` over the embedded SQLite ``Store`` (the single-daemon default)."""

    def __init__(self, store: Store) -> None:
        self.store = store
        """The synchronous store (tests and tools read it directly)."""
        self._waits = WaitLog(store)
        self._rollouts = RolloutLog(store)

    @classmethod
    def open(cls, state_dir: Path) -> SqliteState:
        """Open ``state_dir/state.db`` (see ``Store.open``)."""
        return cls(Store.open(state_dir))

    @property
    def where(self) -> str:
        return str(self.store.path)

    @property
    def leading(self) -> bool:
        return True

    async def monitor_state(self, monitor: str) -> MonitorState | None:
        return self.store.monitor_state(monitor)

    async def recent_checks(self, monitor: str, limit: int) -> list[Check]:
        return self.store.recent_checks(monitor, limit)

    async def commit_check(
        self,
        check: Check,
        state: MonitorState,
        history: int,
        incident: IncidentDraft | None = None,
    ) -> str | None:
        return self.store.commit_check(check, state, history, incident)

    async def save_state(
        self, monitor: str, state: MonitorState, incident: IncidentDraft | None = None
    ) -> str | None:
        return self.store.save_state(monitor, state, incident)

    async def open_incident(self, draft: IncidentDraft) -> str:
        return self.store.open_incident(draft)

    async def step_started(self, incident_id: str, step: int, now: float) -> int:
        return self.store.step_started(incident_id, step, now)

    async def step_failed(self, incident_id: str, step: int, *, lasting: bool) -> int:
        return self.store.step_failed(incident_id, step, lasting=lasting)

    async def step_interrupted(self, incident_id: str, step: int) -> int:
        return self.store.step_interrupted(incident_id, step)

    async def reopen_failed_steps(self, incident_id: str) -> list[int]:
        return self.store.reopen_failed_steps(incident_id)

    async def step_finished(
        self, incident_id: str, step: int, status: str, detail: str, now: float
    ) -> None:
        self.store.step_finished(incident_id, step, status, detail, now)

    async def finish_incident(self, incident_id: str, now: float) -> None:
        self.store.finish_incident(incident_id, now)

    async def incident(self, incident_id: str) -> IncidentRecord:
        return self.store.incident(incident_id)

    async def incidents(self, monitor: str | None = None, limit: int = 20) -> list[IncidentRecord]:
        return self.store.incidents(monitor, limit)

    async def unfinished_incidents(self) -> list[IncidentRecord]:
        return self.store.unfinished_incidents()

    async def rollbacks_released(self, since: float, mode: str) -> int:
        return self._waits.rollbacks_released(since, mode)

    async def rearmed_at(self, monitor: str) -> float | None:
        return self._waits.rearmed_at(monitor)

    async def waiting_incidents(self) -> list[IncidentRecord]:
        return self._waits.waiting_incidents()

    async def approve(self, incident_id: str, now: float) -> str | None:
        return self._waits.approve(incident_id, now)

    async def release(self, incident_id: str, waiting: str) -> bool:
        return self._waits.release(incident_id, waiting)

    async def rollout(self, name: str) -> RolloutState | None:
        return self._rollouts.load(name)

    async def save_rollout(self, name: str, state: RolloutState, now: float) -> None:
        self._rollouts.save(name, state, now)

    async def replace_rollout(
        self,
        name: str,
        expected: RolloutState,
        state: RolloutState,
        now: float,
        draft: IncidentDraft | None = None,
    ) -> str | bool:
        return self._rollouts.replace_if(name, expected, state, now, draft)

    async def gate_checks(self, monitor: str, after: int, within: int) -> GateChecks:
        return self._rollouts.gate_checks(monitor, after, within)

    async def newest_check(self) -> int:
        return self._rollouts.newest_check()

    async def flush(self) -> None:
        self.store.flush()

    async def close(self) -> None:
        self.store.close()

    def shown(self) -> tuple[list[IncidentRecord], list[IncidentRecord]]:
        return self.store.incidents(limit=SHOWN_INCIDENTS), self._waits.waiting_incidents()

    def shown_released(self, since: float, mode: str) -> int:
        return self._waits.rollbacks_released(since, mode)


def as_state(store: StateStore | Store) -> StateStore:
    """The async view of ``store`` (a bare SQLite ``Store`` is wrapped)."""
    return SqliteState(store) if isinstance(store, Store) else store
