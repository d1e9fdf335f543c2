"""A small bounded pool of daemon threads for one concern's blocking calls (file I/O).

Unlike the event loop's default executor, a call stuck in the kernel (a FIFO, a hung NFS
mount) holds one of this pool's few threads only: it cannot starve other concerns, a later
call fails fast saying what is stuck, and the threads never hold up the process's exit.
"""

from __future__ import annotations

import asyncio
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, TypeVar

from rollbackd.errors import ActionError

T = TypeVar("T")

STUCK_AFTER = 5.0
"""Seconds after which a call still running is taken as stuck (local file edits take ms)."""


@dataclass(slots=True)
class _Job:
    what: str
    call: Callable[[], Any]
    future: Future[Any]


@dataclass(slots=True)
class BlockingPool:
    """At most ``size`` daemon threads, started on demand, running calls one at a time each."""

    name: str
    size: int = 1
    stuck_after: float = STUCK_AFTER
    _jobs: queue.SimpleQueue[_Job | None] = field(default_factory=queue.SimpleQueue, init=False)
    _threads: list[threading.Thread] = field(default_factory=list, init=False)
    _running: dict[int, tuple[str, float]] = field(default_factory=dict, init=False)
    _guard: threading.Lock = field(default_factory=threading.Lock, init=False)
    _closed: bool = field(default=False, init=False)

    async def run(self, what: str, call: Callable[[], T]) -> T:
        """Run ``call`` on one of the pool's threads; ``what`` names it in messages.

        Raises ActionError at once when every thread is held by a call running for longer
        than ``stuck_after``. Cancelling the await drops a call not yet started; a started
        one finishes (or stays stuck) on its thread.
        """
        with self._guard:
            if self._closed:
                raise ActionError(f"{self.name}: closed, {what} not run")
            self._refuse_if_stuck(what)
            if len(self._threads) < self.size and len(self._running) == len(self._threads):
                self._start_thread()
        future: Future[T] = Future()
        self._jobs.put(_Job(what, call, future))
        return await asyncio.wrap_future(future)

    def busy(self) -> list[tuple[str, float]]:
        """What the threads are running now and for how many seconds."""
        now = time.monotonic()
        with self._guard:
            return [(what, now - since) for what, since in self._running.values()]

    def close(self) -> None:
        """Stop the threads once their current call returns (a stuck one stays, as a daemon)."""
        with self._guard:
            self._closed = True
            for _ in self._threads:
                self._jobs.put(None)

    def _refuse_if_stuck(self, what: str) -> None:
        if len(self._threads) < self.size or len(self._running) < self.size:
            return
        now = time.monotonic()
        stuck = [(w, now - since) for w, since in self._running.values()]
        if all(seconds > self.stuck_after for _, seconds in stuck):
            held = "; ".join(f"{w} (blocked for {seconds:.0f}s)" for w, seconds in stuck)
            raise ActionError(
                f"{what} not started: {self.name}'s file I/O is still blocked in an earlier "
                f"call: {held}; the file system may be hung (an NFS mount?) or the path may "
                "be a pipe: check that reading it returns (e.g. stat it)"
            )

    def _start_thread(self) -> None:
        thread = threading.Thread(
            target=self._work, name=f"{self.name}-{len(self._threads)}", daemon=True
        )
        self._threads.append(thread)
        thread.start()

    def _work(self) -> None:
        me = threading.get_ident()
        while (job := self._jobs.get()) is not None:
            if not job.future.set_running_or_notify_cancel():
                continue  # its caller gave up (timeout) before it started
            with self._guard:
                self._running[me] = (job.what, time.monotonic())
            try:
                result = job.call()
            except BaseException as exc:  # noqa: BLE001 -- handed to the awaiting caller
                job.future.set_exception(exc)
            else:
                job.future.set_result(result)
            finally:
                with self._guard:
                    del self._running[me]
