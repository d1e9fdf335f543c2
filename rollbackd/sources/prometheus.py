"""The ``prometheus`` source: PromQL instant queries through one aiohttp session per source.

Each series of a vector is one reading with its labels; a scalar is one reading without labels.
Every failure (HTTP, connection, timeout, bad JSON, unexpected result type) is an error reading.
"""

from __future__ import annotations

import asyncio
import base64
import math
import ssl
from collections.abc import Sequence
from typing import TYPE_CHECKING, Annotated

import structlog
from pydantic import Field, field_validator, model_validator

from rollbackd.config import RuleConfig
from rollbackd.errors import SecretError
from rollbackd.options import CaFile, Duration, Frozen, HttpSecretRef, NoUserinfo
from rollbackd.readings import Reading, error, excerpt, labels_of, no_data, ok, parse_number
from rollbackd.sources import ArrivalListener, SourceType
from rollbackd.sources.prometheus_http import InstantQueries, PrometheusHttp

if TYPE_CHECKING:
    from prometheus_api_client import PrometheusConnect

log = structlog.get_logger(__name__)

_PAIR = 2  # a sample is [time, "value"]
_SPECIAL = {"NaN": math.nan, "+Inf": math.inf, "Inf": math.inf, "-Inf": -math.inf}
"""How Prometheus writes its non-finite sample values (Go's strconv)."""


class BasicAuth(Frozen):
    """HTTP basic authentication; the password is a secret reference."""

    username: str = Field(min_length=1)
    password: HttpSecretRef

    @field_validator("username")
    @classmethod
    def _sendable(cls, username: str) -> str:
        if ":" in username or not username.isprintable() or max(map(ord, username)) > 0xFF:
            raise ValueError("username must be printable Latin-1 text without ':'")
        return username


class PrometheusOptions(Frozen):
    """``[sources.NAME]`` keys of ``type = "prometheus"``."""

    url: Annotated[str, NoUserinfo]
    timeout: Duration = 5.0
    """Per query, connection included; a query that takes longer reads as an error."""
    bearer_token: HttpSecretRef | None = None
    basic_auth: BasicAuth | None = None
    ca_file: CaFile | None = None
    """PEM bundle to verify the server's certificate with (https URLs)."""
    tls_verify: bool = True
    max_concurrency: int = Field(default=4, ge=1, le=64)
    """Queries of this source in flight at once (and its kept-alive connections)."""

    @field_validator("url")
    @classmethod
    def _http_url(cls, url: str) -> str:
        if not url.startswith(("http://", "https://")):
            raise ValueError(f"url must start with http:// or https://, not {excerpt(url)!r}")
        return url.rstrip("/")

    @model_validator(mode="after")
    def _one_auth(self) -> PrometheusOptions:
        if self.bearer_token is not None and self.basic_auth is not None:
            raise ValueError("give at most one of bearer_token / basic_auth")
        return self


def open_client(options: PrometheusOptions) -> PrometheusHttp:
    """The instant-query client for ``options``, revealing its secret now.

    SecretError if a secret is unreadable, OSError if ``ca_file`` is (the text names neither
    value). As with requests before, a ``ca_file`` verifies whatever ``tls_verify`` says.
    """
    headers = {}
    if options.bearer_token is not None:
        headers["Authorization"] = f"Bearer {_reveal('bearer_token', options.bearer_token)}"
    if options.basic_auth is not None:
        password = _reveal("basic_auth.password", options.basic_auth.password)
        # HttpSecretRef and the username's validator admit Latin-1 text only
        pair = f"{options.basic_auth.username}:{password}".encode("latin-1")
        headers["Authorization"] = f"Basic {base64.b64encode(pair).decode('ascii')}"
    tls: ssl.SSLContext | bool = options.tls_verify
    if options.ca_file is not None:
        tls = ssl.create_default_context(cafile=options.ca_file)
    return PrometheusHttp(options.url, headers, tls, options.max_concurrency)


def connect(options: PrometheusOptions) -> PrometheusConnect:
    """A prometheus-api-client for range queries (the backtest); the daemon does not use it.

    Its secrets are revealed now (SecretError if one is unreadable). Retries are off: the
    engine polls again at the next check, and a retry with backoff inside one query would only
    make an outage look like a timeout. requests runs synchronously: call it in a thread.
    """
    # Imported here: the daemon never needs requests or prometheus-api-client (memory).
    import requests  # noqa: PLC0415
    from prometheus_api_client import PrometheusConnect  # noqa: PLC0415
    from urllib3.util.retry import Retry  # noqa: PLC0415

    session = requests.Session()
    session.verify = str(options.ca_file) if options.ca_file else options.tls_verify
    headers = None
    if options.bearer_token is not None:
        headers = {"Authorization": f"Bearer {_reveal('bearer_token', options.bearer_token)}"}
    auth = None
    if options.basic_auth is not None:
        password = _reveal("basic_auth.password", options.basic_auth.password)
        auth = (options.basic_auth.username, password)
    return PrometheusConnect(
        url=options.url,
        headers=headers,
        auth=auth,
        session=session,
        timeout=options.timeout,
        retry=Retry(total=0, raise_on_status=False),
    )


def _reveal(key: str, secret: HttpSecretRef) -> str:
    try:
        return secret.reveal()
    except SecretError as exc:
        raise SecretError(f"{key}: {exc}") from exc


class PrometheusSource:
    """Polls Prometheus; ``client`` may be handed in (tests), otherwise built on ``start``."""

    push = False

    def __init__(
        self, name: str, options: PrometheusOptions, client: InstantQueries | None = None
    ) -> None:
        self.name = name
        self.options = options
        self._client = client
        self._client_problem = ""
        self._closed = False
        self._slots = asyncio.Semaphore(options.max_concurrency)

    def watch(self, monitor: str, rule: RuleConfig) -> None:
        """Nothing to prepare: every read is a fresh query."""

    def add_listener(self, listener: ArrivalListener) -> None:
        """Ignore listeners: a polled source has no arrivals to report."""

    async def start(self) -> None:
        """Open the HTTP session (no request is made); a secret is revealed here."""
        self._closed = False
        self._ensure_client()

    async def aclose(self) -> None:
        """Close the HTTP session; a query still in flight reads as an error."""
        self._closed = True
        client, self._client = self._client, None
        if client is not None:
            await client.aclose()

    def _ensure_client(self) -> InstantQueries | None:
        # Built again at each read while a secret or the ca_file cannot be read: fixing it heals.
        if self._client is None:
            try:
                self._client = open_client(self.options)
            except SecretError as exc:
                self._client_problem = f"cannot use the secret {exc}"
            except OSError as exc:  # ssl.SSLError included
                self._client_problem = f"cannot read ca_file {self.options.ca_file}: {exc}"
        return self._client

    async def read(self, rule: RuleConfig, now: float) -> Sequence[Reading]:
        """Run ``rule.query`` once; never raises (a failure is an error reading with the reason)."""
        query = rule.query or ""
        try:
            return await self._read(query, now)
        except Exception as exc:  # the outermost edge: one odd answer must not crash the check
            log.exception("source_read_failed", source=self.name, query=excerpt(query))
            return [self._failed(query, f"unexpected {type(exc).__name__}", now)]

    async def _read(self, query: str, now: float) -> Sequence[Reading]:
        if self._closed:
            return [self._failed(query, "the source is closed", now)]
        client = self._ensure_client()
        if client is None:
            return [self._failed(query, self._client_problem, now)]
        timeout = self.options.timeout
        try:
            async with asyncio.timeout(timeout), self._slots:
                result, problem = await client.query(query)
        except TimeoutError:
            return [self._failed(query, f"timed out after {timeout:g}s", now)]
        if not problem:
            readings, problem = parse_result(result, now)
            if not problem:
                return readings
        return [self._failed(query, problem, now)]

    def _failed(self, query: str, reason: str, now: float) -> Reading:
        log.warning("source_error", source=self.name, query=excerpt(query), reason=reason)
        return error(f"{reason} (query: {excerpt(query)})", now)


def parse_result(result: object, now: float) -> tuple[list[Reading], str]:
    """Turn an instant query's ``data.result`` into readings, or ``([], problem)``.

    ``result`` is a list of series for a vector (each with ``value``) or a matrix (each with
    ``values``), or a ``[time, "value"]`` pair for a scalar.
    """
    if not isinstance(result, list):
        return [], f"unexpected result: {type(result).__name__}"
    if not result:
        return [no_data("empty result", now)], ""
    if len(result) == _PAIR and not isinstance(result[0], dict):
        value = sample_value(result[1])
        if value is None:
            return [], f"result is not a number: {excerpt(str(result[1]))!r}"
        return [ok(value, now)], ""
    readings = []
    for series in result:
        reading, problem = _series(series, now)
        if reading is None:
            return [], problem
        readings.append(reading)
    return readings, ""


def sample_value(value: object) -> float | None:
    """A sample value as Prometheus writes it: a decimal number, ``NaN``, ``+Inf`` or ``-Inf``.

    ±Inf are values (beyond any threshold) and NaN reads as no data, as ``engine`` means them.
    """
    if isinstance(value, str) and value in _SPECIAL:
        return _SPECIAL[value]
    return parse_number(value)


def _series(series: object, now: float) -> tuple[Reading | None, str]:
    if not isinstance(series, dict) or "value" not in series:
        if isinstance(series, dict) and "values" in series:
            return None, "result is a range vector (matrix): use an instant query"
        return None, "unexpected result: not a vector"
    metric = series.get("metric", {})
    if not isinstance(metric, dict):
        return None, f"unexpected result: a series' metric is a {type(metric).__name__}"
    labels = labels_of({str(k): str(v) for k, v in metric.items()})
    pair = series["value"]
    value = sample_value(pair[1]) if isinstance(pair, list) and len(pair) == _PAIR else None
    if value is None:
        return None, f"series {excerpt(str(dict(labels)))} has no numeric value"
    return ok(value, now, labels), ""


PROMETHEUS = SourceType(
    options=PrometheusOptions, rule_keys=frozenset({"query"}), build=PrometheusSource
)
"""Entry point ``prometheus`` of ``rollbackd.sources``."""

__all__ = [
    "PROMETHEUS",
    "BasicAuth",
    "PrometheusOptions",
    "PrometheusSource",
    "connect",
    "open_client",
    "parse_result",
]
