"""The HTTP surface on ``daemon.listen``: /health, /metrics, /status and the guarded re-arm.

Also its client side (``get_status``, ``post_rearm``) used by the CLI, and the control token.
"""

from __future__ import annotations

import hmac
import json
import os
import secrets
import stat
from collections.abc import Awaitable, Callable
from pathlib import Path
from types import TracebackType
from typing import Any, Protocol
from urllib.parse import quote

import aiohttp
import structlog
from aiohttp import web
from prometheus_client import CollectorRegistry
from prometheus_client.exposition import choose_encoder

from rollbackd.codec import dumps
from rollbackd.errors import (
    ApiError,
    DaemonUnreachableError,
    MonitorNotLatchedError,
    RollbackdError,
    UnknownMonitorError,
)

log = structlog.get_logger("rollbackd.api")

TOKEN_FILE = "control.token"  # noqa: S105 - a file name, not a secret


class Surface(Protocol):
    """What the HTTP surface asks of the daemon."""

    @property
    def mode(self) -> str:
        """``dry-run`` or ``armed``, as currently configured."""

    def health(self) -> tuple[bool, str]:
        """Return ``(True, "ok")``, or ``(False, reason)`` when the daemon is not doing its job."""

    def status(self) -> dict[str, Any]:
        """Return the ``/status`` document (JSON-able)."""

    async def rearm(self, monitor: str) -> dict[str, Any]:
        """Clear a latch; UnknownMonitorError / MonitorNotLatchedError when it cannot."""


# --- the control token ------------------------------------------------------------------


def ensure_control_token(state_dir: Path) -> str:
    """Return the re-arm token in ``state_dir/control.token``, created (0600) if missing."""
    path = state_dir / TOKEN_FILE
    state_dir.mkdir(mode=0o750, parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    except FileExistsError:
        if stat.S_IMODE(path.stat().st_mode) & 0o077:
            path.chmod(0o600)
            log.warning("control_token_permissions_fixed", path=str(path), mode="0600")
        token = read_control_token(state_dir)
        if token:
            return token
        fd = os.open(path, os.O_WRONLY | os.O_TRUNC | os.O_CLOEXEC)
    except OSError as exc:
        raise RollbackdError(f"cannot create the control token {path}: {exc.strerror}") from exc
    token = secrets.token_urlsafe(32)
    with os.fdopen(fd, "w", encoding="ascii") as handle:
        handle.write(token + "\n")
        handle.flush()
        os.fsync(handle.fileno())
    log.info("control_token_created", path=str(path))
    return token


def read_control_token(state_dir: Path) -> str:
    """Return the token the daemon wrote; RollbackdError saying what to do if unreadable."""
    path = state_dir / TOKEN_FILE
    try:
        return path.read_text(encoding="ascii").strip()
    except FileNotFoundError as exc:
        raise RollbackdError(
            f"no control token at {path}: start the daemon once (it creates it), "
            "or check daemon.state_dir"
        ) from exc
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) else "not ASCII text"
        raise RollbackdError(
            f"cannot read the control token {path}: {reason} (run as the daemon's user or root)"
        ) from exc


# --- the server -------------------------------------------------------------------------

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class ApiServer:
    """Serves the surface on ``address`` between ``start()`` and ``stop()`` (or ``async with``)."""

    def __init__(
        self,
        surface: Surface,
        registry: CollectorRegistry,
        token: str,
        address: tuple[str, int],
        *,
        version: str,
    ) -> None:
        self.surface = surface
        self.registry = registry
        self.address = address
        self.version = version
        self._token = token.encode("utf-8")
        self._runner: web.AppRunner | None = None
        self.port: int | None = None
        """The bound port (useful with port 0), set by ``start()``."""

    def app(self) -> web.Application:
        """Build the aiohttp application (routes and the JSON error middleware)."""
        app = web.Application(middlewares=[_json_errors])
        app.router.add_get("/health", self._health, allow_head=True)
        app.router.add_get("/metrics", self._metrics, allow_head=True)
        app.router.add_get("/status", self._status)
        app.router.add_post("/rearm/{monitor}", self._rearm)
        return app

    async def start(self) -> None:
        """Bind and serve; RollbackdError when the address cannot be bound."""
        runner = web.AppRunner(self.app(), access_log=None, shutdown_timeout=2.0)
        await runner.setup()
        host, port = self.address
        site = web.TCPSite(runner, host, port, reuse_address=True)
        try:
            await site.start()
        except OSError as exc:
            await runner.cleanup()
            raise RollbackdError(
                f"cannot listen on {host}:{port} (daemon.listen): {exc.strerror}"
            ) from exc
        self._runner = runner
        self.port = _bound_port(runner, port)
        log.info("api_listening", host=host, port=self.port)

    async def stop(self) -> None:
        """Stop serving (idempotent)."""
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.cleanup()

    async def __aenter__(self) -> ApiServer:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    async def _health(self, _request: web.Request) -> web.Response:
        healthy, reason = self.surface.health()
        body: dict[str, Any] = {"version": self.version, "mode": self.surface.mode}
        if healthy:
            return _json({"status": "ok", **body})
        return _json({"status": "degraded", "reason": reason, **body}, status=503)

    async def _metrics(self, request: web.Request) -> web.Response:
        # Content negotiation as prometheus_client does it: OpenMetrics when the scraper asks.
        encode, content_type = choose_encoder(request.headers.get("Accept", ""))
        return web.Response(body=encode(self.registry), headers={"Content-Type": content_type})

    async def _status(self, _request: web.Request) -> web.Response:
        return _json(self.surface.status())

    async def _rearm(self, request: web.Request) -> web.Response:
        if not self._authorized(request.headers.get("Authorization", "")):
            log.warning("rearm_refused", remote=request.remote, reason="bad or missing token")
            return _json(
                {"error": "unauthorized", "message": "send Authorization: Bearer <control token>"},
                status=401,
                headers={"WWW-Authenticate": 'Bearer realm="rollbackd"'},
            )
        monitor = request.match_info["monitor"]
        try:
            result = await self.surface.rearm(monitor)
        except UnknownMonitorError as exc:
            return _json({"error": "unknown_monitor", "message": str(exc)}, status=404)
        except MonitorNotLatchedError as exc:
            return _json(
                {"error": "not_rolled_back", "message": str(exc), "state": exc.state}, status=409
            )
        log.info("rearm_accepted", monitor=monitor, remote=request.remote)
        return _json(result)

    def _authorized(self, header: str) -> bool:
        scheme, _, given = header.partition(" ")
        if scheme.lower() != "bearer" or not given.strip():
            return False
        return hmac.compare_digest(given.strip().encode("utf-8"), self._token)


@web.middleware
async def _json_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Every error is a JSON body with a status code; never a traceback."""
    try:
        return await handler(request)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        headers = {"Allow": exc.headers["Allow"]} if "Allow" in exc.headers else None
        message = {404: f"no such path {request.path}", 405: f"{request.method} not allowed"}
        return _json(
            {"error": exc.reason.lower().replace(" ", "_"), "message": message.get(exc.status, "")},
            status=exc.status,
            headers=headers,
        )
    except RollbackdError as exc:
        log.error("api_request_failed", path=request.path, error=str(exc))
        return _json({"error": "unavailable", "message": str(exc)}, status=503)
    except Exception as exc:
        log.exception("api_request_crashed", path=request.path, error=repr(exc))
        return _json({"error": "internal", "message": "internal error (see the log)"}, status=500)


def _json(
    data: dict[str, Any], *, status: int = 200, headers: dict[str, str] | None = None
) -> web.Response:
    return web.Response(
        text=dumps(data), status=status, content_type="application/json", headers=headers
    )


def _bound_port(runner: web.AppRunner, wanted: int) -> int:
    for address in runner.addresses:
        if isinstance(address, tuple) and len(address) >= 2:
            return int(address[1])
    return wanted


# --- the client (CLI side) --------------------------------------------------------------


def base_url(listen: str) -> str:
    """``http://host:port`` for a ``daemon.listen`` value; a wildcard host means loopback."""
    host, sep, port = listen.rpartition(":")
    if not sep or not port.isdigit():
        raise RollbackdError(f'daemon.listen must be "HOST:PORT", not {listen!r}')
    host = {"0.0.0.0": "127.0.0.1", "": "127.0.0.1", "[::]": "[::1]", "::": "[::1]"}.get(  # noqa: S104
        host, host
    )
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"
    return f"http://{host}:{port}"


async def get_status(
    listen: str,
    timeout: float = 5.0,  # noqa: ASYNC109 - aiohttp enforces it (ClientTimeout)
) -> dict[str, Any]:
    """``GET /status`` of the running daemon."""
    return await _request("GET", listen, "/status", timeout=timeout)


async def post_rearm(
    listen: str,
    token: str,
    monitor: str,
    timeout: float = 10.0,  # noqa: ASYNC109 - aiohttp enforces it (ClientTimeout)
) -> dict[str, Any]:
    """``POST /rearm/{monitor}`` with the control token."""
    return await _request(
        "POST",
        listen,
        f"/rearm/{quote(monitor, safe='')}",
        timeout=timeout,
        headers={"Authorization": f"Bearer {token}"},
    )


async def _request(
    method: str,
    listen: str,
    path: str,
    *,
    timeout: float,  # noqa: ASYNC109 - aiohttp enforces it (ClientTimeout)
    headers: dict[str, str] | None = None,
) -> dict[str, Any]:
    url = base_url(listen) + path
    try:
        async with (
            aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout)) as session,
            session.request(method, url, headers=headers) as response,
        ):
            text = await response.text()
            status = response.status
    except (aiohttp.ClientError, TimeoutError, OSError) as exc:
        reason = str(exc) or type(exc).__name__
        raise DaemonUnreachableError(
            f"cannot reach rollbackd at {url}: {reason}; is rollbackd running? listen = {listen}"
        ) from exc
    try:
        body = json.loads(text)
    except ValueError:
        body = None
    if not isinstance(body, dict):
        raise ApiError(status, f"{method} {url}: HTTP {status} with a non-JSON answer")
    if status >= 400:
        raise ApiError(status, _error_message(status, body))
    return body


def _error_message(status: int, body: dict[str, Any]) -> str:
    message = str(body.get("message") or body.get("error") or f"HTTP {status}")
    if status == 401:
        return f"the daemon refused the control token ({message}); is it the same state_dir?"
    return message


__all__ = [
    "ApiServer",
    "Surface",
    "base_url",
    "ensure_control_token",
    "get_status",
    "post_rearm",
    "read_control_token",
]
