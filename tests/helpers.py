"""What several test files build the same way: action contexts, async waits, config files.

Also what the tests of the daemon as a process share: reading its /status, POSTing with its
control token, killing what a test left running, and an HTTP receiver counting the plan's
requests per ``Idempotency-Key``. The real servers live in ``tests/servers.py``.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping, Sequence
from contextlib import asynccontextmanager, contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import TracebackType
from typing import Any, NamedTuple, Self

import pytest
from prometheus_client import CollectorRegistry

from rollbackd.actions import ActionContext, Event, Incident
from rollbackd.api import read_control_token
from rollbackd.assemble import Assembly, Registries
from rollbackd.daemon import Daemon
from rollbackd.sources import Source
from tests.servers import Rollbackd, http_get


def context(
    *,
    incident_id: str = "20261125T120000Z-payments-ab12",
    event: Event = Event.ROLLBACK,
    reason: str = "5 failing checks",
    started_at: float = 1_795_000_000.0,
    environment: str = "staging",
    details: Mapping[str, Any] | None = None,
    step: int = 0,
    attempt: int = 1,
    sources: Mapping[str, Source] | None = None,
    deadline: float | None = None,
) -> ActionContext:
    """One attempt of plan step ``step`` of an armed incident of monitor payments.

    The idempotency key is ``{incident_id}:{step}``, as the plan runner makes it.
    """
    incident = Incident(
        id=incident_id,
        monitor="payments",
        event=event,
        reason=reason,
        started_at=started_at,
        mode="armed",
        environment=environment,
        details=details or {},
    )
    return ActionContext(
        incident,
        step,
        attempt,
        f"{incident_id}:{step}",
        sources=sources or {},
        deadline=deadline,
    )


async def wait_until(
    condition: Callable[[], object], timeout: float = 10.0, what: str = "condition"
) -> None:
    """Poll ``condition`` on the event loop until it is truthy; fail the test at ``timeout``."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"{what} not met within {timeout}s")
        await asyncio.sleep(0.01)


def daemon_table(
    state_dir: Path | str,
    *,
    mode: str | None = "armed",
    environment: str | None = "staging",
    listen: str | None = "",
) -> dict[str, Any]:
    """The ``[daemon]`` table; a key given as None is left out, so its default applies."""
    keys = {"mode": mode, "environment": environment, "state_dir": str(state_dir), "listen": listen}
    return {key: value for key, value in keys.items() if value is not None}


def payment_error_rate(
    source: str, query: str, *, above: float = 0.1, unit: str | None = "%"
) -> dict[str, Any]:
    """The payments monitor's ``payment-error-rate`` rule, read from ``source``."""
    rule = {"name": "payment-error-rate", "source": source, "query": query, "above": above}
    return rule if unit is None else {**rule, "unit": unit}


def stop_traffic(flags: Path) -> dict[str, Any]:
    """The ``flag.file`` action that turns the ``boop-payments`` flag off in ``flags``."""
    return {"type": "flag.file", "path": str(flags), "flag": "boop-payments", "variant": "off"}


def route_legacy(env_file: Path) -> dict[str, Any]:
    """The ``route.file`` action that sets ``BOOP_TRAFFIC_PERCENT=0`` in ``env_file``."""
    return {
        "type": "route.file",
        "path": str(env_file),
        "key": "BOOP_TRAFFIC_PERCENT",
        "value": "0",
    }


SINGLE_TABLES = ("daemon", "ha")
"""The config's tables that are one table (``[ha]``), not named ones (``[sources.NAME]``)."""


def to_toml(raw: Mapping[str, Any]) -> str:
    """A tiny TOML writer for config documents: tables, ``rules`` arrays, inline tables."""
    lines: list[str] = []

    def value(v: Any) -> str:
        if isinstance(v, str):
            return json.dumps(v)
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, list):
            return "[" + ", ".join(value(x) for x in v) + "]"
        if isinstance(v, dict):
            return "{ " + ", ".join(f"{k} = {value(x)}" for k, x in v.items()) + " }"
        return str(v)

    def table(prefix: str, data: dict[str, Any]) -> None:
        scalars = {k: v for k, v in data.items() if not isinstance(v, dict) and k != "rules"}
        lines.append(f"[{prefix}]")
        lines.extend(f"{k} = {value(v)}" for k, v in scalars.items())
        for key, sub in data.items():
            if isinstance(sub, dict):
                table(f"{prefix}.{json.dumps(key)}", sub)
        for rule in data.get("rules", []):
            lines.append(f"[[{prefix}.rules]]")
            lines.extend(f"{k} = {value(v)}" for k, v in rule.items())

    for section, data in raw.items():
        if section in SINGLE_TABLES:
            table(section, data)
        else:
            for name, sub in data.items():
                table(f"{section}.{json.dumps(name)}", sub)
    return "\n".join(lines) + "\n"


def config_file(directory: Path, config: str | Mapping[str, Any]) -> Path:
    """Write ``config`` (TOML text, or a document for :func:`to_toml`) to ``rollbackd.toml``."""
    path = directory / "rollbackd.toml"
    text = config if isinstance(config, str) else to_toml(config)
    path.write_text(text, encoding="utf-8")
    return path


@asynccontextmanager
async def serving(
    assembly: Assembly, config_path: Path | None = None, registries: Registries | None = None
) -> AsyncIterator[Daemon]:
    """An in-process daemon on ``assembly``, ready; stopped cleanly (exit 0) after the block.

    With ``config_path``, ``daemon.reload()`` re-reads that file.
    """
    daemon = Daemon(assembly, config_path, registry=CollectorRegistry(), registries=registries)
    task = asyncio.create_task(daemon.serve())
    try:
        await asyncio.wait_for(daemon.ready.wait(), 10)
        yield daemon
    finally:
        daemon.stop()
        assert await asyncio.wait_for(task, 30) == 0


async def running(
    assembly: Assembly,
    body: Callable[[Daemon], Awaitable[None]],
    registries: Registries | None = None,
) -> None:
    """Serve an in-process daemon on ``assembly``, run ``body`` against it, stop it cleanly."""
    async with serving(assembly, registries=registries) as daemon:
        await body(daemon)


def rollout_tables(
    env_file: Path, hook_url: str, steps: list[int], holds: list[str]
) -> dict[str, Any]:
    """Sources, monitors, actions and rollouts of a ramp: rollout ``boop`` over ``steps`` %.

    Two synthetic, always healthy gates (authentication, payments) checked every 100 ms;
    ``route-percent`` writes each step's percent into ``env_file`` (``route-legacy`` 0 on a
    rollback) and ``team``, the webhook at ``hook_url``, announces each promotion.
    """
    healthy = {"type": "synthetic", "seed": 1, "noise": 0, "phases": [{"kind": "healthy"}]}
    monitors = {
        gate: {
            "interval": "100ms",
            "on_rollback": ["route-legacy"],
            "rules": [{"name": f"{gate}-errors", "source": "boop", "query": metric, "above": 1.0}],
        }
        for gate, metric in (
            ("authentication", "auth_error_rate"),
            ("payments", "payment_error_rate"),
        )
    }
    return {
        "sources": {"boop": healthy},
        "monitors": monitors,
        "actions": {
            "route-legacy": route_legacy(env_file),
            "route-percent": {**route_legacy(env_file), "value": "{percent}"},
            "team": {"type": "alert.webhook", "url": hook_url},
        },
        "rollouts": {
            "boop": {
                "steps": steps,
                "holds": holds,
                "gates": ["authentication", "payments"],
                "min_checks": 2,
                "set": "route-percent",
                "on_promote": ["team"],
            }
        },
    }


# --- the daemon as a process (tests.servers.Rollbackd) ---------------------------------------


def alive(daemon: Rollbackd) -> bool:
    """The daemon's process runs."""
    return daemon.process is not None and daemon.process.poll() is None


@contextmanager
def killed_after() -> Iterator[list[Rollbackd]]:
    """A list for the daemons a test starts; each one still running at the end is SIGKILLed."""
    daemons: list[Rollbackd] = []
    try:
        yield daemons
    finally:
        for daemon in daemons:
            if alive(daemon):
                daemon.kill()


def status_of(daemon: Rollbackd) -> dict[str, Any] | None:
    """The daemon's /status (None when it does not answer 200: not up, or not yet)."""
    code, body = http_get(f"http://127.0.0.1:{daemon.port}/status")
    if code != 200:
        return None
    document: dict[str, Any] = json.loads(body)
    return document


def role_of(daemon: Rollbackd) -> str | None:
    """``leader`` / ``standby`` from the daemon's /status (None when it does not answer)."""
    status = status_of(daemon)
    return None if status is None else str(status["role"])


def post_control(daemon: Rollbackd, path: str) -> tuple[int, str]:
    """POST ``path`` with the daemon's control token (from its ``state`` dir); status, body."""
    token = read_control_token(daemon.workdir / "state")
    request = urllib.request.Request(
        f"http://127.0.0.1:{daemon.port}{path}",
        method="POST",
        headers={"Authorization": f"Bearer {token}"},
    )
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return int(response.status), response.read().decode()
    except urllib.error.HTTPError as exc:
        with exc:
            return exc.code, exc.read().decode()


# --- the services a plan calls --------------------------------------------------------------


class Call(NamedTuple):
    """One request the receiver got: its path (no slashes around), key, ``time.monotonic()``."""

    path: str
    key: str
    at: float


class Receiver:
    """An HTTP service on 127.0.0.1 (flag service, router, team webhook) noting every POST.

    Each request is recorded with its path and ``Idempotency-Key`` (which rollbackd's
    ``alert.webhook`` also puts in its body) and answered 200 ``{}``. The first request
    whose key ``hold`` accepts is held unanswered for ``delay`` seconds (until :meth:`stop`
    at the latest), ``arrived`` set when it comes: a daemon can be killed with it in flight.
    Serves in a thread from construction; :meth:`stop` (or leaving ``with``) ends it.
    """

    def __init__(self, hold: Callable[[str], bool] | None = None, delay: float = 0.0) -> None:
        self.requests: list[Call] = []
        self.arrived = threading.Event()
        self.released = threading.Event()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                self.rfile.read(int(self.headers.get("Content-Length") or 0))
                key = self.headers.get("Idempotency-Key") or ""
                first = key not in receiver.calls
                receiver.requests.append(Call(self.path.strip("/"), key, time.monotonic()))
                if first and hold is not None and hold(key):
                    receiver.arrived.set()
                    receiver.released.wait(delay)
                try:
                    self.send_response(200)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", "2")
                    self.end_headers()
                    self.wfile.write(b"{}")
                except OSError:
                    pass  # the daemon that asked was killed meanwhile

            def log_message(self, *args: Any) -> None:
                return

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = int(self.server.server_address[1])
        self.url = f"http://127.0.0.1:{self.port}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    @property
    def calls(self) -> list[str]:
        """The keys of the requests, in order of arrival."""
        return [call.key for call in self.requests]

    def paths(self) -> list[str]:
        """The paths requested, in order."""
        return [call.path for call in self.requests]

    def effects(self) -> dict[str, int]:
        """Requests per Idempotency-Key."""
        counts: dict[str, int] = {}
        for call in self.requests:
            counts[call.key] = counts.get(call.key, 0) + 1
        return counts

    def arrivals(self, key: str) -> list[float]:
        """When each request with ``key`` came (``time.monotonic()``), in order."""
        return [call.at for call in self.requests if call.key == key]

    def stop(self) -> None:
        """Answer a held request, shut the server down, wait for its threads."""
        self.released.set()
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(5)

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        trace: TracebackType | None,
    ) -> None:
        self.stop()


def loaded_by_import(module: str, candidates: Sequence[str]) -> list[str]:
    """Which of ``candidates`` a fresh interpreter holds in ``sys.modules`` after ``module``."""
    code = (
        f"import sys, {module}; "
        f"print(' '.join(m for m in {tuple(candidates)!r} if m in sys.modules))"
    )
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    ).stdout.split()
