"""The daemon's dates: the wall clock read once, moving with the monotonic clock.

Windows, cooldowns, rate limits and holds are measured on these dates, so a system clock set
forward or back while the daemon runs neither passes them early nor stalls them. The price:
after a step, the dates the daemon shows differ from the system's (and its log lines') by the
step until it restarts. ``watch_steps`` says so in the log when it happens.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import structlog

from rollbackd.schedule import beats

log = structlog.get_logger()

STEP_SECONDS = 1.0
"""A difference this large between the system clock and the daemon's dates is a step (NTP
slews both clocks alike, by at most 0.5 ms a second; only a step moves one against the other)."""
WATCH_SECONDS = 5.0
"""How often ``watch_steps`` compares the clocks (on the checks' beats: no wakeup of its own
with 1 s intervals)."""


def steady(wall: Callable[[], float] = time.time) -> Callable[[], float]:
    """Wall-clock seconds that move with the monotonic clock: a clock step leaves them alone.

    Anchored once to ``wall()``; holds measured with it neither pass early nor stall when
    the system clock is set forward or back while the daemon runs.
    """
    anchor_wall, anchor_mono = wall(), time.monotonic()
    return lambda: anchor_wall + (time.monotonic() - anchor_mono)


async def watch_steps(
    dates: Callable[[], float],
    wall: Callable[[], float] = time.time,
    *,
    anchor: float | None = None,
    every: float = WATCH_SECONDS,
) -> None:
    """Log ``clock_stepped`` each time the system clock is stepped against ``dates`` (forever).

    ``seconds`` is this step (positive: set forward), ``offset`` how far the system clock now
    is from the daemon's dates, which stay as they were: decisions are unaffected, shown dates
    are off by ``offset`` until a restart. Beats on the loop clock from ``anchor``.
    """
    start = last = wall() - dates()
    async for _ in beats(every, anchor):
        offset = wall() - dates()
        if abs(offset - last) >= STEP_SECONDS:
            log.warning(
                "clock_stepped",
                seconds=round(offset - last, 3),
                offset=round(offset - start, 3),
                note="decisions are unaffected; the daemon's dates differ from the system's "
                "by the offset until it restarts",
            )
            last = offset
