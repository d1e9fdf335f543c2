"""Incident policy: which incident a decision, a failed plan or a re-arm opens, and who hears it.

Pure: it builds drafts and views; the monitor, the daemon and the plan runner commit and run them.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

from rollbackd.actions import Incident
from rollbackd.codec import check_to_json
from rollbackd.config import MonitorConfig
from rollbackd.engine import Check, Event, Transition
from rollbackd.records import IncidentDraft, IncidentRecord


def for_transition(
    monitor: str,
    config: MonitorConfig,
    check: Check,
    transition: Transition,
    history: Callable[[int], Sequence[Check]],
    *,
    mode: str,
    now: float,
) -> IncidentDraft | None:
    """The incident a check's transition opens (rollback, else alert, else blind), if any.

    ``history(n)`` returns the monitor's ``n`` previous checks, oldest first: the streak
    behind the decision goes into the incident (read only when there is one).
    """
    events = transition.events
    if Event.ROLLBACK in events:
        event, actions = Event.ROLLBACK, config.on_rollback
    elif Event.ALERT in events:
        event, actions = Event.ALERT, config.on_alert
    elif Event.BLIND in events:
        event, actions = Event.BLIND, config.on_alert
    elif Event.SHADOW in events:  # no rollback step: the people who hear alerts hear it
        event, actions = Event.SHADOW, config.on_alert
    else:
        return None
    streak = max(config.rollback_after, config.blind_after) - 1
    previous = list(history(streak)) if streak else []
    return IncidentDraft(
        monitor=monitor,
        event=event,
        reason=transition.reason,
        mode=mode,
        opened_at=now,
        actions=tuple(actions),
        details={
            "trigger": check_to_json(check),
            "checks": [check_to_json(c) for c in [*previous, check]],
            "state": {
                "consecutive_failures": transition.state.consecutive_failures,
                "consecutive_errors": transition.state.consecutive_errors,
                "rollback_after": config.rollback_after,
            },
        },
    )


def failed_steps(record: IncidentRecord) -> list[str]:
    """``action (detail)`` of each failed step, for logs and the follow-up alert."""
    return [f"{s.action} ({s.detail})" for s in record.failed_steps()]


def for_incomplete_rollback(
    record: IncidentRecord, config: MonitorConfig | None, now: float
) -> IncidentDraft | None:
    """A rollback ended with failed steps: the alert incident telling ``on_alert`` so."""
    if record.event is not Event.ROLLBACK or not record.failed_steps():
        return None
    if config is None or not config.on_alert:
        return None
    failed = failed_steps(record)
    return IncidentDraft(
        monitor=record.monitor,
        event=Event.ALERT,
        reason=f"rollback {record.id} incomplete: failed steps: {'; '.join(failed)}",
        mode=record.mode,
        opened_at=now,
        actions=tuple(config.on_alert),
        details={"rollback": record.id, "failed_steps": failed},
    )


def for_waiting(
    record: IncidentRecord, config: MonitorConfig | None, now: float
) -> IncidentDraft | None:
    """A rollback's plan waits (approval or cooldown): the alert incident telling ``on_alert``."""
    if record.event is not Event.ROLLBACK or record.waiting is None:
        return None
    if config is None or not config.on_alert:
        return None
    wait = record.details.get("wait")
    why = wait.get("reason") if isinstance(wait, dict) else None
    if record.waiting == "approval":
        reason = (
            f"rollback {record.id} waits for approval: {why or 'held'}; "
            f"rollbackd approve {record.id} runs it"
        )
    else:
        until = wait.get("until") if isinstance(wait, dict) else None
        at = time.strftime("%H:%M:%SZ", time.gmtime(until)) if until is not None else "soon"
        reason = (
            f"rollback {record.id} waits for the re-arm cooldown: {why or 'held'}; runs at {at}"
        )
    return IncidentDraft(
        monitor=record.monitor,
        event=Event.ALERT,
        reason=reason,
        mode=record.mode,
        opened_at=now,
        actions=tuple(config.on_alert),
        details={"rollback": record.id, "waiting": record.waiting, "wait": wait},
    )


def resolvers(config: MonitorConfig, resolves: Callable[[str], bool]) -> tuple[str, ...]:
    """``on_alert`` and the rollback steps whose type resolves: whoever told people.

    Only these hear of a re-arm; the plan's other steps (flag, routing) must not run again.
    """
    names = [*config.on_alert, *(a for a in config.on_rollback if resolves(a))]
    return tuple(dict.fromkeys(names))


def for_rearm(
    monitor: str,
    told: tuple[str, ...],
    previous: IncidentRecord | None,
    *,
    mode: str,
    now: float,
    remember: bool = False,
) -> IncidentDraft | None:
    """The re-arm incident that resolves ``previous``'s alerts, when anyone must hear it.

    ``remember``: open it even when nobody must hear it, since its time starts a
    ``rearm_cooldown`` (and the store keeps it across restarts).
    """
    if not told and not remember:
        return None
    return IncidentDraft(
        monitor=monitor,
        event=Event.REARM,
        reason=f"re-armed by operator (was incident {previous.id if previous else None})",
        mode=mode,
        opened_at=now,
        actions=told,
        details={
            "resolves": previous.id if previous else None,
            "trigger": previous.details.get("trigger") if previous else None,
        },
    )


def view(record: IncidentRecord, environment: str) -> Incident:
    """What an action is told about the incident it acts on."""
    return Incident(
        id=record.id,
        monitor=record.monitor,
        event=record.event,
        reason=record.reason,
        started_at=record.opened_at,
        mode=record.mode,
        environment=environment,
        details=record.details,
    )


def for_test(action: str, *, mode: str, environment: str, now: float) -> Incident:
    """``rollbackd test-action``: the incident an action fired on purpose is told about."""
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(now))
    return Incident(
        id=f"{stamp}-test-{action}",
        monitor="test",
        event=Event.TEST,
        reason=f"fired on purpose by rollbackd test-action {action}",
        started_at=now,
        mode=mode,
        environment=environment,
    )
