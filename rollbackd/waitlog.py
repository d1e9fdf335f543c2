"""The store's record of plans that wait (``max_rollbacks``, ``rearm_cooldown``).

Its own statements, each one transaction of the ``Store``; ``limits`` decides, ``waiting``
runs the daemon's side.
"""

from __future__ import annotations

from dataclasses import dataclass

from rollbackd.errors import StateError
from rollbackd.records import IncidentRecord
from rollbackd.state import Store


@dataclass(frozen=True, slots=True)
class WaitLog:
    """Counts, approvals and releases of waiting plans in one store."""

    store: Store

    def rollbacks_released(self, since: float, mode: str) -> int:
        """Rollback incidents of ``mode`` whose plan was let run after ``since``.

        A plan is let run when its incident opens not waiting for approval (a re-arm's
        cooldown only delays it), or when an operator approves it (counted at that time).
        """
        with self.store.transaction("counting rollbacks") as conn:
            row = conn.execute(
                "SELECT COUNT(*) FROM incidents WHERE event = 'rollback' AND mode = ? "
                "AND COALESCE(waiting, '') != 'approval' "
                "AND COALESCE(approved_at, opened_at) > ?",
                (mode, since),
            ).fetchone()
        return int(row[0])

    def rearmed_at(self, monitor: str) -> float | None:
        """When ``monitor`` was last re-armed (its newest re-arm incident), if ever."""
        with self.store.transaction("reading the last re-arm") as conn:
            row = conn.execute(
                "SELECT MAX(opened_at) FROM incidents WHERE monitor = ? AND event = 'rearm'",
                (monitor,),
            ).fetchone()
        return None if row is None or row[0] is None else float(row[0])

    def waiting_incidents(self) -> list[IncidentRecord]:
        """Return the incidents whose plan waits (approval or cooldown), oldest first."""
        return self.store.select_incidents(
            "WHERE finished_at IS NULL AND waiting IS NOT NULL ORDER BY opened_at", ()
        )

    def approve(self, incident_id: str, now: float) -> str | None:
        """Let a waiting plan run: clear ``waiting``, set ``approved_at``; what it waited for.

        None when the incident is not waiting (already approved, released or never held);
        StateError when there is no such incident. The check and the change are one
        transaction, so of concurrent approvals exactly one gets the reason back.
        """
        with self.store.transaction("approving an incident", write=True) as conn:
            row = conn.execute(
                "SELECT waiting FROM incidents WHERE id = ?", (incident_id,)
            ).fetchone()
            if row is None:
                raise StateError(f"no incident {incident_id!r} in {self.store.path}")
            if row[0] is None:
                return None
            conn.execute(
                "UPDATE incidents SET waiting = NULL, approved_at = ? WHERE id = ?",
                (now, incident_id),
            )
        return str(row[0])

    def release(self, incident_id: str, waiting: str) -> bool:
        """Let a plan waiting for ``waiting`` run (its cooldown passed); False if it was not."""
        with self.store.transaction("releasing an incident", write=True) as conn:
            released = conn.execute(
                "UPDATE incidents SET waiting = NULL WHERE id = ? AND waiting = ?",
                (incident_id, waiting),
            ).rowcount
        return released == 1
