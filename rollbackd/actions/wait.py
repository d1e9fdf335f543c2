"""The ``wait`` action: let in-flight work complete, until a source query reads 0 or time runs out.

Running out of time is a success whose detail says how much was still in flight: the wait is
a bound the operator chose, and the plan must go on to switch the routing back regardless.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from pydantic import model_validator

from rollbackd.actions import ActionContext, ActionType, OptionsAction
from rollbackd.config import RuleConfig
from rollbackd.errors import ActionError
from rollbackd.options import Duration, Frozen
from rollbackd.readings import Reading, ReadingStatus

DEFAULT_LIMIT = 120.0
"""How long a wait lasts when nobody set a deadline."""
MARGIN = 1.0
"""At most this much of the step's time is kept back to report before the runner cancels.

``wait`` stops polling a little before ``ctx.deadline``, so reaching the step's timeout is
reported as "timed out with N in flight" rather than as a cancelled, failed step.
"""


class WaitOptions(Frozen):
    """``wait``: poll ``query`` (or ``topic``) of ``source`` every ``poll`` until it reads 0."""

    source: str
    query: str | None = None
    topic: str | None = None
    json_field: str | None = None
    poll: Duration = 5.0

    @model_validator(mode="after")
    def _one_of(self) -> WaitOptions:
        if (self.query is None) == (self.topic is None):
            raise ValueError("give exactly one of query / topic")
        return self


def in_flight(readings: Sequence[Reading]) -> tuple[float | None, str]:
    """Sum the readings' values; ``(None, reason)`` when some series has no usable value."""
    if not readings:
        return None, "unknown (no series)"
    for reading in readings:
        if reading.status is not ReadingStatus.OK or reading.value is None:
            return None, f"unknown ({reading.reason or reading.status})"
    total = sum(r.value for r in readings if r.value is not None)
    return total, f"{total:g}"


@dataclass(slots=True)
class WaitAction(OptionsAction[WaitOptions]):
    """Polls a source until every series reads 0 (or less), or the step's time is nearly up.

    ``clock`` stamps each read (unix seconds); the wait itself is timed on the event loop's
    clock, the one ``ctx.deadline`` is given in. The source belongs to the daemon.
    """

    clock: Callable[[], float] = time.time

    def watches(self) -> list[RuleConfig]:
        """The reads this action makes, so the daemon can have push sources subscribe."""
        return [self.rule()]

    def rule(self) -> RuleConfig:
        """Build the rule-like read the source answers (the threshold is not used)."""
        o = self.options
        return RuleConfig(
            name=f"wait:{self.name}",
            source=o.source,
            query=o.query,
            topic=o.topic,
            json_field=o.json_field,
            above=0.0,
        )

    async def run(self, ctx: ActionContext) -> str:
        """Poll until drained ("drained ...") or out of time ("timed out with N in flight")."""
        source = ctx.sources.get(self.options.source)
        if source is None:
            raise ActionError(f"source {self.options.source!r} is not configured or not running")
        loop = asyncio.get_running_loop()
        started = loop.time()
        deadline = ctx.deadline
        if deadline is None:
            deadline = started + DEFAULT_LIMIT
        end = deadline - min(MARGIN, 0.1 * max(0.0, deadline - started))
        rule, polls, last = self.rule(), 0, "unknown"
        while (remaining := end - loop.time()) > 0:
            try:
                async with asyncio.timeout(remaining):
                    readings = await source.read(rule, self.clock())
            except TimeoutError:
                break
            polls += 1
            value, last = in_flight(readings)
            if value is not None and all(r.value is not None and r.value <= 0 for r in readings):
                took = loop.time() - started
                return f"drained: reads 0 after {polls} polls ({took:.1f}s)"
            await asyncio.sleep(max(0.0, min(self.options.poll, end - loop.time())))
        took = loop.time() - started
        return f"timed out with {last} in flight after {polls} polls ({took:.1f}s)"


WAIT = ActionType(options=WaitOptions, build=WaitAction)
