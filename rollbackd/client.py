"""The CLI's side of the HTTP surface: ``GET /status``, ``POST /rearm``, ``/retry``, ``/approve``.

Each failure is an error saying what to do: the daemon is not running, the token was refused.
"""

from __future__ import annotations

import json
from typing import Any
from urllib.parse import quote

import aiohttp

from rollbackd.errors import ApiError, DaemonUnreachableError, RollbackdError


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
    *,
    token: str | None = None,
) -> dict[str, Any]:
    """``GET /status`` of the running daemon; ``token`` when it has ``status_token = true``."""
    return await _request("GET", listen, "/status", timeout=timeout, headers=_bearer(token))


async def post_control(
    listen: str,
    token: str,
    action: str,
    subject: str,
    timeout: float = 10.0,  # noqa: ASYNC109 - aiohttp enforces it (ClientTimeout)
) -> dict[str, Any]:
    """``POST /{action}/{subject}`` with the control token; ApiError when the daemon refuses.

    ``rearm`` a monitor, ``retry`` an incident's failed steps, ``approve`` its waiting plan.
    """
    path = f"/{action}/{quote(subject, safe='')}"
    return await _request("POST", listen, path, timeout=timeout, headers=_bearer(token))


async def post_rearm(listen: str, token: str, monitor: str) -> dict[str, Any]:
    """``POST /rearm/{monitor}``: clear a monitor's latch."""
    return await post_control(listen, token, "rearm", monitor)


async def post_retry(listen: str, token: str, incident: str) -> dict[str, Any]:
    """``POST /retry/{incident}``: re-run a finished plan's failed steps."""
    return await post_control(listen, token, "retry", incident)


async def post_approve(listen: str, token: str, incident: str) -> dict[str, Any]:
    """``POST /approve/{incident}``: run a plan waiting for approval (or a cooldown) now."""
    return await post_control(listen, token, "approve", incident)


async def post_rollout(listen: str, token: str, rollout: str, operation: str) -> dict[str, Any]:
    """``POST /rollouts/{rollout}/{operation}``: pause, resume, promote, abort or restart."""
    path = f"/rollouts/{quote(rollout, safe='')}/{operation}"
    return await _request("POST", listen, path, timeout=10.0, headers=_bearer(token))


def _bearer(token: str | None) -> dict[str, str] | None:
    return None if token is None else {"Authorization": f"Bearer {token}"}


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
    "base_url",
    "get_status",
    "post_approve",
    "post_control",
    "post_rearm",
    "post_retry",
    "post_rollout",
]
