"""The HTTP surface on a real loopback server: health, metrics, status, guarded re-arm, errors."""

from __future__ import annotations

import asyncio
import json
import math
import socket
import stat
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from prometheus_client import CollectorRegistry

from rollbackd.api import (
    ApiServer,
    base_url,
    ensure_control_token,
    get_status,
    post_approve,
    post_rearm,
    post_retry,
    read_control_token,
)
from rollbackd.errors import (
    ApiError,
    DaemonUnreachableError,
    IncidentNotRetryableError,
    IncidentNotWaitingError,
    MonitorNotLatchedError,
    RollbackdError,
    StateError,
    UnknownIncidentError,
    UnknownMonitorError,
)
from rollbackd.metrics import Metrics

TOKEN = "test-control-token"
VERSION = "9.9.9"


@dataclass
class Surface:
    """A small daemon stand-in: two monitors, ``payments`` latched; incidents to retry."""

    mode: str = "dry-run"
    healthy: tuple[bool, str] = (True, "ok")
    phases: dict[str, str] = field(
        default_factory=lambda: {"payments": "rolled_back", "authentication": "ok"}
    )
    broken: BaseException | None = None
    incidents: dict[str, str] = field(
        default_factory=lambda: {"inc-failed": "failed", "inc-running": "running"}
    )
    retried: list[str] = field(default_factory=list)

    def health(self) -> tuple[bool, str]:
        """Return what the test set."""
        return self.healthy

    def status(self) -> dict[str, Any]:
        """Return a small document with an infinity in it, or raise what the test set."""
        if self.broken is not None:
            raise self.broken
        return {
            "mode": self.mode,
            "monitors": {
                name: {"state": phase, "value": math.inf if name == "payments" else 0.5}
                for name, phase in self.phases.items()
            },
        }

    async def rearm(self, monitor: str) -> dict[str, Any]:
        """Clear a latch like the daemon does, with its errors."""
        if monitor not in self.phases:
            raise UnknownMonitorError(monitor)
        if self.phases[monitor] != "rolled_back":
            raise MonitorNotLatchedError(monitor, self.phases[monitor])
        self.phases[monitor] = "ok"
        return {"monitor": monitor, "state": "ok"}

    async def retry(self, incident: str) -> dict[str, Any]:
        """Re-run failed steps like the daemon does, with its errors."""
        if incident not in self.incidents:
            raise UnknownIncidentError(incident)
        if self.incidents[incident] != "failed":
            raise IncidentNotRetryableError(incident, "its plan is still running")
        self.retried.append(incident)
        return {"incident": incident, "retrying": ["route-legacy"]}


@dataclass
class Running:
    """A started server and its surface."""

    surface: Surface
    server: ApiServer

    @property
    def listen(self) -> str:
        """The ``daemon.listen`` value of the server."""
        return f"127.0.0.1:{self.server.port}"

    @property
    def url(self) -> str:
        """Its base URL."""
        return f"http://{self.listen}"


def _serve(*, status_token: bool = False) -> tuple[Surface, ApiServer]:
    registry = CollectorRegistry()
    Metrics(registry, process=False).info(VERSION, "dry-run", "test")
    surface = Surface()
    address = ("127.0.0.1", 0)
    server = ApiServer(
        surface, registry, TOKEN, address, version=VERSION, status_token=status_token
    )
    return surface, server


@pytest.fixture
async def api() -> AsyncIterator[Running]:
    """Serve a fresh Surface and registry on a free loopback port."""
    surface, server = _serve()
    async with server:
        assert server.port
        yield Running(surface, server)


@pytest.fixture
async def guarded() -> AsyncIterator[Running]:
    """Like ``api``, with ``status_token = true``."""
    surface, server = _serve(status_token=True)
    async with server:
        yield Running(surface, server)


async def _call(
    method: str, url: str, headers: dict[str, str] | None = None
) -> tuple[int, dict[str, Any], str]:
    async with (
        aiohttp.ClientSession() as session,
        session.request(method, url, headers=headers) as response,
    ):
        return response.status, await response.json(), response.headers.get("Content-Type", "")


async def test_health_ok(api: Running) -> None:
    """GET /health is 200 with status ok, the version and the mode."""
    status, body, _ = await _call("GET", api.url + "/health")
    assert status == 200
    assert body == {"status": "ok", "version": VERSION, "mode": "dry-run"}


async def test_health_degraded(api: Running) -> None:
    """GET /health is 503 with the reason when the surface says it is unhealthy."""
    api.surface.healthy = (False, "monitor payments has not been checked for 400s")
    status, body, _ = await _call("GET", api.url + "/health")
    assert status == 503
    assert body["status"] == "degraded"
    assert body["reason"] == "monitor payments has not been checked for 400s"


async def test_metrics_exposition(api: Running) -> None:
    """GET /metrics is the Prometheus text exposition of the registry, rollbackd_info included."""
    async with (
        aiohttp.ClientSession() as session,
        session.get(api.url + "/metrics") as response,
    ):
        text = await response.text()
        assert response.status == 200
        assert response.headers["Content-Type"].startswith("text/plain; version=0.0.4")
    assert 'rollbackd_info{environment="test",mode="dry-run",version="9.9.9"} 1.0' in text
    assert "# TYPE rollbackd_checks_total counter" in text


async def test_metrics_openmetrics_on_request(api: Running) -> None:
    """A scraper that asks for OpenMetrics gets it (content negotiation)."""
    accept = {"Accept": "application/openmetrics-text; version=1.0.0"}
    async with (
        aiohttp.ClientSession() as session,
        session.get(api.url + "/metrics", headers=accept) as response,
    ):
        text = await response.text()
        assert response.headers["Content-Type"].startswith("application/openmetrics-text")
    assert text.rstrip().endswith("# EOF")


async def test_status_through_the_client(api: Running) -> None:
    """get_status returns the surface's document; infinities travel as '+Inf' (strict JSON)."""
    body = await get_status(api.listen, timeout=5.0)
    assert body["mode"] == "dry-run"
    assert body["monitors"]["payments"] == {"state": "rolled_back", "value": "+Inf"}
    assert body["monitors"]["authentication"]["value"] == 0.5


@pytest.mark.parametrize(
    "headers",
    [
        None,
        {"Authorization": "Bearer wrong"},
        {"Authorization": TOKEN},
        {"Authorization": "Bearer "},
    ],
)
async def test_rearm_needs_the_token(api: Running, headers: dict[str, str] | None) -> None:
    """POST /rearm without the right bearer token is 401 and changes nothing."""
    status, body, _ = await _call("POST", api.url + "/rearm/payments", headers)
    assert status == 401
    assert body["error"] == "unauthorized"
    assert api.surface.phases["payments"] == "rolled_back"


async def test_rearm_unknown_monitor(api: Running) -> None:
    """POST /rearm of a monitor that does not exist is 404 naming it."""
    auth = {"Authorization": f"Bearer {TOKEN}"}
    status, body, _ = await _call("POST", api.url + "/rearm/nope", auth)
    assert status == 404
    assert body == {"error": "unknown_monitor", "message": "no monitor named 'nope'"}


async def test_rearm_not_latched(api: Running) -> None:
    """POST /rearm of a monitor that is not rolled back is 409 with its state."""
    auth = {"Authorization": f"Bearer {TOKEN}"}
    status, body, _ = await _call("POST", api.url + "/rearm/authentication", auth)
    assert status == 409
    assert body["error"] == "not_rolled_back"
    assert body["state"] == "ok"
    assert "nothing to re-arm" in body["message"]


async def test_rearm_through_the_client(api: Running) -> None:
    """post_rearm clears a latch; a second one fails with the daemon's 409 message."""
    result = await post_rearm(api.listen, TOKEN, "payments")
    assert result == {"monitor": "payments", "state": "ok"}
    assert api.surface.phases["payments"] == "ok"
    with pytest.raises(ApiError, match="is ok, not rolled_back") as caught:
        await post_rearm(api.listen, TOKEN, "payments")
    assert caught.value.status == 409


async def test_client_reports_a_refused_token(api: Running) -> None:
    """post_rearm with a wrong token raises ApiError saying the token was refused."""
    with pytest.raises(ApiError, match="refused the control token"):
        await post_rearm(api.listen, "wrong", "payments")


async def test_client_quotes_the_monitor_name(api: Running) -> None:
    """A monitor name with a slash stays one path segment (404 for it, not a routing miss)."""
    with pytest.raises(ApiError, match="no monitor named 'a/b'"):
        await post_rearm(api.listen, TOKEN, "a/b")


async def test_unknown_path_is_json_404(api: Running) -> None:
    """An unknown path is a JSON 404."""
    status, body, content_type = await _call("GET", api.url + "/nothing-here")
    assert status == 404
    assert content_type.startswith("application/json")
    assert body == {"error": "not_found", "message": "no such path /nothing-here"}


@pytest.mark.parametrize(("method", "path"), [("POST", "/health"), ("GET", "/rearm/payments")])
async def test_wrong_method_is_json_405(api: Running, method: str, path: str) -> None:
    """A known path with the wrong method is a JSON 405."""
    status, body, _ = await _call(method, api.url + path)
    assert status == 405
    assert body["error"] == "method_not_allowed"


async def test_a_crash_is_json_500_without_traceback(api: Running) -> None:
    """An unexpected exception in the surface is a JSON 500 that shows no traceback."""
    api.surface.broken = ZeroDivisionError("division by zero in secret_module.py")
    status, body, _ = await _call("GET", api.url + "/status")
    assert status == 500
    assert body == {"error": "internal", "message": "internal error (see the log)"}


async def test_a_known_failure_is_json_503(api: Running) -> None:
    """A RollbackdError in the surface is a JSON 503 carrying its message."""
    api.surface.broken = StateError("state.db is locked")
    status, body, _ = await _call("GET", api.url + "/status")
    assert status == 503
    assert body == {"error": "unavailable", "message": "state.db is locked"}


def _closed_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def test_client_when_nothing_listens() -> None:
    """get_status against a port nobody listens on says to check that rollbackd runs."""
    listen = f"127.0.0.1:{_closed_port()}"
    with pytest.raises(DaemonUnreachableError, match=f"is rollbackd running\\? listen = {listen}"):
        await get_status(listen, timeout=2.0)


async def test_port_in_use_is_a_clear_error() -> None:
    """Starting on a port another socket holds raises RollbackdError naming daemon.listen."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = int(holder.getsockname()[1])
        server = ApiServer(Surface(), CollectorRegistry(), TOKEN, ("127.0.0.1", port), version="x")
        with pytest.raises(RollbackdError, match=r"daemon\.listen"):
            await server.start()
        await server.stop()


@pytest.mark.parametrize(
    ("listen", "url"),
    [
        ("127.0.0.1:9877", "http://127.0.0.1:9877"),
        ("0.0.0.0:9877", "http://127.0.0.1:9877"),
        ("[::1]:9877", "http://[::1]:9877"),
        ("[::]:9877", "http://[::1]:9877"),
    ],
)
def test_base_url(listen: str, url: str) -> None:
    """The client talks to loopback when the daemon listens on a wildcard address."""
    assert base_url(listen) == url


def test_control_token_created_private_and_stable(tmp_path: Path) -> None:
    """ensure_control_token creates a 0600 file once and returns the same token after."""
    state = tmp_path / "state"
    token = ensure_control_token(state)
    path = state / "control.token"
    assert len(token) >= 32
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert ensure_control_token(state) == token
    assert read_control_token(state) == token


def test_control_token_permissions_tightened(tmp_path: Path) -> None:
    """A token file readable by others is set back to 0600 and kept."""
    path = tmp_path / "control.token"
    path.write_text("kept-token\n", encoding="ascii")
    path.chmod(0o644)
    assert ensure_control_token(tmp_path) == "kept-token"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_control_token_missing_is_explained(tmp_path: Path) -> None:
    """read_control_token without a file says the daemon creates it."""
    with pytest.raises(RollbackdError, match="start the daemon once"):
        read_control_token(tmp_path)


# --- POST /retry/{incident} ------------------------------------------------------------


@pytest.mark.parametrize("headers", [None, {"Authorization": "Bearer wrong"}])
async def test_retry_needs_the_token(api: Running, headers: dict[str, str] | None) -> None:
    """POST /retry without the right bearer token is 401 and retries nothing."""
    status, body, _ = await _call("POST", api.url + "/retry/inc-failed", headers)
    assert status == 401
    assert body["error"] == "unauthorized"
    assert api.surface.retried == []


async def test_retry_through_the_client(api: Running) -> None:
    """post_retry re-runs a finished incident's failed steps and returns the surface's answer."""
    result = await post_retry(api.listen, TOKEN, "inc-failed")
    assert result == {"incident": "inc-failed", "retrying": ["route-legacy"]}
    assert api.surface.retried == ["inc-failed"]


async def test_retry_unknown_incident_is_404(api: Running) -> None:
    """An incident id the store does not know is 404 naming it; the client raises ApiError."""
    auth = {"Authorization": f"Bearer {TOKEN}"}
    status, body, _ = await _call("POST", api.url + "/retry/inc-nope", auth)
    assert status == 404
    assert body["error"] == "unknown_incident"
    assert "'inc-nope'" in body["message"]
    with pytest.raises(ApiError, match="no incident 'a/b'") as caught:
        await post_retry(api.listen, TOKEN, "a/b")
    assert caught.value.status == 404


async def test_retry_not_retryable_is_409(api: Running) -> None:
    """An unfinished incident (or one without a failed step) is 409 with the reason."""
    with pytest.raises(ApiError, match="cannot be retried: its plan is still running") as caught:
        await post_retry(api.listen, TOKEN, "inc-running")
    assert caught.value.status == 409
    assert api.surface.retried == []


async def _raw(port: int, request: bytes) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(request)
    await writer.drain()
    answer = await asyncio.wait_for(reader.read(), timeout=5)
    writer.close()
    await writer.wait_closed()
    return answer


@pytest.mark.parametrize("token", [b"\xff\xfe\xfd", b"caf\xc3\xa9", b"\xe2\x82"])
async def test_non_utf8_authorization_is_401(api: Running, token: bytes) -> None:
    """An Authorization header with non-UTF-8 or non-ASCII bytes is a JSON 401, not a 500."""
    request = (
        b"POST /rearm/payments HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer "
        + token
        + b"\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    )
    answer = await _raw(api.server.port or 0, request)
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 401"), answer
    assert json.loads(body)["error"] == "unauthorized"
    assert api.surface.phases["payments"] == "rolled_back"


@pytest.mark.parametrize("path", ["/status", "/metrics"])
async def test_status_token_guards_status_and_metrics(guarded: Running, path: str) -> None:
    """With status_token, /status and /metrics are 401 without the token and 200 with it."""
    status, body, _ = await _call("GET", guarded.url + path)
    assert status == 401
    assert body["error"] == "unauthorized"
    async with (
        aiohttp.ClientSession() as session,
        session.get(guarded.url + path, headers={"Authorization": f"Bearer {TOKEN}"}) as answer,
    ):
        assert answer.status == 200


async def test_status_token_leaves_health_open(guarded: Running) -> None:
    """/health needs no token, whatever status_token says."""
    status, body, _ = await _call("GET", guarded.url + "/health")
    assert status == 200
    assert body["status"] == "ok"


async def test_get_status_sends_the_token(guarded: Running) -> None:
    """get_status with the token reads a guarded /status; without it, says the token was refused."""
    body = await get_status(guarded.listen, token=TOKEN)
    assert body["mode"] == "dry-run"
    with pytest.raises(ApiError, match="refused the control token"):
        await get_status(guarded.listen)


# --- POST /approve/{incident} ----------------------------------------------------------


@dataclass
class ApprovingSurface(Surface):
    """The stand-in with plans that wait: ``inc-held`` waits for approval, once."""

    held: set[str] = field(default_factory=lambda: {"inc-held"})
    approved: list[str] = field(default_factory=list)

    async def approve(self, incident: str) -> dict[str, Any]:
        """Run a waiting plan like the daemon does, with its errors."""
        if incident not in {*self.held, *self.approved, *self.incidents}:
            raise UnknownIncidentError(incident)
        if incident not in self.held:
            raise IncidentNotWaitingError(incident)
        self.held.discard(incident)
        self.approved.append(incident)
        return {"incident": incident, "waited": "approval", "plan": "started"}


@pytest.fixture
async def approving() -> AsyncIterator[Running]:
    """Like ``api``, with a plan waiting for approval."""
    surface = ApprovingSurface()
    server = ApiServer(surface, CollectorRegistry(), TOKEN, ("127.0.0.1", 0), version=VERSION)
    async with server:
        yield Running(surface, server)


@pytest.mark.parametrize("headers", [None, {"Authorization": "Bearer wrong"}])
async def test_approve_needs_the_token(approving: Running, headers: dict[str, str] | None) -> None:
    """POST /approve without the right bearer token is 401 and approves nothing."""
    status, body, _ = await _call("POST", approving.url + "/approve/inc-held", headers)
    assert status == 401
    assert body["error"] == "unauthorized"
    assert approving.surface.approved == []  # type: ignore[attr-defined]


async def test_approve_through_the_client_once(approving: Running) -> None:
    """post_approve starts a waiting plan; a second approval is 409 not_waiting."""
    result = await post_approve(approving.listen, TOKEN, "inc-held")
    assert result == {"incident": "inc-held", "waited": "approval", "plan": "started"}
    auth = {"Authorization": f"Bearer {TOKEN}"}
    status, body, _ = await _call("POST", approving.url + "/approve/inc-held", auth)
    assert status == 409
    assert body["error"] == "not_waiting"
    with pytest.raises(ApiError, match="not waiting for approval") as caught:
        await post_approve(approving.listen, TOKEN, "inc-held")
    assert caught.value.status == 409
    assert approving.surface.approved == ["inc-held"]  # type: ignore[attr-defined]


async def test_approve_unknown_incident_is_404(approving: Running) -> None:
    """An incident id the store does not know is 404 naming it."""
    with pytest.raises(ApiError, match="no incident 'inc-nope'") as caught:
        await post_approve(approving.listen, TOKEN, "inc-nope")
    assert caught.value.status == 404
