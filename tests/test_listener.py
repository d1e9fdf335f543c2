"""The HTTP listener under hostile connections: a cap, a header deadline, counted accept errors.

The last test floods a real daemon started with a low open-file limit (issue 11, item 1).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import os
import resource
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry
from structlog.testing import capture_logs

from rollbackd.api import ApiServer, Limits
from rollbackd.listener import Listener, Tally
from tests.servers import free_port, http_get, wait_for

TOKEN = "listener-token"


class Surface:
    """Healthy and empty."""

    mode = "dry-run"

    def health(self) -> tuple[bool, str]:
        """Always healthy."""
        return True, "ok"

    def status(self) -> dict[str, Any]:
        """Nothing to show."""
        return {}

    async def rearm(self, monitor: str) -> dict[str, Any]:
        """Not used here."""
        return {"monitor": monitor}


class Clock:
    """A clock the test moves."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        """The time the test set."""
        return self.now


async def test_tally_logs_once_per_window_with_a_count() -> None:
    """The first event is logged at once; the next ones are one line with their count."""
    clock = Clock()
    tally = Tally("thing_failed", 10.0, clock=clock)
    with capture_logs() as logs:
        for _ in range(500):
            tally.note(error="EMFILE")
        clock.now += 10.0
        tally.note(error="EMFILE")
        tally.flush()
    assert [(e["event"], e["count"]) for e in logs] == [("thing_failed", 1), ("thing_failed", 500)]
    assert logs[0]["error"] == "EMFILE"


async def test_tally_flushes_a_quiet_remainder_later() -> None:
    """Events after a logged line are reported when the window ends, even if none follow."""
    tally = Tally("thing_failed", 0.05)
    with capture_logs() as logs:
        tally.note()
        tally.note()
        tally.note()
        await asyncio.sleep(0.2)
    assert [e["count"] for e in logs] == [1, 2]


async def test_accept_errors_are_counted_not_tracebacks() -> None:
    """EMFILE from accept() becomes a counted warning; other loop errors go to the old handler."""
    seen: list[dict[str, Any]] = []
    loop = asyncio.get_running_loop()
    loop.set_exception_handler(lambda _loop, context: seen.append(context))
    listener = Listener(Surface, Limits())  # type: ignore[arg-type] # never asked for a protocol
    await listener.start("127.0.0.1", 0)
    try:
        emfile = OSError(errno.EMFILE, "Too many open files")
        # What asyncio says on Python 3.11: per failed accept, and per retry after a close.
        accept = {"message": "socket.accept() out of system resource", "exception": emfile}
        retry = {
            "message": "Exception in callback BaseSelectorEventLoop._start_serving(<...>)",
            "exception": ValueError("Invalid file descriptor: -1"),
        }
        with capture_logs() as logs:
            for _ in range(999):
                loop.call_exception_handler(accept)
            loop.call_exception_handler(retry)
            loop.call_exception_handler({"message": "something else", "exception": ValueError()})
            listener.close()
    finally:
        listener.close()
    assert [(e["event"], e["count"]) for e in logs] == [
        ("api_accept_failed", 1),
        ("api_accept_failed", 999),
    ]
    assert logs[0]["error"] == "EMFILE"
    assert [c["message"] for c in seen] == ["something else"]
    loop.set_exception_handler(None)


async def _read_all(reader: asyncio.StreamReader, timeout: float) -> bytes:
    return await asyncio.wait_for(reader.read(), timeout)


async def _closed(reader: asyncio.StreamReader, timeout: float) -> bool:
    """The server closed the connection (EOF, or a reset of what we wrote after)."""
    try:
        return await _read_all(reader, timeout) == b""
    except ConnectionError:
        return True


async def test_idle_connections_are_capped_and_closed() -> None:
    """Over the cap a connection gets a 503 at once; idle ones close at the header deadline."""
    limits = Limits(max_connections=3, header_timeout=0.5, idle_timeout=0.5)
    server = ApiServer(Surface(), CollectorRegistry(), TOKEN, ("127.0.0.1", 0), version="t")
    server.limits = limits
    async with server:
        idle = [await asyncio.open_connection("127.0.0.1", server.port) for _ in range(3)]
        await asyncio.sleep(0.05)
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        refused = await _read_all(reader, 2.0)
        writer.close()
        assert refused.startswith(b"HTTP/1.1 503"), refused
        assert json.loads(refused.partition(b"\r\n\r\n")[2])["error"] == "busy"
        started = time.monotonic()
        for idle_reader, _ in idle:
            assert await _closed(idle_reader, 3.0)
        waited = time.monotonic() - started
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        writer.write(b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        answer = await _read_all(reader, 2.0)
        writer.close()
        for _, idle_writer in idle:
            idle_writer.close()
    assert answer.startswith(b"HTTP/1.1 200"), answer
    assert waited < 2.0


async def test_slow_headers_are_cut_off() -> None:
    """A client that trickles its request headers is closed at the header deadline."""
    server = ApiServer(Surface(), CollectorRegistry(), TOKEN, ("127.0.0.1", 0), version="t")
    server.limits = Limits(header_timeout=0.5, idle_timeout=60.0)
    async with server:
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        writer.write(b"GET /health HTTP/1.1\r\n")
        started = time.monotonic()
        with contextlib.suppress(ConnectionError):
            for _ in range(20):
                await asyncio.sleep(0.1)
                writer.write(b"X-Slow: 1\r\n")
                await writer.drain()
        closed = await _closed(reader, 3.0)
        writer.close()
    assert closed
    assert time.monotonic() - started < 3.0


def test_connection_cap_leaves_descriptors_for_the_actions() -> None:
    """The cap is at most a quarter of the open-file limit."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    assert Limits(max_connections=10**9).connection_cap() <= max(1, soft // 4)
    assert Limits(max_connections=2).connection_cap() == 2


# --- a real daemon, a low open-file limit, a flood of idle connections --------------------

NOFILE = 200
"""The daemon's open-file limit in the flood test (its connection cap becomes 50)."""

FLOOD = 300
"""Idle connections opened: more than the daemon may hold open files."""

_WITH_LIMIT = (
    "import resource, runpy, sys; "
    f"resource.setrlimit(resource.RLIMIT_NOFILE, ({NOFILE}, {NOFILE})); "
    "sys.argv = ['rollbackd', 'run', '--config', sys.argv[1]]; "
    "runpy.run_module('rollbackd', run_name='__main__')"
)


@pytest.fixture
def limited_daemon(tmp_path: Path) -> Iterator[tuple[int, Path, subprocess.Popen[bytes]]]:
    """``rollbackd run`` with RLIMIT_NOFILE = NOFILE, synthetic source; ``(port, log, proc)``."""
    port = free_port()
    config = tmp_path / "rollbackd.toml"
    config.write_text(
        f"""
[daemon]
state_dir = "{tmp_path / "state"}"
listen = "127.0.0.1:{port}"

[sources.boop]
type = "synthetic"
seed = 1
phases = [{{ kind = "healthy" }}]

[monitors.payments]
interval = "500ms"
on_rollback = ["note"]

[[monitors.payments.rules]]
name = "payment-error-rate"
source = "boop"
query = "payment_error_rate"
above = 0.1

[actions.note]
type = "alert.log"
"""
    )
    log = tmp_path / "daemon.log"
    env = {**os.environ, "ROLLBACKD_LOG_FORMAT": "json", "ROLLBACKD_LOG_LEVEL": "info"}
    with log.open("wb") as out:
        process = subprocess.Popen(
            [sys.executable, "-c", _WITH_LIMIT, str(config)],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
        )
    try:
        wait_for(lambda: http_get(f"http://127.0.0.1:{port}/health")[0] == 200, 20, what="/health")
        yield port, log, process
    finally:
        if process.poll() is None:
            process.terminate()
            process.wait(30)


@pytest.mark.slow
def test_idle_flood_does_not_starve_health(
    limited_daemon: tuple[int, Path, subprocess.Popen[bytes]],
) -> None:
    """With more idle connections than open files, /health answers again within seconds.

    The idle connections over the cap are refused at once and the rest are closed at the
    header deadline; the log says so in a few counted lines, with no traceback.
    """
    port, log, process = limited_daemon
    flood: list[socket.socket] = []
    try:
        for _ in range(FLOOD):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.setblocking(False)
            sock.connect_ex(("127.0.0.1", port))  # EINPROGRESS: do not wait for the accept
            flood.append(sock)
        started = time.monotonic()
        wait_for(
            lambda: http_get(f"http://127.0.0.1:{port}/health", timeout=1.0)[0] == 200,
            15,
            interval=0.2,
            what="/health during the flood",
        )
        recovered = time.monotonic() - started
    finally:
        for sock in flood:
            sock.close()
    assert process.poll() is None, "the daemon died"
    text = log.read_text(errors="replace")
    lines = text.splitlines()
    print(f"\n/health back after {recovered:.1f} s; the daemon logged {len(lines)} lines")
    assert "Traceback" not in text
    assert '"exception"' not in text
    refused = [line for line in lines if "api_connections_refused" in line]
    assert 1 <= len(refused) <= 3, refused
    assert len(lines) < 50


_EMFILE_SERVER = """
import asyncio, resource, sys
from prometheus_client import CollectorRegistry
from rollbackd import logs
from rollbackd.api import ApiServer, Limits
from tests.test_listener import Surface

class NoCap(Limits):
    def connection_cap(self) -> int:
        return 10_000

async def main() -> None:
    logs.configure("json", "info")
    resource.setrlimit(resource.RLIMIT_NOFILE, (64, 64))
    server = ApiServer(Surface(), CollectorRegistry(), "t", ("127.0.0.1", int(sys.argv[1])),
                       version="t", limits=NoCap(log_every=60.0))
    async with server:
        print("listening", flush=True)
        await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)

asyncio.run(main())
"""


@pytest.mark.slow
def test_accept_errors_under_emfile_are_one_counted_line(tmp_path: Path) -> None:
    """A server out of file descriptors (no cap) logs its accept errors once, counted.

    Python 3.11's asyncio logs a traceback per failed accept (~2,000 a second here before).
    """
    port = free_port()
    log = tmp_path / "server.log"
    with log.open("wb") as out:
        server = subprocess.Popen(
            [sys.executable, "-c", _EMFILE_SERVER, str(port)],
            stdin=subprocess.PIPE,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    flood: list[socket.socket] = []
    try:
        wait_for(lambda: b"listening" in log.read_bytes(), 20, what="the server listening")
        for _ in range(100):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.setblocking(False)
            sock.connect_ex(("127.0.0.1", port))
            flood.append(sock)
        wait_for(lambda: b"api_accept_failed" in log.read_bytes(), 10, what="accept errors")
        time.sleep(2.5)  # asyncio retries the accept every second: let it fail a few times
    finally:
        for sock in flood:
            sock.close()
        assert server.stdin is not None
        server.stdin.close()
        server.wait(30)
    lines = log.read_text(errors="replace").splitlines()
    failed = [json.loads(line) for line in lines if "api_accept_failed" in line]
    assert "Traceback" not in "\n".join(lines)
    assert not any('"exception"' in line for line in lines), lines[:3]
    assert len(failed) == 2, failed  # the first one, and the rest counted at close
    assert failed[0]["error"] == "EMFILE"
    assert failed[1]["count"] >= 2
