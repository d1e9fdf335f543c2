"""The daemon's dates: unmoved by clock steps, and each step said in the log."""

from __future__ import annotations

import asyncio
import time

from structlog.testing import capture_logs

from rollbackd.clock import steady, watch_steps
from tests.helpers import wait_until


def test_steady_dates_start_at_the_wall_clock_and_ignore_its_steps() -> None:
    """Read once from the wall clock, then only the monotonic clock moves them."""
    wall = [1_000.0]
    dates = steady(lambda: wall[0])
    first = dates()
    assert 1_000.0 <= first < 1_001.0
    wall[0] += 3_600.0  # stepped an hour forward: the dates do not follow
    time.sleep(0.01)
    assert first + 0.01 <= dates() < first + 1.0


async def test_each_step_is_logged_once_with_its_size_and_the_offset() -> None:
    """+300 s, a 0.5 s wobble (not a step), then back: two warnings, the offset back to 0."""
    dates = steady()
    stepped = [0.0]

    def wall() -> float:
        return dates() + stepped[0]

    with capture_logs() as logs:
        watcher = asyncio.create_task(watch_steps(dates, wall, every=0.02))
        try:
            await asyncio.sleep(0.05)
            assert logs == []
            stepped[0] = 300.0
            await wait_until(lambda: len(logs) == 1)
            stepped[0] = 300.5
            await asyncio.sleep(0.1)
            assert len(logs) == 1
            stepped[0] = 0.0
            await wait_until(lambda: len(logs) == 2)
        finally:
            watcher.cancel()
    forward, back = logs
    assert (forward["event"], forward["log_level"]) == ("clock_stepped", "warning")
    assert (forward["seconds"], forward["offset"]) == (300.0, 300.0)
    assert (back["seconds"], back["offset"]) == (-300.0, 0.0)
