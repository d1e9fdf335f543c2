"""When checks run: each monitor on its interval (APScheduler), push monitors also on arrival.

A monitor's check never overlaps itself (its runner's lock); a crash costs one check, never
the daemon.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import functools
import time
from collections.abc import Awaitable, Callable, Mapping

import structlog
from apscheduler.schedulers.asyncio import AsyncIOScheduler

from rollbackd.errors import RollbackdError
from rollbackd.monitor import MonitorRunner

log = structlog.get_logger("rollbackd.schedule")


class Schedule:
    """Runs the checks of a set of monitors between ``start()`` and ``stop()``."""

    def __init__(
        self,
        monitors: Mapping[str, MonitorRunner],
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.monitors = monitors
        self._clock = clock
        self._scheduler: AsyncIOScheduler | None = None
        self._last_tick: dict[str, float] = {}
        self._arrivals: set[asyncio.Task[None]] = set()
        self._ticks: dict[str, asyncio.Task[None]] = {}
        """Each monitor's check in flight, if any."""
        self._stopped = False

    def start(self, next_runs: Mapping[str, dt.datetime] | None = None) -> None:
        """Schedule the monitors' checks: the first at ``next_runs[name]`` (else now).

        One scheduler job per distinct (interval, first run) runs its monitors' checks, each
        in a task of its own: a slow monitor delays no other, and a monitor whose previous
        check still runs skips the tick (never overlaps itself). A reload passes the old
        schedule's next runs, so a reload adds no check.
        """
        self._scheduler = AsyncIOScheduler(timezone=dt.UTC)
        now = dt.datetime.now(dt.UTC)
        next_runs = next_runs or {}
        groups: dict[tuple[float, dt.datetime], list[str]] = {}
        for name, runner in self.monitors.items():
            self._last_tick[name] = self._clock()
            first = next_runs.get(name, now)
            groups.setdefault((runner.config.interval, first), []).append(name)
        for n, ((interval, first), names) in enumerate(sorted(groups.items())):
            self._scheduler.add_job(
                self._tick_all,
                "interval",
                seconds=interval,
                args=[tuple(names)],
                id=f"every-{interval:g}s-{n}",
                max_instances=1,
                coalesce=True,
                misfire_grace_time=max(1, int(interval)),
                next_run_time=first,
            )
        self._scheduler.start()

    def next_runs(self) -> dict[str, dt.datetime]:
        """When each monitor's next check is due (a reload starts the new schedule there)."""
        if self._scheduler is None:
            return {}
        found = {}
        for job in self._scheduler.get_jobs():
            if job.next_run_time is not None:
                found.update(dict.fromkeys(job.args[0], job.next_run_time))
        return found

    def arrival(self, monitor: str) -> None:
        """A push source has a new value for ``monitor``: check it now (in a task)."""
        runner = self.monitors.get(monitor)
        if runner is not None and not self._stopped:
            task = asyncio.get_running_loop().create_task(_guarded(runner.arrival(), monitor))
            self._arrivals.add(task)
            task.add_done_callback(self._arrivals.discard)

    async def stop(self) -> None:
        """Stop scheduling checks; a check in flight finishes and commits."""
        self._stopped = True
        if self._scheduler is not None:
            self._scheduler.shutdown(wait=False)
            self._scheduler = None
        for task in list(self._arrivals):
            task.cancel()
        if self._arrivals:
            await asyncio.wait(self._arrivals)
        if self._ticks:  # checks in flight finish and commit
            await asyncio.wait(list(self._ticks.values()))
        for runner in self.monitors.values():
            await runner.idle()

    def overdue(self) -> str | None:
        """Why checks are not running (a monitor's scheduled check long overdue), or None."""
        now = self._clock()
        for name, runner in self.monitors.items():
            late = now - self._last_tick.get(name, now)
            if late > 3 * runner.config.interval + 30:
                return f"monitor {name} has not been checked for {late:.0f}s"
        return None

    async def _tick_all(self, names: tuple[str, ...]) -> None:
        """The interval's tick for a group of monitors: each one's check in its own task."""
        loop = asyncio.get_running_loop()
        now = self._clock()
        for name in names:
            runner = self.monitors.get(name)
            if runner is None or name in self._ticks or self._stopped:
                continue  # still checking since the last tick: this tick is skipped
            self._last_tick[name] = now
            task = loop.create_task(_guarded(runner.tick(), name))
            self._ticks[name] = task
            task.add_done_callback(functools.partial(self._done, name))

    def _done(self, name: str, _task: asyncio.Task[None]) -> None:
        self._ticks.pop(name, None)


async def _guarded(check: Awaitable[object], monitor: str) -> None:
    try:
        await check
    except RollbackdError as exc:
        log.error("check_failed_to_run", monitor=monitor, error=str(exc))
    except Exception:  # a bug must cost one check, never the daemon (logged with traceback)
        log.exception("check_crashed", monitor=monitor)
