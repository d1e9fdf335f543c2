"""Rate limits on rollback plans: which new ones wait (``max_rollbacks``, ``rearm_cooldown``).

Pure: ``hold`` decides on a draft before it is committed, from counts and times it is
given; ``waiting`` does the I/O around it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

from rollbackd.config import DaemonConfig, RateLimit
from rollbackd.engine import Event
from rollbackd.records import IncidentDraft

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
