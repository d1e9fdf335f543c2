"""Rate limits on rollback plans: which new ones wait (``max_rollbacks``, ``rearm_cooldown``).

``hold`` decides on a draft before it is committed; ``Releases`` owns the timers that let a
cooldown's waiting plans run when it ends. Counts and re-arm times come from the store.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass, replace

import structlog

from rollbackd.config import DaemonConfig, RateLimit
from rollbackd.engine import Event
from rollbackd.errors import RollbackdError
from rollbackd.records import IncidentDraft

log = structlog.get_logger("rollbackd.limits")

APPROVAL = "approval"
"""Past ``max_rollbacks``: the plan waits for ``rollbackd approve``."""
COOLDOWN = "cooldown"
"""Within ``rearm_cooldown`` of a re-arm: the plan waits for the cooldown to end."""


@dataclass(frozen=True, slots=True)
class Limits:
    """The ``[daemon]`` keys that make plans wait."""

    max_rollbacks: RateLimit | None = None
    rearm_cooldown: float | None = None

    @classmethod
    def of(cls, daemon: DaemonConfig) -> Limits:
        """The limits of a ``[daemon]`` table."""
        return cls(daemon.max_rollbacks, daemon.rearm_cooldown)


def hold(
    draft: IncidentDraft,
    limits: Limits,
    *,
    released: Callable[[float, str], int],
    rearmed_at: Callable[[str], float | None],
) -> IncidentDraft:
    """The draft as it must open: waiting for approval or for a cooldown, or unchanged.

    Only rollbacks wait. ``released(since, mode)`` counts the rollback plans of ``mode`` let
    run after ``since``; ``rearmed_at(monitor)`` is the monitor's last re-arm. Approval comes
    first: a plan past the limit waits for an operator even within a cooldown.
    """
    if draft.event is not Event.ROLLBACK:
        return draft
    limit = limits.max_rollbacks
    if limit is not None:
        used = released(draft.opened_at - limit.per, draft.mode)
        if used >= limit.count:
            why = f"max_rollbacks {limit.count} per {duration_text(limit.per)} reached"
            return _waiting(draft, APPROVAL, why, released=used)
    cooldown = limits.rearm_cooldown
    rearmed = rearmed_at(draft.monitor) if cooldown is not None else None
    if cooldown is not None and rearmed is not None and draft.opened_at < rearmed + cooldown:
        why = f"rearm_cooldown {duration_text(cooldown)} after the re-arm"
        return _waiting(draft, COOLDOWN, why, rearmed_at=rearmed, until=rearmed + cooldown)
    return draft


def _waiting(draft: IncidentDraft, waiting: str, why: str, **more: float) -> IncidentDraft:
    """The draft waiting for ``waiting``; its details say why (they reach the record)."""
    wait = {"for": waiting, "reason": why, **more}
    return replace(draft, waiting=waiting, details={**draft.details, "wait": wait})


def until(details: dict[str, object], default: float) -> float:
    """When a cooldown's waiting plan may run, as ``hold`` wrote it (else ``default``)."""
    wait = details.get("wait")
    at = wait.get("until") if isinstance(wait, dict) else None
    return float(at) if isinstance(at, int | float) else default


_UNITS = (("d", 86400), ("h", 3600), ("m", 60), ("s", 1))


def duration_text(seconds: float) -> str:
    """``3600`` -> ``1h``, ``90`` -> ``1m30s``: a duration as the config writes it."""
    if seconds != int(seconds) or seconds <= 0:
        return f"{seconds:g}s"
    left, parts = int(seconds), []
    for unit, size in _UNITS:
        if left >= size:
            parts.append(f"{left // size}{unit}")
            left %= size
    return "".join(parts)


class Releases:
    """Timers that end cooldowns: at its time, each calls ``release(incident)`` once.

    Every timer is a task owned here; ``stop()`` cancels them (they are set again at the
    next start from the store).
    """

    def __init__(
        self, release: Callable[[str], None], *, clock: Callable[[], float] = time.time
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

    def pending(self) -> list[str]:
        """The incidents with a timer set."""
        return list(self._timers)

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
            self._release(incident_id)
        except RollbackdError as exc:  # e.g. the store failing: released at the next start
            log.error("release_failed", incident=incident_id, error=str(exc), retry="at next start")
