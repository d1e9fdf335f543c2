"""What the store keeps about incidents: drafts to open, incidents as stored, their steps."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from rollbackd.codec import result_to_json
from rollbackd.engine import Check, Event


class StepStatus(StrEnum):
    """Where one step of an incident's plan stands."""

    PENDING = "pending"
    RUNNING = "running"  # an attempt started (after a crash: interrupted)
    OK = "ok"
    FAILED = "failed"
    SKIPPED = "skipped"
    WOULD_RUN = "would_run"  # dry-run: recorded, not acted

    @property
    def final(self) -> bool:
        """A resumed plan does not touch a step in a final status again."""
        return self in _FINAL


_FINAL = frozenset({StepStatus.OK, StepStatus.FAILED, StepStatus.SKIPPED, StepStatus.WOULD_RUN})


@dataclass(frozen=True, slots=True)
class StepRecord:
    """Progress of one step of an incident's plan."""

    incident_id: str
    step: int
    action: str
    status: StepStatus
    attempts: int
    started_at: float | None
    finished_at: float | None
    detail: str
    failures: int = 0
    """Attempts that failed for a lasting cause (these use up ``retries``)."""
    interruptions: int = 0
    """Attempts cut short by the daemon dying (they use up nothing, up to a bound)."""
    first_started_at: float | None = None
    """When the first attempt started (``give_up_after`` counts from here)."""

    def document(self) -> dict[str, Any]:
        """The step as the incident record shows it."""
        took = None
        if self.started_at is not None and self.finished_at is not None:
            took = round(self.finished_at - self.started_at, 6)
        return {
            "step": self.step,
            "action": self.action,
            "status": self.status,
            "attempts": self.attempts,
            "started_at": self.started_at,
            "finished_at": self.finished_at,
            "seconds": took,
            "detail": self.detail,
        }


@dataclass(frozen=True, slots=True)
class IncidentRecord:
    """An incident as stored, with its steps in plan order."""

    id: str
    monitor: str
    event: Event
    reason: str
    mode: str
    opened_at: float
    finished_at: float | None
    details: dict[str, Any]
    steps: tuple[StepRecord, ...]
    waiting: str | None = None
    """Why its plan has not started: ``approval`` or ``cooldown`` (see IncidentDraft)."""
    approved_at: float | None = None
    """When an operator approved its waiting plan (``rollbackd approve``)."""

    def failed_steps(self) -> list[StepRecord]:
        """The steps that ended failed."""
        return [s for s in self.steps if s.status is StepStatus.FAILED]

    def document(
        self, samples: Sequence[Check], *, environment: str, config_sha256: str, at: float
    ) -> dict[str, Any]:
        """The incident record written when its plan finishes.

        Its trigger, recent samples of every rule, the config's hash, every step with its
        result and times.
        """
        recent: dict[str, list[dict[str, Any]]] = {}
        for check in samples:
            for result in check.results:
                sample = result_to_json(result)
                recent.setdefault(sample.pop("rule"), []).append(sample)
        return {
            "id": self.id,
            "monitor": self.monitor,
            "event": self.event,
            "reason": self.reason,
            "mode": self.mode,
            "environment": environment,
            "opened_at": self.opened_at,
            "finished_at": at,
            "config_sha256": config_sha256,
            "waiting": self.waiting,
            "approved_at": self.approved_at,
            "details": self.details,
            "recent_samples": recent,
            "steps": [s.document() for s in self.steps],
        }


@dataclass(frozen=True, slots=True)
class IncidentDraft:
    """An incident to open: its actions become steps 0..n-1, all pending."""

    monitor: str
    event: Event
    reason: str
    mode: str
    opened_at: float
    actions: tuple[str, ...]
    details: dict[str, Any]
    waiting: str | None = None
    """Why its plan must not start yet: ``approval`` (past ``max_rollbacks``) or ``cooldown``
    (a re-arm's ``rearm_cooldown``); None runs it at once."""
