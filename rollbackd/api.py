"""The HTTP surface on ``daemon.listen``: /health, /metrics, /status, guarded control actions.

Also the control token. /metrics and /status are rendered in one worker thread, so a big
registry never stalls /health or the checks; the listening socket is ``listener``'s.
"""

from __future__ import annotations

import asyncio
import hmac
import os
import secrets
import stat
from collections.abc import Awaitable, Callable
from concurrent.futures import Executor, ThreadPoolExecutor
from pathlib import Path
from types import TracebackType
from typing import Any, Protocol, TypeVar

import structlog
from aiohttp import web
from prometheus_client import CollectorRegistry
from prometheus_client.exposition import choose_encoder

from rollbackd.client import base_url, get_status, post_approve, post_rearm, post_retry
from rollbackd.codec import dumps
from rollbackd.errors import (
    IncidentNotRetryableError,
    IncidentNotWaitingError,
    MonitorNotLatchedError,
    RollbackdError,
    RolloutRefusedError,
    UnknownIncidentError,
    UnknownMonitorError,
    UnknownRolloutError,
)
from rollbackd.listener import Limits, Listener
from rollbackd.page import Page

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

    async def retry(self, incident: str) -> dict[str, Any]:
        """Re-run the failed steps; UnknownIncidentError / IncidentNotRetryableError if not."""

    async def approve(self, incident: str) -> dict[str, Any]:
        """Run a waiting plan; UnknownIncidentError / IncidentNotWaitingError if not."""

    async def rollout(self, name: str, operation: str) -> dict[str, Any]:
        """Pause, resume, promote, abort or restart a rollout (or say why not: errors)."""


# --- the control token ------------------------------------------------------------------


def ensure_control_token(state_dir: Path) -> str:
    """Return the re-arm token in ``state_dir/control.token``, created (0600) if missing."""
    path = state_dir / TOKEN_FILE
    state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
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
T = TypeVar("T")

RENDERS_WAITING = 4
"""/metrics and /status renders queued behind the running one at most; more get a 503."""


class ApiServer:
    """Serves the surface on ``address`` between ``start()`` and ``stop()`` (or ``async with``).

    ``status_token``: /status and /metrics need the control token too. ``pool``: where
    /metrics and /status render (default: a one-thread pool of the server's own).
    """

    def __init__(
        self,
        surface: Surface,
        registry: CollectorRegistry,
        token: str,
        address: tuple[str, int],
        *,
        version: str,
        status_token: bool = False,
        limits: Limits | None = None,
        pool: Executor | None = None,
    ) -> None:
        self.surface = surface
        self.registry = registry
        self.address = address
        self.version = version
        self.status_token = status_token
        """Settable while serving (a reload may change ``daemon.status_token``)."""
        self.limits = limits or Limits()
        self._token = token.encode("utf-8")
        self._runner: web.AppRunner | None = None
        self._listener: Listener | None = None
        self._given_pool = pool
        self._pool: Executor | None = None
        self._renders = 0
        self.port: int | None = None
        """The bound port (useful with port 0), set by ``start()``."""

    def app(self) -> web.Application:
        """Build the aiohttp application (routes and the JSON error middleware)."""
        app = web.Application(middlewares=[_json_errors])
        app.router.add_get("/health", self._health, allow_head=True)
        app.router.add_get("/metrics", self._metrics, allow_head=True)
        app.router.add_get("/status", self._status)
        app.router.add_post("/rearm/{monitor}", self._rearm)
        app.router.add_post("/retry/{incident}", self._retry)
        app.router.add_post("/approve/{incident}", self._approve)
        Page(self).add_routes(app.router)  # GET /, /incidents/{id}, /page/live, /static/{name}
        operations = "|".join(("pause", "resume", "promote", "abort", "restart"))
        app.router.add_post(f"/rollouts/{{rollout}}/{{operation:{operations}}}", self._rollout)
        return app

    async def start(self) -> None:
        """Bind and serve; RollbackdError when the address cannot be bound."""
        runner = web.AppRunner(
            self.app(),
            access_log=None,
            shutdown_timeout=2.0,
            keepalive_timeout=self.limits.idle_timeout,
        )
        await runner.setup()
        assert runner.server is not None
        listener = Listener(runner.server, self.limits)
        host, port = self.address
        try:
            self.port = await listener.start(host, port)
        except OSError as exc:
            await runner.cleanup()
            raise RollbackdError(
                f"cannot listen on {host}:{port} (daemon.listen): {exc.strerror}"
            ) from exc
        self._runner, self._listener = runner, listener
        self._pool = self._given_pool or ThreadPoolExecutor(1, thread_name_prefix="rollbackd-api")
        log.info("api_listening", host=host, port=self.port, max_connections=listener.cap)

    async def stop(self) -> None:
        """Stop serving (idempotent)."""
        listener, self._listener = self._listener, None
        if listener is not None:
            listener.close()
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.cleanup()
        pool, self._pool = self._pool, None
        if pool is not None and pool is not self._given_pool:
            pool.shutdown(wait=False, cancel_futures=True)

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
        if self.status_token and not self._authorized(request):
            return _unauthorized(request, "metrics")
        # Content negotiation as prometheus_client does it: OpenMetrics when the scraper asks.
        encode, content_type = choose_encoder(request.headers.get("Accept", ""))
        body = await self._render(encode, self.registry)
        return web.Response(body=body, headers={"Content-Type": content_type})

    async def _status(self, request: web.Request) -> web.Response:
        if self.status_token and not self._authorized(request):
            return _unauthorized(request, "status")
        # The surface builds a fresh document on the loop; encoding it is the slow part.
        text = await self._render(dumps, self.surface.status())
        return web.Response(text=text, content_type="application/json")

    async def _render(self, render: Callable[[Any], T], subject: object) -> T:
        """Run ``render(subject)`` in the render pool, one at a time; a 503 when too many wait."""
        if self._renders > RENDERS_WAITING:
            raise web.HTTPServiceUnavailable(headers={"Retry-After": "5"})
        self._renders += 1
        try:
            return await asyncio.get_running_loop().run_in_executor(self._pool, render, subject)
        finally:
            self._renders -= 1

    # --- what the operator page (page.py) uses ---------------------------------------------

    def authorized(self, request: web.Request) -> bool:
        """Whether ``request`` carries the control token."""
        return self._authorized(request)

    async def render(self, render: Callable[[Any], T], subject: object) -> T:
        """Run ``render(subject)`` in the render pool, like /status (a 503 when too many wait)."""
        return await self._render(render, subject)

    async def _rearm(self, request: web.Request) -> web.Response:
        monitor = request.match_info["monitor"]
        return await self._control(request, "rearm", monitor, self.surface.rearm)

    async def _retry(self, request: web.Request) -> web.Response:
        incident = request.match_info["incident"]
        return await self._control(request, "retry", incident, self.surface.retry)

    async def _approve(self, request: web.Request) -> web.Response:
        incident = request.match_info["incident"]
        return await self._control(request, "approve", incident, self.surface.approve)

    async def _rollout(self, request: web.Request) -> web.Response:
        operation = request.match_info["operation"]

        async def act(name: str) -> dict[str, Any]:
            return await self.surface.rollout(name, operation)

        return await self._control(
            request, f"rollout_{operation}", request.match_info["rollout"], act
        )

    async def _control(  # noqa: PLR0911 -- one answer per kind of refusal
        self,
        request: web.Request,
        what: str,
        subject: str,
        act: Callable[[str], Awaitable[dict[str, Any]]],
    ) -> web.Response:
        """An operator's token-guarded action on ``subject``; its refusals as 404 / 409."""
        if not self._authorized(request):
            return _unauthorized(request, what)
        try:
            result = await act(subject)
        except (UnknownMonitorError, UnknownIncidentError, UnknownRolloutError) as exc:
            kind = {
                UnknownMonitorError: "unknown_monitor",
                UnknownIncidentError: "unknown_incident",
                UnknownRolloutError: "unknown_rollout",
            }[type(exc)]
            return _json({"error": kind, "message": str(exc)}, status=404)
        except MonitorNotLatchedError as exc:
            body = {"error": "not_rolled_back", "message": str(exc), "state": exc.state}
            return _json(body, status=409)
        except IncidentNotRetryableError as exc:
            body = {"error": "not_retryable", "message": str(exc), "reason": exc.reason}
            return _json(body, status=409)
        except IncidentNotWaitingError as exc:
            return _json({"error": "not_waiting", "message": str(exc)}, status=409)
        except RolloutRefusedError as exc:
            body = {"error": "refused", "message": str(exc), "reason": exc.reason}
            return _json(body, status=409)
        log.info(f"{what}_accepted", subject=subject, remote=request.remote)
        return _json(result)

    def _authorized(self, request: web.Request) -> bool:
        scheme, _, given = request.headers.get("Authorization", "").partition(" ")
        given = given.strip()
        # The token is ASCII; anything else (non-UTF-8 bytes arrive as surrogates) is wrong.
        if scheme.lower() != "bearer" or not given or not given.isascii():
            return False
        return hmac.compare_digest(given.encode("ascii"), self._token)


def _unauthorized(request: web.Request, what: str) -> web.Response:
    log.warning(f"{what}_refused", remote=request.remote, reason="bad or missing token")
    return _json(
        {"error": "unauthorized", "message": "send Authorization: Bearer <control token>"},
        status=401,
        headers={"WWW-Authenticate": 'Bearer realm="rollbackd"'},
    )


@web.middleware
async def _json_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Every error is a JSON body with a status code; never a traceback."""
    try:
        return await handler(request)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        kept = ("Allow", "Retry-After")
        headers = {k: exc.headers[k] for k in kept if k in exc.headers} or None
        message = {
            404: f"no such path {request.path}",
            405: f"{request.method} not allowed",
            503: f"{request.path}: too many requests being rendered; try again in a few seconds",
        }
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


__all__ = [
    "ApiServer",
    "Limits",
    "Surface",
    "base_url",
    "ensure_control_token",
    "get_status",
    "post_approve",
    "post_rearm",
    "post_retry",
    "read_control_token",
]
