"""What the store keeps about incidents: drafts to open, incidents as stored, their steps."""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from rollbackd.engine import Event


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

    def failed_steps(self) -> list[StepRecord]:
        """The steps that ended failed."""
        return [s for s in self.steps if s.status is StepStatus.FAILED]


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
