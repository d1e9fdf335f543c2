"""The wait action on its own: reads stamped by its clock, drained or timed out by the deadline."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from functools import partial

from rollbackd.actions.wait import WAIT, WaitAction
from rollbackd.config import RuleConfig
from rollbackd.readings import Reading, ok
from rollbackd.sources import ArrivalListener
from tests import helpers


class StampedSource:
    """A poll source that records the ``now`` of every read and answers from a script."""

    name = "prom"
    push = False

    def __init__(self, values: Sequence[float]) -> None:
        self.values = list(values)
        self.stamps: list[float] = []

    def watch(self, monitor: str, rule: RuleConfig) -> None:
        """Accept any rule."""

    def add_listener(self, listener: ArrivalListener) -> None:
        """Ignore listeners: it is polled."""

    async def start(self) -> None:
        """Nothing to start."""

    async def aclose(self) -> None:
        """Nothing to close."""

    async def read(self, rule: RuleConfig, now: float) -> Sequence[Reading]:
        """Return the next scripted value (the last one repeats), stamped ``now``."""
        self.stamps.append(now)
        value = self.values.pop(0) if len(self.values) > 1 else self.values[0]
        return [ok(value, now)]


# Step 1 of a rollback of monitor payments; a test passes the ``sources`` it can read.
context = partial(helpers.context, incident_id="i-1", reason="test", started_at=0.0, step=1)


def action(clock: float = 1_795_000_000.0) -> WaitAction:
    """A wait on ``prom`` polling every 10 ms, whose clock always says ``clock``."""
    options = WAIT.options.model_validate({"source": "prom", "query": "q", "poll": "10ms"})
    return WaitAction("drain", options, clock=lambda: clock)


async def test_wait_reads_are_stamped_by_its_clock() -> None:
    """Every read the wait makes carries the injected clock's time, not the host's."""
    source = StampedSource([2.0, 1.0, 0.0])
    detail = await action(clock=42.0).run(context(sources={"prom": source}))
    assert detail.startswith("drained: reads 0 after 3 polls")
    assert source.stamps == [42.0, 42.0, 42.0]


async def test_wait_ends_before_the_deadline_saying_what_is_left() -> None:
    """A drain that never reaches 0 reports what was in flight, before the runner's deadline."""
    source = StampedSource([5.0])
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 0.3
    detail = await action().run(context(sources={"prom": source}, deadline=deadline))
    assert loop.time() < deadline
    assert detail.startswith("timed out with 5 in flight after ")


def test_wait_does_not_resolve() -> None:
    """The wait action tells nobody, so it does not declare that it resolves alerts."""
    assert not WAIT.resolves
