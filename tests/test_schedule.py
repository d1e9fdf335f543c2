"""When checks run: one job per interval, a slow monitor delays no other, none overlaps itself."""

from __future__ import annotations

import asyncio
import datetime as dt
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

from rollbackd.schedule import Schedule
from rollbackd.sources import Arrival


@dataclass
class FakeRunner:
    """A monitor whose check takes ``takes`` seconds; counts checks and overlaps."""

    interval: float
    takes: float
    checks: int = 0
    running: int = 0
    most: int = 0
    push: bool = False
    config: Any = field(init=False)

    def __post_init__(self) -> None:
        self.config = SimpleNamespace(interval=self.interval)

    async def tick(self) -> None:
        """One check."""
        self.running += 1
        self.most = max(self.most, self.running)
        await asyncio.sleep(self.takes)
        self.checks += 1
        self.running -= 1

    async def idle(self) -> None:
        """Nothing in flight after stop()."""


async def test_slow_monitor_delays_no_other_and_never_overlaps() -> None:
    """A 0.5 s check on a 50 ms interval runs alone; its 50 ms neighbour keeps its pace."""
    slow, fast = FakeRunner(0.05, 0.5), FakeRunner(0.05, 0.0)
    schedule = Schedule({"slow": slow, "fast": fast})  # type: ignore[dict-item]
    schedule.start()
    await asyncio.sleep(0.6)
    await schedule.stop()
    assert fast.checks >= 8, fast
    assert slow.most == 1, "never two checks of one monitor at once"
    assert 1 <= slow.checks <= 2


async def test_one_job_per_interval_and_next_runs_kept() -> None:
    """Monitors sharing an interval share a job; next_runs names every monitor."""
    runners = {f"m{i}": FakeRunner(30.0, 0.0) for i in range(5)}
    runners["other"] = FakeRunner(60.0, 0.0)
    later = dt.datetime.now(dt.UTC) + dt.timedelta(seconds=20)
    schedule = Schedule(runners)  # type: ignore[arg-type]
    schedule.start({"other": later})
    jobs = schedule._scheduler.get_jobs()  # type: ignore[union-attr]
    assert len(jobs) == 2
    runs = schedule.next_runs()
    assert set(runs) == set(runners)
    assert runs["other"] == later
    await schedule.stop()


@dataclass
class PushRunner:
    """A push monitor whose arrival checks take ``takes`` seconds; records each topic judged."""

    name: str
    takes: float
    judged: list[str] = field(default_factory=list)
    push: bool = True
    config: Any = field(default_factory=lambda: SimpleNamespace(interval=3600.0))

    async def tick(self) -> None:
        """Interval checks are not what this test counts."""

    async def arrival(self, arrival: Arrival) -> None:
        """One check per arrival."""
        await asyncio.sleep(self.takes)
        self.judged.append(arrival.topic)

    async def idle(self) -> None:
        """Nothing in flight after stop()."""


def arrival(monitor: str, n: int) -> Arrival:
    """Arrival number ``n`` for ``monitor`` (its topic tells which)."""
    return Arrival(monitor=monitor, source="broker", topic=str(n), readings={})


async def test_a_reload_hands_queued_and_new_arrivals_to_the_next_schedule() -> None:
    """Arrivals queued at a reload, or arriving during it, are each judged once, in order.

    The new runner takes over after the arrival in hand: none lost, none judged twice.
    """
    old = PushRunner("m", takes=0.01)
    schedule = Schedule({"m": old})  # type: ignore[dict-item]
    schedule.start()
    for n in range(20):
        schedule.arrival(arrival("m", n))
    await asyncio.sleep(0.035)  # a few judged, one in hand, the rest queued
    backlogs = await schedule.stop(handover=True)
    for n in range(20, 30):  # the reload is still building the new parts
        schedule.arrival(arrival("m", n))
    new = PushRunner("m", takes=0.0)
    following = Schedule({"m": new}, backlogs=backlogs)  # type: ignore[dict-item]
    following.start()
    for n in range(30, 40):
        following.arrival(arrival("m", n))
    await asyncio.sleep(0.1)
    await following.stop()
    assert 1 <= len(old.judged) < 20, "the old runner stops after the arrival in hand"
    assert old.judged + new.judged == [str(n) for n in range(40)]
    assert backlogs["m"].dropped == 0


async def test_a_monitor_that_no_longer_pushes_drops_its_handed_queue_counted() -> None:
    """A reload that removes a push monitor drops (and counts) the arrivals left for it."""
    schedule = Schedule({"m": PushRunner("m", takes=1.0)})  # type: ignore[dict-item]
    schedule.start()
    for n in range(5):
        schedule.arrival(arrival("m", n))
    await asyncio.sleep(0.01)
    backlogs = await schedule.stop(handover=True)
    Schedule({}, backlogs=backlogs)
    assert backlogs["m"].dropped == 4, "one was judged (in hand), four were left"
