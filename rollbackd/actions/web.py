"""HTTP actions (aiohttp): ``flag.http``, ``route.http``, ``alert.webhook``, ``alert.alertmanager``.

Every request carries the attempt's ``Idempotency-Key``; a non-2xx answer, a connection error,
a failed certificate check or a timeout is an ActionError with the reason. ``ca_file`` /
``tls_verify`` are named as in the ``prometheus`` source and checked on load.
"""

from __future__ import annotations

import datetime as dt
import re
import ssl
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Annotated, Any, Generic, Literal, TypeVar

import aiohttp
import structlog
from pydantic import AfterValidator, AnyHttpUrl, Field, ValidationInfo, field_validator
from yarl import URL

from rollbackd.actions import ActionContext, ActionType, Event
from rollbackd.actions.templates import (
    Template,
    TemplateTree,
    fields,
    incident_payload,
    render,
    render_tree,
    render_url,
)
from rollbackd.errors import ActionError, SecretError
from rollbackd.options import CaFile, Duration, Frozen, HttpSecretRef, NoUserinfo, SecretRef
from rollbackd.readings import excerpt

log = structlog.get_logger(__name__)

EXCERPT_CHARS = 200
_LABEL_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_OWN_LABELS = frozenset({"alertname", "monitor", "rule", "severity", "environment", "incident"})
ROLLBACK_ALERT_SECONDS = 7 * 86400.0
"""A rollback alert fires until the monitor is re-armed (which resolves it), at most a week."""
TEST_ALERT_SECONDS = 300.0

_HEADER_NAME = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
HttpUrl = Annotated[AnyHttpUrl, NoUserinfo]
"""An http(s) URL without ``user:password@``."""


def _check_headers(
    headers: dict[str, str | HttpSecretRef],
) -> dict[str, str | HttpSecretRef]:
    for name, value in headers.items():
        if not _HEADER_NAME.fullmatch(name):
            raise ValueError(f"{excerpt(name)!r} is not a valid header name")
        if isinstance(value, str) and not value.isprintable():
            raise ValueError(f"header {name}: the value must be one line of printable text")
    return headers


Headers = Annotated[dict[str, str | HttpSecretRef], AfterValidator(_check_headers)]
"""Header values are one-line strings or secret references (``{ env = "TOKEN" }``)."""


def _http_url(url: str) -> str:
    if not url.startswith(("http://", "https://")):
        raise ValueError(f"{excerpt(url)!r} is not an http:// or https:// URL")
    return url


class TlsOptions(Frozen):
    """How https servers are verified; the keys and meaning of the ``prometheus`` source's."""

    ca_file: CaFile | None = None
    """PEM bundle to verify the server's certificate with, instead of the system's CAs."""
    tls_verify: bool = True
    """``false`` accepts any certificate (warned as ``tls_verify_disabled``)."""

    @field_validator("tls_verify")
    @classmethod
    def _ca_file_verifies(cls, verify: bool, info: ValidationInfo) -> bool:
        if not verify and info.data.get("ca_file") is not None:
            raise ValueError("tls_verify = false ignores ca_file: give one or the other")
        return verify


def ssl_context(options: TlsOptions) -> ssl.SSLContext | bool:
    """The ``ssl`` argument of aiohttp for ``options``; OSError if ``ca_file`` became unreadable."""
    if options.ca_file is None and options.tls_verify:
        return True  # aiohttp's default context: the system's CAs
    context = ssl.create_default_context(cafile=options.ca_file)
    if not options.tls_verify:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    return context


def safe_url(url: str | URL) -> str:
    """``url`` without credentials, query or fragment, cut short: fit for logs and details."""
    try:
        return excerpt(str(URL(url).with_user(None).with_query(None).with_fragment(None)))
    except ValueError:
        return "<invalid url>"


@dataclass(slots=True)
class HttpClient:
    """One lazily opened aiohttp session; ``send`` turns every failure into ActionError.

    The TLS context is built at the first request and kept for the client's lifetime.
    """

    tls: TlsOptions = field(default_factory=TlsOptions)
    _ssl: ssl.SSLContext | bool | None = field(default=None, init=False)
    _session: aiohttp.ClientSession | None = field(default=None, init=False)

    def _open(self) -> aiohttp.ClientSession:
        if self._ssl is None:
            try:
                self._ssl = ssl_context(self.tls)
            except OSError as exc:
                raise ActionError(f"ca_file {self.tls.ca_file}: {exc.strerror or exc}") from exc
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=self._ssl))
        return self._session

    async def send(
        self,
        method: str,
        url: str | URL,
        headers: Mapping[str, str],
        *,
        json_body: Any = None,
        data: str | None = None,
    ) -> str:
        """Send one request; return ``"METHOD url: HTTP status"``."""
        session = self._open()
        where = f"{method} {safe_url(url)}"
        try:
            async with session.request(
                method, url, headers=dict(headers), json=json_body, data=data
            ) as response:
                status = response.status
                raw = await response.content.read(EXCERPT_CHARS * 4)
        except aiohttp.ClientConnectorCertificateError as exc:
            cause = exc.certificate_error
            reason = getattr(cause, "verify_message", "") or str(cause)
            raise ActionError(
                f"{where}: certificate verification failed: {reason} "
                "(set ca_file to the PEM bundle of the CA that signed it)"
            ) from exc
        except aiohttp.ClientError as exc:
            raise ActionError(f"{where}: {type(exc).__name__}: {excerpt(str(exc))}") from exc
        except TimeoutError as exc:
            raise ActionError(f"{where}: timed out") from exc
        if not 200 <= status < 300:
            said = " ".join(raw.decode("utf-8", "replace").split())[:EXCERPT_CHARS]
            raise ActionError(
                f"{where}: HTTP {status}: {said or '(empty body)'}",
                transient=status >= 500 or status == 429,  # the server may recover
            )
        return f"{where}: HTTP {status}"

    async def aclose(self) -> None:
        """Close the session if one was opened."""
        if self._session is not None:
            await self._session.close()
            self._session = None


def http_client(name: str, options: TlsOptions) -> HttpClient:
    """The client of action ``name``; warns once here if it will not verify certificates."""
    if not options.tls_verify:
        log.warning("tls_verify_disabled", action=name)
    return HttpClient(options)


HttpOptionsT = TypeVar("HttpOptionsT", bound=TlsOptions)


class HttpAction(Generic[HttpOptionsT]):
    """What the HTTP actions share: their options, one client (closed by ``aclose``), a clock.

    ``client`` defaults to one built from the options; ``clock`` gives the wall-clock time
    (unix seconds) of what the action stamps, e.g. an Alertmanager alert's ``startsAt``.
    """

    def __init__(
        self,
        name: str,
        options: HttpOptionsT,
        client: HttpClient | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.name = name
        self.options = options
        self.client = client if client is not None else http_client(name, options)
        self.clock = clock

    async def aclose(self) -> None:
        """Close the HTTP session."""
        await self.client.aclose()


def _headers(configured: Headers, ctx: ActionContext) -> dict[str, str]:
    """Reveal the configured headers' secrets and add the attempt's Idempotency-Key."""
    out: dict[str, str] = {}
    for name, value in configured.items():
        try:
            out[name] = value.reveal() if isinstance(value, SecretRef) else value
        except SecretError as exc:
            raise ActionError(f"header {name}: {exc}") from None  # no secret in the chain
    if not any(name.lower() == "idempotency-key" for name in out):
        out["Idempotency-Key"] = ctx.idempotency_key
    return out


# --- flag.http / route.http ------------------------------------------------------------


class HttpRequestOptions(TlsOptions):
    """``flag.http`` / ``route.http``: one templated request to a flag or routing service's API."""

    url: Annotated[Template, NoUserinfo]
    """A ``{field}`` is sent encoded as one path segment, or one query value after ``?``."""
    method: Literal["GET", "POST", "PUT", "PATCH", "DELETE"] = "POST"
    headers: Headers = Field(default_factory=dict)
    body: TemplateTree | None = None
    """A string is sent as written (after templating); a table is sent as JSON."""

    @field_validator("url")
    @classmethod
    def _http(cls, url: str) -> str:
        return _http_url(url)


class HttpRequestAction(HttpAction[HttpRequestOptions]):
    """Sends the configured request; success is any 2xx answer."""

    async def run(self, ctx: ActionContext) -> str:
        """Render url/body with the incident's fields and send the request."""
        o = self.options
        values = fields(ctx)
        url = URL(render_url(o.url, values), encoded=True)  # as rendered: no re-normalising
        headers = _headers(o.headers, ctx)
        if isinstance(o.body, str):
            if not any(name.lower() == "content-type" for name in headers):
                headers["Content-Type"] = "text/plain; charset=utf-8"
            return await self.client.send(o.method, url, headers, data=render(o.body, values))
        body = None if o.body is None else render_tree(o.body, values)
        return await self.client.send(o.method, url, headers, json_body=body)


# --- alert.webhook -----------------------------------------------------------------------


class WebhookOptions(TlsOptions):
    """``alert.webhook``: POST a JSON document describing the incident."""

    url: HttpUrl
    headers: Headers = Field(default_factory=dict)


class WebhookAction(HttpAction[WebhookOptions]):
    """POSTs the incident as JSON (see ``templates.incident_payload``)."""

    async def run(self, ctx: ActionContext) -> str:
        """POST the incident document."""
        headers = _headers(self.options.headers, ctx)
        url = str(self.options.url)
        return await self.client.send("POST", url, headers, json_body=incident_payload(ctx))


# --- alert.alertmanager ------------------------------------------------------------------

ALERT_NAMES = {
    Event.ROLLBACK: "RollbackdRollback",
    Event.REARM: "RollbackdRollback",
    Event.ALERT: "RollbackdAlert",
    Event.BLIND: "RollbackdBlind",
    Event.SHADOW: "RollbackdShadow",
    Event.TEST: "RollbackdTest",
    Event.PROMOTE: "RollbackdPromotion",
}
"""Every event has one (a test pins it): an event without an alertname would fail its step."""


class AlertmanagerOptions(TlsOptions):
    """``alert.alertmanager``: post an alert to Alertmanager's API v2 (resolved on re-arm)."""

    url: HttpUrl
    severity: str = "critical"
    labels: dict[str, str] = Field(default_factory=dict)
    generator_url: HttpUrl | None = None
    headers: Headers = Field(default_factory=dict)
    resolve_after: Duration = 3600.0
    """Warnings (alert, blind events) end by themselves after this; rollbacks end on re-arm."""

    @field_validator("labels")
    @classmethod
    def _label_names(cls, labels: dict[str, str]) -> dict[str, str]:
        for name in labels:
            if not _LABEL_NAME.fullmatch(name):
                raise ValueError(f"{name!r} is not a valid label name")
            if name in _OWN_LABELS:
                raise ValueError(f"label {name!r} is set by rollbackd itself")
        return labels


def _iso(seconds: float) -> str:
    return dt.datetime.fromtimestamp(seconds, dt.UTC).isoformat().replace("+00:00", "Z")


def _summary(ctx: ActionContext) -> str:
    incident = ctx.incident
    dry = " (dry-run: nothing was changed)" if incident.mode != "armed" else ""
    return {
        Event.ROLLBACK: f"rollbackd rolled back {incident.monitor}{dry}",
        Event.REARM: f"rollbackd monitor {incident.monitor} re-armed",
        Event.ALERT: f"rollbackd: {incident.monitor} is failing its checks",
        Event.BLIND: f"rollbackd: {incident.monitor} is blind (its sources give no data)",
        Event.SHADOW: f"rollbackd: shadow rules of {incident.monitor} would have rolled back",
        Event.TEST: f"rollbackd test alert ({incident.monitor})",
        Event.PROMOTE: f"rollbackd promoted {incident.monitor}: {incident.reason}{dry}",
    }[incident.event]


def triggering_rules(details: Mapping[str, Any]) -> str:
    """Names of the rules that were not ok in the triggering check, sorted, comma-separated.

    A re-arm carries the trigger of the incident it resolves, so its labels match the alert's.
    """
    trigger = details.get("trigger")
    results = trigger.get("results", []) if isinstance(trigger, Mapping) else []
    names = {
        str(r.get("rule"))
        for r in results
        if isinstance(r, Mapping) and r.get("verdict") in {"breach", "no_data", "error"}
    }
    return ",".join(sorted(names))


def alertmanager_alert(
    options: AlertmanagerOptions, ctx: ActionContext, now: float
) -> dict[str, Any]:
    """Build the API v2 alert for this incident; on re-arm, the resolve of the rollback alert."""
    incident = ctx.incident
    event = incident.event
    incident_label = incident.id
    if event is Event.REARM:
        incident_label = str(incident.details.get("resolves") or incident.id)
    labels = {
        **options.labels,
        "alertname": ALERT_NAMES[event],
        "monitor": incident.monitor,
        "severity": options.severity,
        "environment": incident.environment,
        "incident": incident_label,
    }
    rules = triggering_rules(incident.details)
    if rules:
        labels["rule"] = rules
    alert: dict[str, Any] = {"labels": labels}
    if event is Event.REARM:
        alert["endsAt"] = _iso(now)
    else:
        lasts = {Event.ROLLBACK: ROLLBACK_ALERT_SECONDS, Event.TEST: TEST_ALERT_SECONDS}
        alert["startsAt"] = _iso(min(incident.started_at, now))
        alert["endsAt"] = _iso(now + lasts.get(event, options.resolve_after))
        alert["annotations"] = {
            "summary": _summary(ctx),
            "reason": incident.reason,
            "mode": incident.mode,
        }
    if options.generator_url is not None:
        alert["generatorURL"] = str(options.generator_url)
    return alert


class AlertmanagerAction(HttpAction[AlertmanagerOptions]):
    """Posts one alert per incident to ``{url}/api/v2/alerts``, stamped by ``clock``."""

    async def run(self, ctx: ActionContext) -> str:
        """Post (or, on re-arm, resolve) the alert."""
        url = str(self.options.url).rstrip("/") + "/api/v2/alerts"
        alert = alertmanager_alert(self.options, ctx, self.clock())
        headers = _headers(self.options.headers, ctx)
        detail = await self.client.send("POST", url, headers, json_body=[alert])
        verb = "resolved" if ctx.incident.event is Event.REARM else "posted"
        return f"{alert['labels']['alertname']} {verb}: {detail}"


FLAG_HTTP = ActionType(options=HttpRequestOptions, build=HttpRequestAction)
ROUTE_HTTP = ActionType(options=HttpRequestOptions, build=HttpRequestAction)
ALERT_WEBHOOK = ActionType(options=WebhookOptions, build=WebhookAction, resolves=True)
ALERT_ALERTMANAGER = ActionType(
    options=AlertmanagerOptions, build=AlertmanagerAction, resolves=True
)
