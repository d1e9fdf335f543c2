"""When checks run: each monitor on its interval (APScheduler), push monitors also on arrival.

A monitor's check never overlaps itself (its runner's lock); a crash costs one check, never
the daemon. A push monitor's arrivals wait in its own bounded queue, judged one by one in
order by one consumer task per monitor, owned by the schedule. A reload hands the queues
over to the next schedule, so an arrival during a reload is judged by the new config.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import time
from collections.abc import Awaitable, Callable, Mapping

import structlog
from apscheduler.schedulers.asyncio import AsyncIOScheduler

from rollbackd.errors import RollbackdError
from rollbackd.monitor import MonitorRunner
from rollbackd.sources import Arrival

log = structlog.get_logger("rollbackd.schedule")

BACKLOG = 10_000
"""Arrivals a push monitor may have waiting; past it the oldest are dropped (and counted)."""

STOP_DRAIN_SECONDS = 2.0
"""How long a stop keeps judging arrivals already queued before dropping the rest."""


class Backlog:
    """One push monitor's arrivals waiting to be judged, in order, at most ``limit``.

    A flood past the limit drops the oldest: one warning per episode (until the queue is
    empty again), every drop counted in ``dropped``.
    """

    def __init__(self, monitor: str, limit: int = BACKLOG) -> None:
        self.monitor = monitor
        self.limit = limit
        self.dropped = 0
        """Arrivals dropped unjudged since the schedule started (flood or stop)."""
        self._queue: asyncio.Queue[Arrival | None] = asyncio.Queue()
        self._warned = False

    def __len__(self) -> int:
        return self._queue.qsize()

    def put(self, arrival: Arrival) -> None:
        """Queue ``arrival``; drop the oldest one when ``limit`` are already waiting."""
        if self._queue.qsize() >= self.limit:
            self._queue.get_nowait()
            self.dropped += 1
            if not self._warned:
                self._warned = True
                log.warning(
                    "arrivals_dropped",
                    monitor=self.monitor,
                    backlog=self.limit,
                    action="values arrive faster than this monitor's checks: the oldest "
                    "waiting values are dropped unjudged; slow the sender or split the monitor",
                )
        self._queue.put_nowait(arrival)

    async def get(self) -> Arrival | None:
        """The oldest waiting arrival, or None once closed and empty."""
        arrival = await self._queue.get()
        if self._queue.empty() and self._warned:
            self._warned = False
            log.info("arrival_backlog_cleared", monitor=self.monitor, dropped=self.dropped)
        return arrival

    def close(self) -> None:
        """No more arrivals: ``get`` returns None once those queued are taken."""
        self._queue.put_nowait(None)

    def discard(self) -> int:
        """Drop what is still queued (counted); return how many arrivals that was."""
        left = 0
        while not self._queue.empty():
            if self._queue.get_nowait() is not None:
                left += 1
        self.dropped += left
        return left


class Schedule:
    """Runs the checks of a set of monitors between ``start()`` and ``stop()``."""

    def __init__(
        self,
        monitors: Mapping[str, MonitorRunner],
        *,
        clock: Callable[[], float] = time.monotonic,
        backlog: int = BACKLOG,
        backlogs: Mapping[str, Backlog] | None = None,
    ) -> None:
        """``backlogs``: the queues a previous schedule handed over (``stop(handover=True)``)."""
        self.monitors = monitors
        self._clock = clock
        self._scheduler: AsyncIOScheduler | None = None
        self._last_tick: dict[str, float] = {}
        self._ticks: dict[str, asyncio.Task[None]] = {}
        """Each monitor's check in flight, if any."""
        handed = dict(backlogs or {})
        self.backlogs = {
            name: handed.pop(name) if name in handed else Backlog(name, backlog)
            for name, runner in monitors.items()
            if runner.push
        }
        """Per push monitor, its arrivals waiting to be judged."""
        for gone in handed.values():  # no longer a push monitor: nothing will judge these
            if left := gone.discard():
                log.warning("arrivals_dropped_at_reload", monitor=gone.monitor, dropped=left)
        self._consumers: dict[str, asyncio.Task[None]] = {}
        self._judging: set[str] = set()
        """Push monitors whose consumer is judging an arrival right now."""
        self._stopped = False
        self._handing_over = False

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
        loop = asyncio.get_running_loop()
        for name, backlog in self.backlogs.items():
            consumer = self._consume(self.monitors[name], backlog)
            self._consumers[name] = loop.create_task(consumer, name=f"arrivals-{name}")

    def next_runs(self) -> dict[str, dt.datetime]:
        """When each monitor's next check is due (a reload starts the new schedule there)."""
        if self._scheduler is None:
            return {}
        found = {}
        for job in self._scheduler.get_jobs():
            if job.next_run_time is not None:
                found.update(dict.fromkeys(job.args[0], job.next_run_time))
        return found

    def arrival(self, arrival: Arrival) -> None:
        """A push source received a value for a push monitor: queue it to be judged in order.

        Arrivals for anything else (a monitor that also polls, an action's read) are not
        checks: those monitors judge their latest values on their interval.
        """
        backlog = self.backlogs.get(arrival.monitor)
        if backlog is not None and (self._handing_over or not self._stopped):
            backlog.put(arrival)

    async def stop(self, *, handover: bool = False) -> dict[str, Backlog]:
        """Stop scheduling checks; a check in flight finishes and commits.

        Arrivals already queued are still judged for up to ``STOP_DRAIN_SECONDS``; what is
        left then is dropped, counted and logged. With ``handover`` (a reload), each push
        monitor's judging stops after the arrival in hand and its queue is returned whole,
        still taking arrivals, for the next schedule (``Schedule(backlogs=...)``).
        """
        self._stopped = True
        self._handing_over = handover
        if self._scheduler is not None:
            self._scheduler.shutdown(wait=False)
            self._scheduler = None
        if self._ticks:  # checks in flight finish and commit
            await asyncio.wait(list(self._ticks.values()))
        if handover:
            await self._hand_over()
            return self.backlogs
        for backlog in self.backlogs.values():
            backlog.close()
        consumers, self._consumers = self._consumers, {}
        if consumers:
            _, late = await asyncio.wait(consumers.values(), timeout=STOP_DRAIN_SECONDS)
            for task in late:
                task.cancel()
            if late:
                await asyncio.wait(late)
        for backlog in self.backlogs.values():
            if left := backlog.discard():
                log.warning("arrivals_dropped_at_stop", monitor=backlog.monitor, dropped=left)
        for runner in self.monitors.values():
            await runner.idle()
        return {}

    async def _hand_over(self) -> None:
        """Stop each consumer after the arrival it is judging; leave the queues as they are.

        A consumer waiting for an arrival is cancelled there, which takes nothing from the
        queue (``asyncio.Queue.get`` only removes an item once it returns).
        """
        consumers, self._consumers = self._consumers, {}
        for name, task in consumers.items():
            if name not in self._judging:
                task.cancel()
        if consumers:
            await asyncio.wait(consumers.values())
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
            ticking = self._ticks.get(name)
            if runner is None or (ticking is not None and not ticking.done()) or self._stopped:
                continue  # still checking since the last tick: this tick is skipped
            self._last_tick[name] = now
            self._ticks[name] = loop.create_task(self._tick_one(name, runner))

    async def _tick_one(self, name: str, runner: MonitorRunner) -> None:
        """One monitor's check, in its own task; then ``_ticks`` forgets the task.

        ``_guarded`` written out and no done-callback: two objects and a loop callback less
        per check. (A task cancelled before it started leaves its entry: ``_tick_all`` also
        asks ``done()``.)
        """
        try:
            await runner.tick()
        except RollbackdError as exc:
            log.error("check_failed_to_run", monitor=name, error=str(exc))
        except Exception:  # a bug must cost one check, never the daemon (logged with traceback)
            log.exception("check_crashed", monitor=name)
        finally:
            if self._ticks.get(name) is asyncio.current_task():
                del self._ticks[name]

    async def _consume(self, runner: MonitorRunner, backlog: Backlog) -> None:
        """Judge ``backlog``'s arrivals one by one, in order, until it is closed and empty.

        In a hand-over, stop once the arrival in hand is judged.
        """
        while (arrival := await backlog.get()) is not None:
            self._judging.add(runner.name)
            try:
                await _guarded(runner.arrival(arrival), runner.name)
            finally:
                self._judging.discard(runner.name)
            if self._handing_over:
                return


async def _guarded(check: Awaitable[object], monitor: str) -> None:
    try:
        await check
    except RollbackdError as exc:
        log.error("check_failed_to_run", monitor=monitor, error=str(exc))
    except Exception:  # a bug must cost one check, never the daemon (logged with traceback)
        log.exception("check_crashed", monitor=monitor)
