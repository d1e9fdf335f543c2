"""The HTTP surface's listening socket: a connection cap, a header deadline, counted accept errors.

A connection that sends nothing must not hold a file descriptor for long: the rollback's own
files and sockets need them more. Accept errors (EMFILE...) are one line per window, counted.
"""

from __future__ import annotations

import asyncio
import errno
import resource
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import structlog

log = structlog.get_logger("rollbackd.api")

_ACCEPT_MARKS = ("socket.accept()", "_accept_connection", "_start_serving", "incoming connection")
"""What asyncio's messages about a failed accept contain (under EMFILE on Python 3.11: a
traceback per failed accept, ~2,000 a second, and one per pending retry after a close)."""

_BUSY_BODY = b'{"error": "busy", "message": "too many open connections to rollbackd; try again"}'
_BUSY = (
    b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
    b"Retry-After: 5\r\nConnection: close\r\nContent-Length: "
    + str(len(_BUSY_BODY)).encode("ascii")
    + b"\r\n\r\n"
    + _BUSY_BODY
)


@dataclass(frozen=True, slots=True)
class Limits:
    """How long and how many connections the HTTP surface keeps (README, "HTTP surface")."""

    max_connections: int = 256
    """Open connections at most; never more than a quarter of the open-file limit."""
    header_timeout: float = 5.0
    """Seconds from connect to the end of the first request's headers."""
    idle_timeout: float = 5.0
    """Seconds a keep-alive connection may wait for its next request."""
    backlog: int = 128
    log_every: float = 10.0
    """Refused connections and accept errors are logged at most once per this many seconds."""

    def connection_cap(self) -> int:
        """``max_connections``, lowered to a quarter of RLIMIT_NOFILE so actions keep theirs."""
        soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
        if soft == resource.RLIM_INFINITY:
            return self.max_connections
        return max(1, min(self.max_connections, soft // 4))


class Tally:
    """Counts a repeated event; logs it at once, then at most once per ``every`` with the count."""

    def __init__(
        self, event: str, every: float, *, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.event, self.every, self._clock = event, every, clock
        self._count = 0
        self._context: dict[str, Any] = {}
        self._logged_at: float | None = None
        self._flush: asyncio.TimerHandle | None = None

    def note(self, **context: Any) -> None:
        """Count one occurrence (``context`` of the latest one goes into the log line)."""
        self._count += 1
        self._context = context
        now = self._clock()
        if self._logged_at is None or now - self._logged_at >= self.every:
            self.flush()
        elif self._flush is None:
            delay = self.every - (now - self._logged_at)
            self._flush = asyncio.get_running_loop().call_later(delay, self.flush)

    def flush(self) -> None:
        """Log what was counted since the last line, if anything."""
        if self._flush is not None:
            self._flush.cancel()
            self._flush = None
        if self._count:
            log.warning(self.event, count=self._count, window_seconds=self.every, **self._context)
            self._count = 0
            self._logged_at = self._clock()


class Listener:
    """Serves an aiohttp ``web.Server`` on a TCP socket between ``start()`` and ``close()``."""

    def __init__(self, server: Callable[[], asyncio.Protocol], limits: Limits) -> None:
        self._server = server
        self.limits = limits
        self.cap = limits.connection_cap()
        self._open: set[_Guarded] = set()
        self._refused = Tally("api_connections_refused", limits.log_every)
        self._slow = Tally("api_connections_timed_out", limits.log_every)
        self._accept_failed = Tally("api_accept_failed", limits.log_every)
        self._listening: asyncio.Server | None = None
        self._previous: Callable[[asyncio.AbstractEventLoop, dict[str, Any]], object] | None = None

    @property
    def open_connections(self) -> int:
        """Connections currently held (refused ones are not)."""
        return len(self._open)

    async def start(self, host: str, port: int) -> int:
        """Bind and serve; return the bound port. OSError when the address cannot be bound."""
        loop = asyncio.get_running_loop()
        self._listening = await loop.create_server(
            self._protocol, host, port, backlog=self.limits.backlog, reuse_address=True
        )
        # Left installed after close(): accept retries asyncio scheduled still fire then.
        self._previous = loop.get_exception_handler()
        loop.set_exception_handler(self._loop_error)
        return int(self._listening.sockets[0].getsockname()[1])

    def close(self) -> None:
        """Stop accepting; connections already open are the aiohttp server's to shut down."""
        if self._listening is not None:
            self._listening.close()
            self._listening = None
        for tally in (self._refused, self._slow, self._accept_failed):
            tally.flush()

    def _protocol(self) -> asyncio.Protocol:
        if len(self._open) >= self.cap:
            self._refused.note(open=len(self._open), limit=self.cap)
            return _Refuse()
        guarded = _Guarded(self._server(), self)
        self._open.add(guarded)
        return guarded

    def timed_out(self) -> None:
        """A connection sent no complete request headers in time (it is being closed)."""
        self._slow.note(limit_seconds=self.limits.header_timeout)

    def forget(self, connection: _Guarded) -> None:
        """A connection is closed (or never opened): it no longer counts against the cap."""
        self._open.discard(connection)

    def _loop_error(self, loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        """Accept failures (EMFILE...) are one counted line per window; the rest pass on."""
        exc = context.get("exception")
        message = str(context.get("message", ""))
        if isinstance(exc, OSError | ValueError) and any(m in message for m in _ACCEPT_MARKS):
            code = getattr(exc, "errno", None)
            name = errno.errorcode.get(code, "") if code else ""
            self._accept_failed.note(error=name or type(exc).__name__, reason=str(exc))
            return
        if self._previous is not None:
            self._previous(loop, context)
        else:
            loop.default_exception_handler(context)


class _Refuse(asyncio.Protocol):
    """A connection over the cap: a 503 and closed at once, so its descriptor is freed."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.WriteTransport)
        transport.write(_BUSY)
        transport.close()


class _Guarded(asyncio.Protocol):
    """Wraps aiohttp's protocol: closed unless its first request's headers arrive in time.

    Later requests are aiohttp's ``keepalive_timeout``'s (``Limits.idle_timeout``).
    """

    def __init__(self, inner: asyncio.Protocol, owner: Listener) -> None:
        self._inner, self._owner = inner, owner
        self._transport: asyncio.BaseTransport | None = None
        self._tail = b""
        self._deadline: asyncio.TimerHandle | None = asyncio.get_running_loop().call_later(
            owner.limits.header_timeout, self._expire
        )

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport
        self._inner.connection_made(transport)

    def data_received(self, data: bytes) -> None:
        if self._deadline is not None:
            seen = self._tail + data
            if b"\r\n\r\n" in seen or b"\n\n" in seen:
                self._deadline.cancel()
                self._deadline, self._tail = None, b""
            else:
                self._tail = seen[-3:]
        self._inner.data_received(data)

    def eof_received(self) -> bool | None:
        return self._inner.eof_received()

    def pause_writing(self) -> None:
        self._inner.pause_writing()

    def resume_writing(self) -> None:
        self._inner.resume_writing()

    def connection_lost(self, exc: Exception | None) -> None:
        self._forget()
        self._inner.connection_lost(exc)

    def _expire(self) -> None:
        self._deadline = None
        if self._transport is None:  # never connected (the accept failed half-way)
            self._forget()
            return
        self._owner.timed_out()
        self._transport.close()

    def _forget(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None
        self._owner.forget(self)
