"""When checks run: one job per interval, a slow monitor delays no other, none overlaps itself."""

from __future__ import annotations

import asyncio
import datetime as dt
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

from rollbackd.schedule import Schedule


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
