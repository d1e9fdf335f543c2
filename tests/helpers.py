"""What several test files build the same way: action contexts and async waits.

The real servers live in ``tests/servers.py``; this module starts nothing.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Mapping
from typing import Any

import pytest

from rollbackd.actions import ActionContext, Event, Incident
from rollbackd.sources import Source


def context(
    *,
    incident_id: str = "20261125T120000Z-payments-ab12",
    event: Event = Event.ROLLBACK,
    reason: str = "5 failing checks",
    started_at: float = 1_795_000_000.0,
    environment: str = "staging",
    details: Mapping[str, Any] | None = None,
    step: int = 0,
    attempt: int = 1,
    sources: Mapping[str, Source] | None = None,
    deadline: float | None = None,
) -> ActionContext:
    """One attempt of plan step ``step`` of an armed incident of monitor payments.

    The idempotency key is ``{incident_id}:{step}``, as the plan runner makes it.
    """
    incident = Incident(
        id=incident_id,
        monitor="payments",
        event=event,
        reason=reason,
        started_at=started_at,
        mode="armed",
        environment=environment,
        details=details or {},
    )
    return ActionContext(
        incident,
        step,
        attempt,
        f"{incident_id}:{step}",
        sources=sources or {},
        deadline=deadline,
    )


async def wait_until(
    condition: Callable[[], object], timeout: float = 10.0, what: str = "condition"
) -> None:
    """Poll ``condition`` on the event loop until it is truthy; fail the test at ``timeout``."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"{what} not met within {timeout}s")
        await asyncio.sleep(0.01)
