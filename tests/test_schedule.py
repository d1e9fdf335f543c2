"""When checks run: one job per interval, a slow monitor delays no other, none overlaps itself."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

from rollbackd.schedule import Schedule, next_beat
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


async def test_one_timer_per_interval_and_next_runs_kept() -> None:
    """Monitors sharing an interval share a timer; next_runs names every monitor."""
    runners = {f"m{i}": FakeRunner(30.0, 0.0) for i in range(5)}
    runners["other"] = FakeRunner(60.0, 0.0)
    later = asyncio.get_running_loop().time() + 20
    schedule = Schedule(runners)  # type: ignore[arg-type]
    schedule.start({"other": later})
    assert len(schedule._beats) == 2
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


def test_next_beat_counts_whole_periods_from_the_anchor() -> None:
    """Beats are anchor + k * period: at or after now, or strictly after with ``after``."""
    assert next_beat(100.0, 1.0, 90.0) == 100.0
    assert next_beat(100.0, 1.0, 100.0) == 100.0
    assert next_beat(100.0, 1.0, 100.0, after=True) == 101.0
    assert next_beat(100.0, 1.0, 100.2) == 101.0
    assert next_beat(100.0, 30.0, 161.0) == 190.0
    assert next_beat(100.0, 1.5, 103.0, after=True) == 104.5
    # bit-identical to what another timer on the grid computes, however far from the anchor
    anchor = 12345.678
    assert next_beat(anchor, 1.0, anchor + 86_400.3) == anchor + 86_401 * 1.0


async def test_a_late_beat_runs_once_and_keeps_the_grid() -> None:
    """A loop blocked for 3.5 intervals: one check then, the next on the grid, no burst."""
    runner = FakeRunner(0.1, 0.0)
    loop = asyncio.get_running_loop()
    schedule = Schedule({"m": runner})  # type: ignore[dict-item]
    schedule.start()
    anchor = schedule.anchor
    await asyncio.sleep(0.05)  # the first check, at once
    assert runner.checks == 1
    time.sleep(0.35)  # the loop is blocked past three beats
    await asyncio.sleep(0)
    await asyncio.sleep(0.01)
    assert runner.checks == 2, "the missed beats are one check, not three"
    (when,) = set(schedule.next_runs().values())
    beats = round((when - anchor) / 0.1)
    assert when == anchor + beats * 0.1, "still on the grid"
    assert 0 < when - loop.time() <= 0.1, "the next beat still ahead, none in the past"
    await schedule.stop()


async def test_group_commit_beats_with_the_checks() -> None:
    """The group commit's deadlines are the 1 s checks' beats: one wakeup serves both."""
    loop = asyncio.get_running_loop()
    first = Schedule({"m": FakeRunner(1.0, 0.0)})  # type: ignore[dict-item]
    first.start()
    await asyncio.sleep(0.3)
    handed = first.next_runs()
    await first.stop()
    # a reload: the next schedule keeps the grid, and the chore's next beat is the same float
    runners = {"m": FakeRunner(1.0, 0.0), "added": FakeRunner(1.0, 0.0)}
    schedule = Schedule(runners, anchor=first.anchor)  # type: ignore[arg-type]
    schedule.start(handed)
    chore = next_beat(first.anchor, 1.0, loop.time(), after=True)
    assert schedule.next_runs()["m"] == chore == first.anchor + 1.0
    await asyncio.sleep(0.05)
    assert runners["added"].checks == 1, "a monitor added by the reload is checked at once"
    assert runners["m"].checks == 0, "the reload adds no check"
    await schedule.stop()
