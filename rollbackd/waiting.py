"""Plans that wait, at run time: gate a check's draft, start or hold what it opened, approve.

The decision is ``limits.hold``; this module reads the store for it, alerts and logs the
plans it holds, owns the timers that end cooldowns, and reports how many wait.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextlib import asynccontextmanager
from typing import Any

import structlog

from rollbackd import incidents, limits
from rollbackd.config import Config
from rollbackd.engine import Event
from rollbackd.errors import RollbackdError, StateError
from rollbackd.inflight import PlanTasks
from rollbackd.records import IncidentDraft, IncidentRecord
from rollbackd.stores import StateStore

log = structlog.get_logger("rollbackd.waiting")


class Waiting:
    """The daemon's waiting plans; ``stop()`` cancels its cooldown timers."""

    def __init__(
        self,
        plans: PlanTasks,
        *,
        store: Callable[[], StateStore],
        config: Callable[[], Config],
        on_count: Callable[[Mapping[str, int]], None],
        clock: Callable[[], float] = time.time,
    ) -> None:
        """``store`` and ``config``: the open store and the running config, asked each time."""
        self._plans = plans
        self._store = store
        self._config = config
        self._on_count = on_count
        self._clock = clock
        self._releases = Releases(self._release, clock=clock)
        self._deciding = asyncio.Lock()
        """Held from a rollback's gate to its commit, and by what else counts (``counted``)."""

    @asynccontextmanager
    async def gate(self, draft: IncidentDraft) -> AsyncIterator[IncidentDraft]:
        """A check's draft as it must open, held until its commit ends (a monitor's ``plan_gate``).

        A rollback's count and its commit are one step of this daemon: of the monitors that
        roll back at once, each gate reads the count the commits before it extended. The
        leader is the only committer (a deposed one's writes are refused by their fence), so
        a lock in this process is enough on PostgreSQL too. Other drafts take no lock.
        """
        if draft.event is not Event.ROLLBACK:
            yield draft
            return
        async with self._deciding:
            yield await self._held(draft)

    @asynccontextmanager
    async def counted(self) -> AsyncIterator[None]:
        """Hold off the rollbacks' gates while a rollback they count opens or is approved.

        An approval, or an operator's rollout abort: neither waits, both count in
        ``max_rollbacks``; so neither lands between another rollback's gate and its commit.
        """
        async with self._deciding:
            yield

    async def _held(self, draft: IncidentDraft) -> IncidentDraft:
        """The rollback's draft as ``limits.hold`` decides on the store's counts."""
        store = self._store()
        try:
            known = limits.Limits.of(self._config().daemon)
            released = rearmed = None
            if known.max_rollbacks is not None:
                since = draft.opened_at - known.max_rollbacks.per
                released = await store.rollbacks_released(since, draft.mode)
            if known.rearm_cooldown is not None:
                rearmed = await store.rearmed_at(draft.monitor)
            return limits.hold(
                draft,
                known,
                released=lambda _since, _mode: released or 0,
                rearmed_at=lambda _monitor: rearmed,
            )
        except StateError:  # the commit would fail too: the check is not recorded
            raise
        except Exception:  # a bug here must not block a rollback that is due: it runs
            log.exception("plan_gate_failed", monitor=draft.monitor, event=str(draft.event))
            return draft

    async def opened(self, incident_id: str) -> None:
        """A check opened an incident (a monitor's ``on_incident``): run it, or hold it."""
        store = self._store()
        try:
            record = await store.incident(incident_id)
        except StateError as exc:  # the runner reads it again, and holds a waiting one
            log.error("incident_unreadable", incident=incident_id, error=str(exc))
            self._plans.start(incident_id)
            return
        if record.waiting is None:
            self._plans.start(incident_id)
            return
        self._hold(record)
        monitor = self._config().monitors.get(record.monitor)
        draft = incidents.for_waiting(record, monitor, self._clock())
        if draft is not None:
            self._plans.start(await store.open_incident(draft))
        await self.count()

    async def resume(self) -> None:
        """At start: run the plans a previous run left unfinished, hold those that wait."""
        for record in await self._plans.resume_unfinished(self._store()):
            self._hold(record)
        await self.count()

    async def approve(self, incident: str) -> dict[str, Any]:
        """Run a waiting plan now; of concurrent approvals exactly one does.

        UnknownIncidentError, or IncidentNotWaitingError when it does not wait.
        """
        async with self.counted():
            waited = await self._plans.approve(self._store(), incident, self._clock())
        self._releases.cancel(incident)
        await self.count()
        return {"incident": incident, "waited": waited, "plan": "started"}

    def waiting(self) -> list[IncidentRecord]:
        """The incidents whose plan waits, oldest first (for /status: see ``store.shown``)."""
        return self._store().shown()[1]

    def released_now(self) -> int | None:
        """Rollback plans let run within ``max_rollbacks.per`` until now (None: no limit)."""
        daemon = self._config().daemon
        if daemon.max_rollbacks is None:
            return None
        since = self._clock() - daemon.max_rollbacks.per
        return self._store().shown_released(since, daemon.mode)

    async def count(self) -> None:
        """Report how many plans wait, by reason."""
        counts: dict[str, int] = {}
        for record in await self._store().waiting_incidents():
            reason = record.waiting or ""
            counts[reason] = counts.get(reason, 0) + 1
        self._on_count(counts)

    async def stop(self) -> None:
        """Cancel the cooldown timers (the next start sets them again from the store)."""
        await self._releases.stop()

    def _hold(self, record: IncidentRecord) -> None:
        """Log a waiting plan; set the timer that ends its cooldown."""
        wait = record.details.get("wait")
        why = wait.get("reason") if isinstance(wait, dict) else None
        fields = {"incident": record.id, "monitor": record.monitor, "reason": why}
        if record.waiting == limits.COOLDOWN:
            until = limits.until(record.details, self._clock())
            log.warning("rollback_waiting_cooldown", **fields, until=until)
            self._releases.at(record.id, until)
        else:
            approve = f"rollbackd approve {record.id}"
            log.warning("rollback_waiting_approval", **fields, approve=approve)

    async def _release(self, incident_id: str) -> None:
        """A cooldown ended: its plan runs (unless an operator approved it already)."""
        await self._plans.release(self._store(), incident_id, limits.COOLDOWN)
        await self.count()


class Releases:
    """Timers that end cooldowns: at its time, each calls ``release(incident)`` once.

    Every timer is a task owned here; ``stop()`` cancels them.
    """

    def __init__(
        self, release: Callable[[str], Awaitable[None]], *, clock: Callable[[], float] = time.time
    ) -> None:
        self._release = release
        self._clock = clock
        self._timers: dict[str, asyncio.Task[None]] = {}

    def at(self, incident_id: str, when: float) -> None:
        """Release ``incident_id`` at ``when`` (wall-clock seconds; now if already passed)."""
        self.cancel(incident_id)
        delay = max(0.0, when - self._clock())
        task = asyncio.get_running_loop().create_task(self._later(incident_id, delay))
        self._timers[incident_id] = task

    def cancel(self, incident_id: str) -> None:
        """Forget the timer of ``incident_id`` (e.g. an operator approved it first)."""
        task = self._timers.pop(incident_id, None)
        if task is not None:
            task.cancel()

    async def stop(self) -> None:
        """Cancel every timer and wait for them to end."""
        timers = list(self._timers.values())
        self._timers.clear()
        for task in timers:
            task.cancel()
        if timers:
            await asyncio.wait(timers)

    async def _later(self, incident_id: str, delay: float) -> None:
        await asyncio.sleep(delay)
        self._timers.pop(incident_id, None)
        try:
            await self._release(incident_id)
        except RollbackdError as exc:  # e.g. the store failing: released at the next start
            log.error("release_failed", incident=incident_id, error=str(exc), retry="at next start")
