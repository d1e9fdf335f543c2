"""HTTP actions against real servers: a local aiohttp receiver and a real Alertmanager."""

from __future__ import annotations

import asyncio
import json
import ssl
import subprocess
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from pydantic import ValidationError
from structlog.testing import capture_logs

from rollbackd.actions import ActionContext, Event, Incident
from rollbackd.actions.web import (
    ALERT_ALERTMANAGER,
    ALERT_WEBHOOK,
    FLAG_HTTP,
    ROUTE_HTTP,
    AlertmanagerAction,
    HttpRequestOptions,
    WebhookOptions,
)
from rollbackd.assemble import from_dict
from rollbackd.errors import ActionError, ConfigError
from rollbackd.plan import attempt_once
from tests import helpers
from tests.servers import Alertmanager, free_port, wait_for


@dataclass(frozen=True, slots=True)
class Received:
    """One request the hook server got."""

    method: str
    path: str
    headers: Mapping[str, str]
    body: str
    raw_path: str = ""
    """The request target exactly as sent (percent-encoding kept)."""
    query: Mapping[str, str] = field(default_factory=dict)


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
    tls: ssl.SSLContext | None = None
    """Serve https with this context instead of plain http."""
    _runner: web.AppRunner | None = None
    _release: asyncio.Event = field(default_factory=asyncio.Event)

    def url(self, path: str) -> str:
        """Return the URL of ``path`` on this server."""
        scheme = "https" if self.tls else "http"
        return f"{scheme}://127.0.0.1:{self.port}{path}"

    def at(self, path: str) -> list[Received]:
        """Return the requests received on ``path``."""
        return [r for r in self.requests if r.path.split("?")[0] == path]

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.text()
        self.requests.append(
            Received(
                request.method,
                request.path_qs,
                dict(request.headers),
                body,
                request.raw_path,
                dict(request.query),
            )
        )
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
        site = web.TCPSite(self._runner, "127.0.0.1", 0, ssl_context=self.tls)
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


@dataclass(frozen=True, slots=True)
class Certificate:
    """A self-signed certificate for 127.0.0.1 (it is its own CA) and its key, as PEM files."""

    cert: Path
    key: Path


def self_signed(directory: Path) -> Certificate:
    """Generate a one-day self-signed certificate for IP 127.0.0.1 with the openssl binary."""
    # openssl rather than the cryptography package: the test extras do not install it
    cert, key = directory / "cert.pem", directory / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=127.0.0.1",
         "-addext", "subjectAltName=IP:127.0.0.1", "-days", "1",
         "-keyout", str(key), "-out", str(cert)],
        check=True,
        capture_output=True,
        timeout=30,
    )  # fmt: skip
    return Certificate(cert, key)


@pytest.fixture(scope="module")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> Certificate:
    """One self-signed loopback certificate for the module's TLS tests."""
    return self_signed(tmp_path_factory.mktemp("tls"))


@pytest.fixture
async def https_hooks(certificate: Certificate) -> AsyncIterator[HookServer]:
    """Run a recording HTTPS server on loopback with the self-signed certificate."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(certificate.cert, certificate.key)
    server = await HookServer(tls=context).start()
    yield server
    await server.stop()


# The first attempt of step 2 of an incident of monitor payments.
context = partial(
    helpers.context,
    reason='payment-error-rate 3.2 % > 0.1 % ("eu")',
    details={"trigger": {"outcome": "breach"}},
    step=2,
)


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


@pytest.mark.parametrize(
    ("monitor", "raw"),
    [
        ("..", "/flags/%2E%2E/disable"),
        (".", "/flags/%2E/disable"),
        ("../admin/disable-all", "/flags/..%2Fadmin%2Fdisable-all/disable"),
        ("a b/c?d#e", "/flags/a%20b%2Fc%3Fd%23e/disable"),
    ],
)
async def test_templated_url_values_cannot_leave_their_segment(
    hooks: HookServer, monitor: str, raw: str
) -> None:
    """A value rendered into a URL path is one encoded segment: ``..`` reaches no other endpoint."""
    options = FLAG_HTTP.options.model_validate(
        {"url": hooks.url("/flags/{monitor}/disable?who={reason}&n=1"), "method": "PUT"}
    )
    action = FLAG_HTTP.build("flag-off", options)
    incident = Incident("i-1", monitor, Event.ROLLBACK, "a&b=c d+e/..", 0.0, "armed", "staging")
    try:
        await action.run(ActionContext(incident, 0, 1, "i-1:0"))
    finally:
        await action.aclose()
    [received] = hooks.requests
    assert received.raw_path.split("?")[0] == raw
    assert received.query == {"who": "a&b=c d+e/..", "n": "1"}


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
        ok, detail, transient = await attempt_once(action, context(), 0.3)
    finally:
        await action.aclose()
    assert (ok, detail, transient) == (False, "timed out after 0.3s", True)
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
    trigger = {
        "outcome": "breach",
        "results": [
            {"rule": "payment-success-rate", "verdict": "breach"},
            {"rule": "payment-error-rate", "verdict": "breach"},
            {"rule": "payment-response-time", "verdict": "ok"},
        ],
    }
    try:
        detail = await action.run(context(incident_id=incident_id, details={"trigger": trigger}))
        assert detail.startswith("RollbackdRollback posted")
        [alert] = await asyncio.to_thread(wait_for, alertmanager.alerts, 10.0)
        assert alert["labels"] == {
            "alertname": "RollbackdRollback",
            "monitor": "payments",
            "rule": "payment-error-rate,payment-success-rate",
            "severity": "page",
            "environment": "staging",
            "incident": incident_id,
            "team": "boop",
        }
        assert alert["annotations"]["reason"] == 'payment-error-rate 3.2 % > 0.1 % ("eu")'
        assert alert["annotations"]["summary"] == "rollbackd rolled back payments"
        assert alert["status"]["state"] == "active"

        resolves = {"resolves": incident_id, "trigger": trigger}
        rearm = context(
            event=Event.REARM, incident_id="20261125T130000Z-payments-cd34", details=resolves
        )
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
        await action.run(context(event=Event.ALERT, incident_id="a-1"))
        await action.run(context(event=Event.BLIND, incident_id="b-1"))
    finally:
        await action.aclose()
    alerts = await asyncio.to_thread(
        wait_for, lambda: len(alertmanager.alerts()) == 2 and alertmanager.alerts(), 10.0
    )
    names = {(a["labels"]["alertname"], a["labels"]["incident"]) for a in alerts}
    assert names == {("RollbackdAlert", "a-1"), ("RollbackdBlind", "b-1")}
    assert {a["labels"]["severity"] for a in alerts} == {"critical"}


async def test_webhook_verifies_https_server_with_ca_file(
    https_hooks: HookServer, certificate: Certificate
) -> None:
    """With ca_file naming the server's CA, an https webhook is delivered (twice, one client)."""
    options = ALERT_WEBHOOK.options.model_validate(
        {"url": https_hooks.url("/hooks/tls"), "ca_file": str(certificate.cert)}
    )
    action = ALERT_WEBHOOK.build("notify", options)
    try:
        detail = await action.run(context())
        await action.run(context())
    finally:
        await action.aclose()
    assert detail == f"POST {https_hooks.url('/hooks/tls')}: HTTP 200"
    assert len(https_hooks.at("/hooks/tls")) == 2


async def test_unknown_ca_fails_with_certificate_verification_error(
    https_hooks: HookServer,
) -> None:
    """Without ca_file a server signed by an unknown CA fails the attempt, saying why."""
    options = ALERT_WEBHOOK.options.model_validate({"url": https_hooks.url("/hooks/tls")})
    action = ALERT_WEBHOOK.build("notify", options)
    try:
        with pytest.raises(ActionError) as caught:
            await action.run(context())
    finally:
        await action.aclose()
    message = str(caught.value)
    assert message.startswith(f"POST {https_hooks.url('/hooks/tls')}: ")
    assert "certificate verification failed: self-signed certificate" in message
    assert "ca_file" in message
    assert https_hooks.requests == []


async def test_tls_verify_false_accepts_any_certificate_and_warns_once(
    https_hooks: HookServer,
) -> None:
    """tls_verify = false delivers to an unverifiable server; tls_verify_disabled is logged once."""
    options = FLAG_HTTP.options.model_validate(
        {"url": https_hooks.url("/flags/boop"), "tls_verify": False}
    )
    with capture_logs() as logs:
        action = FLAG_HTTP.build("stop", options)
        try:
            await action.run(context())
            await action.run(context())
        finally:
            await action.aclose()
    assert len(https_hooks.at("/flags/boop")) == 2
    warnings = [e for e in logs if e["event"] == "tls_verify_disabled"]
    assert warnings == [{"event": "tls_verify_disabled", "action": "stop", "log_level": "warning"}]


def test_verified_actions_do_not_warn(certificate: Certificate) -> None:
    """Building an action that verifies certificates logs no tls_verify_disabled warning."""
    with capture_logs() as logs:
        ALERT_WEBHOOK.build("notify", WebhookOptions.model_validate({"url": "https://x/"}))
        ALERT_WEBHOOK.build(
            "notify",
            WebhookOptions.model_validate({"url": "https://x/", "ca_file": str(certificate.cert)}),
        )
    assert logs == []


def _action_problems(action: dict[str, Any]) -> list[str]:
    """Return check-config's problems for a config holding only ``[actions.notify]``."""
    with pytest.raises(ConfigError) as caught:
        from_dict({"actions": {"notify": action}}, secrets=False)
    return caught.value.problems


@pytest.mark.parametrize(
    ("kind", "extra"),
    [
        ("alert.webhook", {}),
        ("alert.alertmanager", {}),
        ("flag.http", {"method": "PUT"}),
        ("route.http", {}),
    ],
)
def test_missing_ca_file_names_the_key(tmp_path: Path, kind: str, extra: dict[str, Any]) -> None:
    """A ca_file that does not exist is a config error on actions.NAME.ca_file for every type."""
    missing = tmp_path / "internal-ca.pem"
    problems = _action_problems(
        {"type": kind, "url": "https://127.0.0.1:1/", "ca_file": str(missing), **extra}
    )
    assert problems == [
        f"<config>: actions.notify.ca_file: cannot read {missing}: No such file or directory"
    ]


def test_ca_file_must_hold_a_certificate(tmp_path: Path, certificate: Certificate) -> None:
    """A directory or a file without a PEM certificate (e.g. the key) is refused on load."""
    url = "https://127.0.0.1:1/"
    [problem] = _action_problems({"type": "alert.webhook", "url": url, "ca_file": str(tmp_path)})
    assert problem == f"<config>: actions.notify.ca_file: cannot read {tmp_path}: Is a directory"
    [problem] = _action_problems(
        {"type": "alert.webhook", "url": url, "ca_file": str(certificate.key)}
    )
    assert problem.startswith(
        f"<config>: actions.notify.ca_file: {certificate.key} holds no PEM certificate"
    )


def test_ca_file_and_tls_verify_false_conflict(certificate: Certificate) -> None:
    """ca_file with tls_verify = false is refused on tls_verify rather than silently ignored."""
    with pytest.raises(ValidationError) as caught:
        WebhookOptions.model_validate(
            {"url": "https://x/", "ca_file": str(certificate.cert), "tls_verify": False}
        )
    [error] = caught.value.errors()
    assert error["loc"] == ("tls_verify",)
    assert "ignores ca_file" in error["msg"]


async def test_alertmanager_stamps_alerts_with_the_injected_clock(hooks: HookServer) -> None:
    """A rollback alert ends a week after the action's clock says; it starts with the incident."""
    options = ALERT_ALERTMANAGER.options.model_validate({"url": hooks.url("/am")})
    action = AlertmanagerAction("page-oncall", options, clock=lambda: 1_795_000_060.0)
    try:
        await action.run(context())
    finally:
        await action.aclose()
    [received] = hooks.at("/am/api/v2/alerts")
    [alert] = json.loads(received.body)
    assert alert["startsAt"] == "2026-11-18T11:06:40Z"
    assert alert["endsAt"] == "2026-11-25T11:07:40Z"


def test_only_the_alerts_resolve() -> None:
    """alert.webhook and alert.alertmanager declare resolves; flag.http and route.http do not."""
    assert (ALERT_WEBHOOK.resolves, ALERT_ALERTMANAGER.resolves) == (True, True)
    assert (FLAG_HTTP.resolves, ROUTE_HTTP.resolves) == (False, False)


def test_every_event_has_an_alertname_and_a_summary() -> None:
    """Alertmanager can be told of any event (shadow included): none fails for want of a name."""
    from rollbackd.actions.web import ALERT_NAMES, _summary  # noqa: PLC0415
    from rollbackd.engine import Event as Events  # noqa: PLC0415

    assert set(ALERT_NAMES) == set(Events)
    for event in Events:
        assert _summary(context(event=event))
