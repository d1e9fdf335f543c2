"""HTTP actions against real servers: a local aiohttp receiver and a real Alertmanager."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import pytest
from aiohttp import web
from pydantic import ValidationError

from rollbackd.actions import ActionContext, Event, Incident
from rollbackd.actions.web import (
    ALERT_ALERTMANAGER,
    ALERT_WEBHOOK,
    FLAG_HTTP,
    ROUTE_HTTP,
    HttpRequestOptions,
)
from rollbackd.errors import ActionError
from rollbackd.plan import attempt_once
from tests.servers import Alertmanager, free_port, wait_for


@dataclass(frozen=True, slots=True)
class Received:
    """One request the hook server got."""

    method: str
    path: str
    headers: Mapping[str, str]
    body: str


@dataclass
class HookServer:
    """A real HTTP server on 127.0.0.1 that records requests and answers as told.

    ``fail[path]`` is a list of statuses to answer first (then 200); paths in ``hang`` never
    answer until the server stops.
    """

    requests: list[Received] = field(default_factory=list)
    fail: dict[str, list[int]] = field(default_factory=dict)
    hang: set[str] = field(default_factory=set)
    port: int = 0
    _runner: web.AppRunner | None = None
    _release: asyncio.Event = field(default_factory=asyncio.Event)

    def url(self, path: str) -> str:
        """Return the URL of ``path`` on this server."""
        return f"http://127.0.0.1:{self.port}{path}"

    def at(self, path: str) -> list[Received]:
        """Return the requests received on ``path``."""
        return [r for r in self.requests if r.path.split("?")[0] == path]

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.text()
        self.requests.append(Received(request.method, request.path_qs, dict(request.headers), body))
        if request.path in self.hang:
            await self._release.wait()
        statuses = self.fail.get(request.path)
        if statuses:
            status = statuses.pop(0)
            return web.Response(status=status, text=f"backend exploded ({status})\n" + "x" * 500)
        return web.json_response({"ok": True})

    async def start(self) -> HookServer:
        """Listen on a free loopback port."""
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app, shutdown_timeout=1.0)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.port = self._runner.addresses[0][1]
        return self

    async def stop(self) -> None:
        """Release hanging requests and stop."""
        self._release.set()
        if self._runner is not None:
            await self._runner.cleanup()


@pytest.fixture
async def hooks() -> AsyncIterator[HookServer]:
    """Run a recording HTTP server on loopback for one test."""
    server = await HookServer().start()
    yield server
    await server.stop()


def context(
    event: Event = Event.ROLLBACK,
    incident_id: str = "20261125T120000Z-payments-ab12",
    details: Mapping[str, Any] | None = None,
) -> ActionContext:
    """Build the first attempt of step 2 of an incident of monitor payments."""
    incident = Incident(
        id=incident_id,
        monitor="payments",
        event=event,
        reason='payment-error-rate 3.2 % > 0.1 % ("eu")',
        started_at=1_795_000_000.0,
        mode="armed",
        environment="staging",
        details=details or {"trigger": {"outcome": "breach"}},
    )
    return ActionContext(incident, 2, 1, f"{incident_id}:2")


async def test_flag_http_sends_templated_request_with_secret_and_idempotency_key(
    hooks: HookServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """flag.http renders url/body, reveals header secrets at use and sends Idempotency-Key."""
    monkeypatch.setenv("FLAG_TOKEN", "s3cret-token")
    options = FLAG_HTTP.options.model_validate(
        {
            "url": hooks.url("/flags/{monitor}?by={incident}"),
            "method": "PUT",
            "headers": {"Authorization": {"env": "FLAG_TOKEN"}, "X-Env": "{environment}"},
            "body": {"defaultVariant": "off", "why": "{reason}", "tags": ["{mode}"]},
        }
    )
    action = FLAG_HTTP.build("stop", options)
    try:
        detail = await action.run(context())
    finally:
        await action.aclose()
    [got] = hooks.requests
    assert (got.method, got.path) == ("PUT", "/flags/payments?by=20261125T120000Z-payments-ab12")
    assert got.headers["Authorization"] == "s3cret-token"
    assert got.headers["X-Env"] == "{environment}"  # headers are not templates
    assert got.headers["Idempotency-Key"] == "20261125T120000Z-payments-ab12:2"
    assert json.loads(got.body) == {
        "defaultVariant": "off",
        "why": 'payment-error-rate 3.2 % > 0.1 % ("eu")',
        "tags": ["armed"],
    }
    assert detail == f"PUT {hooks.url('/flags/payments')}: HTTP 200"
    assert "s3cret" not in detail


async def test_route_http_string_body_keeps_json_braces(hooks: HookServer) -> None:
    """A string body is sent as written with only known {fields} replaced, braces kept."""
    options = ROUTE_HTTP.options.model_validate(
        {
            "url": hooks.url("/routes/boop"),
            "method": "PATCH",
            "headers": {"Content-Type": "application/json"},
            "body": '{"percent": 0, "incident": "{incident}"}',
        }
    )
    action = ROUTE_HTTP.build("route", options)
    try:
        await action.run(context())
    finally:
        await action.aclose()
    [got] = hooks.requests
    assert got.method == "PATCH"
    assert json.loads(got.body) == {"percent": 0, "incident": "20261125T120000Z-payments-ab12"}


def test_unknown_placeholder_is_a_config_error() -> None:
    """A misspelt {field} in a url or body is rejected when the config loads, naming the fields."""
    with pytest.raises(ValidationError, match=r"unknown placeholder \{incidnet\}"):
        HttpRequestOptions.model_validate({"url": "http://x/{incidnet}"})
    with pytest.raises(ValidationError, match=r"unknown placeholder \{who\}"):
        HttpRequestOptions.model_validate({"url": "http://x/", "body": {"a": ["{who}"]}})
    with pytest.raises(ValidationError, match="not an http"):
        HttpRequestOptions.model_validate({"url": "ftp://x/"})


async def test_webhook_posts_the_incident_as_json(hooks: HookServer) -> None:
    """alert.webhook POSTs the incident (monitor, reason, mode, details) with its key."""
    options = ALERT_WEBHOOK.options.model_validate({"url": hooks.url("/hooks/rollbackd")})
    action = ALERT_WEBHOOK.build("notify", options)
    try:
        await action.run(context())
    finally:
        await action.aclose()
    [got] = hooks.at("/hooks/rollbackd")
    document = json.loads(got.body)
    assert document["monitor"] == "payments"
    assert document["event"] == "rollback"
    assert document["environment"] == "staging"
    assert document["details"] == {"trigger": {"outcome": "breach"}}
    assert document["idempotency_key"] == got.headers["Idempotency-Key"]


async def test_non_2xx_is_an_error_with_status_and_excerpt(hooks: HookServer) -> None:
    """A 500 answer fails the attempt with the status and a short excerpt of the body."""
    hooks.fail["/hooks/x"] = [500]
    options = ALERT_WEBHOOK.options.model_validate({"url": hooks.url("/hooks/x?token=abc")})
    action = ALERT_WEBHOOK.build("notify", options)
    try:
        with pytest.raises(ActionError) as caught:
            await action.run(context())
    finally:
        await action.aclose()
    message = str(caught.value)
    assert "HTTP 500: backend exploded (500)" in message
    assert len(message) < 300
    assert "token=abc" not in message  # queries may carry secrets


async def test_connection_refused_is_an_error() -> None:
    """Nothing listening on the port fails the attempt with the connection error."""
    options = ALERT_WEBHOOK.options.model_validate({"url": f"http://127.0.0.1:{free_port()}/"})
    action = ALERT_WEBHOOK.build("notify", options)
    try:
        with pytest.raises(ActionError, match="ClientConnectorError"):
            await action.run(context())
    finally:
        await action.aclose()


async def test_hanging_endpoint_times_out(hooks: HookServer) -> None:
    """An endpoint that never answers fails the attempt at the step's timeout."""
    hooks.hang.add("/slow")
    options = ALERT_WEBHOOK.options.model_validate({"url": hooks.url("/slow")})
    action = ALERT_WEBHOOK.build("notify", options)
    loop = asyncio.get_running_loop()
    started = loop.time()
    try:
        ok, detail = await attempt_once(action, context(), 0.3)
    finally:
        await action.aclose()
    assert (ok, detail) == (False, "timed out after 0.3s")
    assert 0.3 <= loop.time() - started < 2.0
    assert len(hooks.at("/slow")) == 1


@pytest.mark.slow
async def test_alertmanager_receives_alert_and_rearm_resolves_it(
    alertmanager: Alertmanager,
) -> None:
    """A rollback alert shows in Alertmanager with its labels; the re-arm event resolves it."""
    options = ALERT_ALERTMANAGER.options.model_validate(
        {"url": alertmanager.url, "severity": "page", "labels": {"team": "boop"}}
    )
    action = ALERT_ALERTMANAGER.build("page-oncall", options)
    incident_id = "20261125T120000Z-payments-ab12"
    try:
        detail = await action.run(context(Event.ROLLBACK, incident_id))
        assert detail.startswith("RollbackdRollback posted")
        [alert] = await asyncio.to_thread(wait_for, alertmanager.alerts, 10.0)
        assert alert["labels"] == {
            "alertname": "RollbackdRollback",
            "monitor": "payments",
            "severity": "page",
            "environment": "staging",
            "incident": incident_id,
            "team": "boop",
        }
        assert alert["annotations"]["reason"] == 'payment-error-rate 3.2 % > 0.1 % ("eu")'
        assert alert["annotations"]["summary"] == "rollbackd rolled back payments"
        assert alert["status"]["state"] == "active"

        rearm = context(Event.REARM, "20261125T130000Z-payments-cd34", {"resolves": incident_id})
        assert (await action.run(rearm)).startswith("RollbackdRollback resolved")
        await asyncio.to_thread(
            wait_for, lambda: alertmanager.alerts() == [], 10.0, what="alert resolved"
        )
    finally:
        await action.aclose()


@pytest.mark.slow
async def test_alertmanager_alert_and_blind_events_have_their_own_names(
    alertmanager: Alertmanager,
) -> None:
    """The alert and blind events post RollbackdAlert and RollbackdBlind, which stay active."""
    options = ALERT_ALERTMANAGER.options.model_validate({"url": alertmanager.url})
    action = ALERT_ALERTMANAGER.build("page-oncall", options)
    try:
        await action.run(context(Event.ALERT, "a-1"))
        await action.run(context(Event.BLIND, "b-1"))
    finally:
        await action.aclose()
    alerts = await asyncio.to_thread(
        wait_for, lambda: len(alertmanager.alerts()) == 2 and alertmanager.alerts(), 10.0
    )
    names = {(a["labels"]["alertname"], a["labels"]["incident"]) for a in alerts}
    assert names == {("RollbackdAlert", "a-1"), ("RollbackdBlind", "b-1")}
    assert {a["labels"]["severity"] for a in alerts} == {"critical"}
