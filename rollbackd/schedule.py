"""When checks run: each monitor on its interval, push monitors also on arrival.

Intervals are kept on the event loop's monotonic clock, on one grid of beats from an anchor
(the daemon's start), so a wall-clock step (NTP, a VM resumed) neither stalls nor bunches
checks, and every chore on the same grid (the group commit) wakes the process together
with the checks. A monitor's check never overlaps itself (its runner's lock); a crash costs
one check, never the daemon. A push monitor's arrivals wait in its own bounded queue,
judged one by one in order by one consumer task per monitor, owned by the schedule. A
reload hands the queues over to the next schedule, so an arrival during a reload is judged
by the new config.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping

import structlog

from rollbackd.errors import RollbackdError
from rollbackd.monitor import MonitorRunner
from rollbackd.sources import Arrival

log = structlog.get_logger("rollbackd.schedule")

BACKLOG = 10_000
"""Arrivals a push monitor may have waiting; past it the oldest are dropped (and counted)."""

STOP_DRAIN_SECONDS = 2.0
"""How long a stop keeps judging arrivals already queued before dropping the rest."""


def next_beat(anchor: float, period: float, now: float, *, after: bool = False) -> float:
    """The first beat ``anchor + k * period`` (k = 0, 1, ...) at ``now`` or later.

    With ``after``, strictly later. Computed as ``anchor + k * period`` with an integer ``k``,
    so timers on the same grid get bit-identical deadlines and run in one loop wakeup.
    """
    if now < anchor:
        return anchor
    k = math.ceil((now - anchor) / period)
    if anchor + k * period < now or (after and anchor + k * period <= now):
        k += 1
    return anchor + k * period


async def sleep_until(when: float) -> None:
    """Sleep until the event loop's clock reads ``when`` (exactly that deadline, no drift)."""
    loop = asyncio.get_running_loop()
    woken: asyncio.Future[None] = loop.create_future()
    handle = loop.call_at(when, _wake, woken)
    try:
        await woken
    finally:
        handle.cancel()


async def beats(period: float, anchor: float | None = None) -> AsyncIterator[None]:
    """Yield at every beat ``anchor + k * period`` after now, forever (the loop's clock).

    A chore on the checks' grid (``anchor``: theirs; by default now) wakes with them. A late
    wakeup goes on at the next beat still ahead: missed beats are skipped, not bunched.
    """
    loop = asyncio.get_running_loop()
    anchor = loop.time() if anchor is None else anchor
    while True:
        await sleep_until(next_beat(anchor, period, loop.time(), after=True))
        yield


def _wake(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


class _Beat:
    """One group of monitors sharing an interval: ``fire(names)`` at ``origin + n * interval``.

    A late wakeup (a blocked loop) runs the group once and goes on at the next beat still
    ahead: missed beats are skipped, never run in a burst.
    """

    def __init__(
        self,
        origin: float,
        n: int,
        interval: float,
        names: tuple[str, ...],
        fire: Callable[[tuple[str, ...]], None],
    ) -> None:
        self.origin, self.n, self.interval, self.names = origin, n, interval, names
        self._fire = fire
        self._loop = asyncio.get_running_loop()
        self._handle = self._loop.call_at(self.when, self._run)

    @property
    def when(self) -> float:
        """The next beat, on the loop's clock."""
        return self.origin + self.n * self.interval

    def _run(self) -> None:
        now = self._loop.time()
        try:
            self._fire(self.names)
        finally:
            self.n = max(self.n + 1, math.floor((now - self.origin) / self.interval) + 1)
            self._handle = self._loop.call_at(self.when, self._run)

    def cancel(self) -> None:
        """No more beats."""
        self._handle.cancel()


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
        anchor: float | None = None,
    ) -> None:
        """``backlogs``: the queues a previous schedule handed over (``stop(handover=True)``).

        ``anchor``: the loop-clock time the beats are counted from (the first schedule's
        start, kept across reloads); by default the moment ``start()`` runs.
        """
        self.monitors = monitors
        self._clock = clock
        self.anchor = anchor
        """The anchor in use (set by ``start()`` if not given): the daemon keeps it for the
        next schedule."""
        self._beats: list[_Beat] = []
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

    def start(self, next_runs: Mapping[str, float] | None = None) -> None:
        """Schedule the monitors' checks: the first at ``next_runs[name]`` (loop clock), else now.

        One timer per distinct (interval, first run) runs its monitors' checks, each in a
        task of its own: a slow monitor delays no other, and a monitor whose previous check
        still runs skips the beat (never overlaps itself). A reload passes the old schedule's
        next runs, so a reload adds no check and keeps the beats on the anchor's grid.
        """
        loop = asyncio.get_running_loop()
        now = loop.time()
        if self.anchor is None:
            self.anchor = now
        anchor = self.anchor
        next_runs = next_runs or {}
        groups: dict[tuple[float, float, int], list[str]] = {}
        for name, runner in self.monitors.items():
            self._last_tick[name] = self._clock()
            interval = runner.config.interval
            first = next_runs.get(name, now)
            steps = (first - anchor) / interval
            if steps >= 0 and abs(anchor + round(steps) * interval - first) < 1e-9:
                key = (interval, anchor, round(steps))  # on the grid: keep it exact
            else:
                key = (interval, first, 0)
            groups.setdefault(key, []).append(name)
        for (interval, origin, n), names in sorted(groups.items()):
            self._beats.append(_Beat(origin, n, interval, tuple(names), self._tick_all))
        for name, backlog in self.backlogs.items():
            consumer = self._consume(self.monitors[name], backlog)
            self._consumers[name] = loop.create_task(consumer, name=f"arrivals-{name}")

    def next_runs(self) -> dict[str, float]:
        """When each monitor's next check is due, on the loop's clock (a reload's start)."""
        return {name: beat.when for beat in self._beats for name in beat.names}

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
        beats, self._beats = self._beats, []
        for beat in beats:
            beat.cancel()
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

    def _tick_all(self, names: tuple[str, ...]) -> None:
        """The interval's tick for a group of monitors: each one's check in its own task."""
        create_task = asyncio.get_running_loop().create_task
        now = self._clock()
        for name in names:
            runner = self.monitors.get(name)
            ticking = self._ticks.get(name)
            if runner is None or (ticking is not None and not ticking.done()) or self._stopped:
                continue  # still checking since the last tick: this tick is skipped
            self._last_tick[name] = now
            self._ticks[name] = create_task(self._tick_one(name, runner))

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
