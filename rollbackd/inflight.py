"""The plans in flight in the daemon: one task per incident, never two for the same one.

It starts, re-runs (retry), approves and drains them; ``plan.PlanRunner`` runs each one.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field

import structlog

from rollbackd.errors import (
    IncidentNotRetryableError,
    IncidentNotWaitingError,
    RollbackdError,
    StateError,
    UnknownIncidentError,
)
from rollbackd.plan import PlanRunner
from rollbackd.records import IncidentRecord
from rollbackd.stores import StateStore

log = structlog.get_logger("rollbackd.plan")


@dataclass(slots=True)
class PlanTasks:
    """The plans running in the daemon: one task per incident, never two for the same one."""

    runner: Callable[[], PlanRunner]
    """Builds a runner with the current actions (a reload swaps them for later plans)."""
    _tasks: dict[str, asyncio.Task[None]] = field(default_factory=dict, init=False)
    _again: set[str] = field(default_factory=set, init=False)

    def start(self, incident_id: str) -> None:
        """Run the incident's plan in the background; if it is running, once more after."""
        if incident_id in self._tasks:
            self._again.add(incident_id)  # e.g. a retry just as the plan was finishing
            return
        self._tasks[incident_id] = asyncio.get_running_loop().create_task(self._run(incident_id))

    async def retry(self, store: StateStore, incident_id: str) -> list[int]:
        """Re-run a finished plan's failed steps; their numbers.

        UnknownIncidentError, or IncidentNotRetryableError while it runs or if none failed.
        """
        try:
            record = await store.incident(incident_id)
        except StateError as exc:
            raise UnknownIncidentError(incident_id) from exc
        if record.finished_at is None:
            raise IncidentNotRetryableError(incident_id, "its plan is still running")
        steps = await store.reopen_failed_steps(incident_id)
        if not steps:
            raise IncidentNotRetryableError(incident_id, "no step failed")
        log.warning("plan_retried", incident=incident_id, steps=steps)
        self.start(incident_id)
        return steps

    async def approve(self, store: StateStore, incident_id: str, now: float) -> str:
        """Run a plan waiting for approval (or a cooldown) now; what it waited for.

        UnknownIncidentError, or IncidentNotWaitingError when it is not waiting: of
        concurrent approvals one starts the plan, the others are refused.
        """
        try:
            await store.incident(incident_id)
        except StateError as exc:
            raise UnknownIncidentError(incident_id) from exc
        waited = await store.approve(incident_id, now)
        if waited is None:
            raise IncidentNotWaitingError(incident_id)
        log.warning("rollback_approved", incident=incident_id, waited=waited)
        self.start(incident_id)
        return waited

    async def release(self, store: StateStore, incident_id: str, waiting: str) -> bool:
        """Run a plan whose wait for ``waiting`` is over; False if it no longer waited."""
        if not await store.release(incident_id, waiting):
            return False
        log.warning("rollback_released", incident=incident_id, waited=waiting)
        self.start(incident_id)
        return True

    async def resume_unfinished(self, store: StateStore) -> list[IncidentRecord]:
        """Start every plan a previous run left unfinished (after a crash or a stop).

        Plans that wait (approval, cooldown) are not started: they are returned instead.
        """
        waiting = []
        for incident in await store.unfinished_incidents():
            if incident.waiting is not None:
                waiting.append(incident)
                continue
            log.warning("plan_resuming", incident=incident.id, monitor=incident.monitor)
            self.start(incident.id)
        return waiting

    async def cancel(self) -> None:
        """Stop every plan at once (this daemon was deposed): the new leader resumes them."""
        running = list(self._tasks.values())
        for task in running:
            task.cancel()
        if running:
            await asyncio.wait(running)
            log.warning("plans_stopped", count=len(running), resume="by the new leader")

    async def wait(self) -> None:
        """Return once the plans running now have finished."""
        if self._tasks:
            await asyncio.wait(list(self._tasks.values()))

    async def drain(self, grace: float) -> None:
        """Give running plans ``grace`` seconds, then cancel them: they resume at next start."""
        running = list(self._tasks.values())
        if not running:
            return
        log.info("plans_finishing", count=len(running), grace_seconds=grace)
        _, pending = await asyncio.wait(running, timeout=grace)
        for task in pending:
            task.cancel()
        if pending:
            await asyncio.wait(pending)
            log.warning("plans_interrupted", count=len(pending), resume="at next start")

    async def _run(self, incident_id: str) -> None:
        again = True
        try:
            while again:
                self._again.discard(incident_id)
                try:
                    await self.runner().run(incident_id)
                except RollbackdError as exc:  # e.g. the store failing: resumed at next start
                    log.error(
                        "plan_aborted", incident=incident_id, error=str(exc), resume="at next start"
                    )
                again = incident_id in self._again
        finally:  # unregistered in the same step that decided not to run again: no lost start
            self._tasks.pop(incident_id, None)
