"""The ``prometheus`` source: PromQL instant queries through prometheus-api-client, off the loop.

Each series of a vector is one reading with its labels; a scalar is one reading without labels.
Every failure (HTTP, connection, timeout, bad JSON, unexpected result type) is an error reading.
Queries run on the source's own bounded thread pool, started with it and shut down by ``aclose``.
"""

from __future__ import annotations

import ast
import asyncio
import json
import math
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Annotated, Any

import requests
import structlog
from prometheus_api_client import PrometheusConnect
from prometheus_api_client.exceptions import PrometheusApiClientException
from pydantic import Field, field_validator, model_validator
from urllib3.util.retry import Retry

from rollbackd.config import RuleConfig
from rollbackd.errors import SecretError
from rollbackd.options import CaFile, Duration, Frozen, HttpSecretRef, NoUserinfo
from rollbackd.readings import Reading, error, excerpt, labels_of, no_data, ok, parse_number
from rollbackd.sources import ArrivalListener, SourceType

log = structlog.get_logger(__name__)

_PAIR = 2  # a sample is [time, "value"]
_FAILURES = (
    TimeoutError,
    PrometheusApiClientException,
    requests.exceptions.RequestException,
    KeyError,
    TypeError,
    ValueError,  # e.g. a JSON integer of more than 4300 digits
    RecursionError,  # JSON nested too deep for the parser
)
_SPECIAL = {"NaN": math.nan, "+Inf": math.inf, "Inf": math.inf, "-Inf": -math.inf}
"""How Prometheus writes its non-finite sample values (Go's strconv)."""
CLOSE_GRACE = 1.0
"""Seconds beyond ``timeout`` that ``aclose`` waits for a query still running in a thread."""


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
    """Queries of this source in flight at once (each runs in a worker thread)."""

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


def connect(options: PrometheusOptions) -> PrometheusConnect:
    """Build a client for ``options``, revealing its secrets (SecretError if one is unreadable).

    Retries are off: the engine polls again at the next check, and a retry with backoff
    inside one query would only make an outage look like a timeout.
    """
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
        self, name: str, options: PrometheusOptions, client: PrometheusConnect | None = None
    ) -> None:
        self.name = name
        self.options = options
        self._client = client
        self._client_problem = ""
        self._slots = asyncio.Semaphore(options.max_concurrency)
        self._pool: ThreadPoolExecutor | None = None
        self._running: set[Future[Any]] = set()

    def watch(self, monitor: str, rule: RuleConfig) -> None:
        """Nothing to prepare: every read is a fresh query."""

    def add_listener(self, listener: ArrivalListener) -> None:
        """Ignore listeners: a polled source has no arrivals to report."""

    async def start(self) -> None:
        """Build the HTTP client and the query threads' pool (no request is made)."""
        self._ensure_client()
        self._ensure_pool()

    async def aclose(self) -> None:
        """Stop the pool, wait (bounded) for queries still in threads, close the HTTP session."""
        pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=False, cancel_futures=True)
            running = [asyncio.wrap_future(future) for future in list(self._running)]
            if running:
                _, late = await asyncio.wait(running, timeout=self.options.timeout + CLOSE_GRACE)
                if late:
                    log.warning(
                        "prometheus_query_outlived_close", source=self.name, queries=len(late)
                    )
            if not self._running:
                pool.shutdown(wait=True)  # the workers are idle: joining them is immediate
        if self._client is not None:
            self._client.close()
            self._client = None

    def _ensure_pool(self) -> ThreadPoolExecutor:
        # One pool per source, bounded by max_concurrency: a stuck file action or another
        # source's hung queries cannot take the threads this source's queries need.
        if self._pool is None:
            self._pool = ThreadPoolExecutor(
                max_workers=self.options.max_concurrency,
                thread_name_prefix=f"rollbackd-prometheus-{self.name}",
            )
        return self._pool

    def _ensure_client(self) -> PrometheusConnect | None:
        if self._client is None:
            try:
                self._client = connect(self.options)
            except SecretError as exc:
                self._client_problem = f"cannot use the secret {exc}"
                return None
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
        client = self._ensure_client()
        if client is None:
            return [self._failed(query, self._client_problem, now)]
        timeout = self.options.timeout
        try:
            async with asyncio.timeout(timeout), self._slots:
                future = self._ensure_pool().submit(client.custom_query, query, timeout=timeout)
                self._running.add(future)
                future.add_done_callback(self._running.discard)
                result = await asyncio.wrap_future(future)
        except _FAILURES as exc:
            return [self._failed(query, self._describe(exc), now)]
        readings, problem = parse_result(result, now)
        if problem:
            return [self._failed(query, problem, now)]
        return readings

    def _describe(self, exc: Exception) -> str:
        timeout = self.options.timeout
        if isinstance(exc, TimeoutError | requests.exceptions.Timeout):
            reason = f"timed out after {timeout:g}s"
        elif isinstance(exc, requests.exceptions.InvalidHeader):  # its text holds the header
            reason = "a request header is invalid (check bearer_token / basic_auth)"
        elif isinstance(exc, PrometheusApiClientException):
            reason = _api_problem(str(exc))
        elif isinstance(exc, requests.exceptions.JSONDecodeError):
            reason = f"malformed JSON in response: {exc}"
        elif isinstance(exc, requests.exceptions.ConnectionError):
            reason = f"cannot connect to {self.options.url}: {_short(exc)}"
        elif isinstance(exc, requests.exceptions.RequestException):
            reason = f"request failed: {_short(exc)}"
        elif isinstance(exc, RecursionError):
            reason = "malformed response: JSON nested too deep"
        else:  # KeyError / TypeError / ValueError: the JSON lacks data.result or is odd
            reason = f"malformed response: {type(exc).__name__} {excerpt(str(exc))}"
        return reason

    def _failed(self, query: str, reason: str, now: float) -> Reading:
        log.warning("source_error", source=self.name, query=excerpt(query), reason=reason)
        return error(f"{reason} (query: {excerpt(query)})", now)


def parse_result(result: object, now: float) -> tuple[list[Reading], str]:
    """Turn an instant query's ``data.result`` into readings, or ``([], problem)``.

    prometheus-api-client returns only ``result``: a list of series for a vector (each with
    ``value``) or a matrix (each with ``values``), or a ``[time, "value"]`` pair for a scalar.
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


def _api_problem(message: str) -> str:
    # the client's text is 'HTTP Status Code 400 (b\'{"errorType": ..., "error": ...}\')'
    head, _, rest = message.partition(" (")
    status = head.replace("HTTP Status Code", "HTTP").strip()
    try:
        body = ast.literal_eval(rest.removesuffix(")"))
        payload: dict[str, Any] = json.loads(body)
        return f"{status}: {payload['errorType']}: {payload['error']}"
    except (ValueError, SyntaxError, TypeError, KeyError):
        return f"{status}: {rest.removesuffix(')')[:200]}"


def _short(exc: BaseException) -> str:
    # requests' messages nest urllib3's, whose tail names the real problem

    text = str(exc)
    for known in ("Connection refused", "Name or service not known", "No route to host"):
        if known in text:
            return known.lower()
    return text[:200]


PROMETHEUS = SourceType(
    options=PrometheusOptions, rule_keys=frozenset({"query"}), build=PrometheusSource
)
"""Entry point ``prometheus`` of ``rollbackd.sources``."""

__all__ = ["PROMETHEUS", "BasicAuth", "PrometheusOptions", "PrometheusSource", "parse_result"]
