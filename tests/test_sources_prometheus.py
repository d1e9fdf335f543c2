"""The prometheus source against a real Prometheus: series with labels, no data, errors, outages."""

from __future__ import annotations

import asyncio
import math
import shutil
import socket
import ssl
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import pytest
from aiohttp import web
from structlog.testing import capture_logs

from rollbackd.config import RuleConfig
from rollbackd.readings import Reading, ReadingStatus
from rollbackd.sources import source_types
from rollbackd.sources.prometheus import (
    PROMETHEUS,
    PrometheusOptions,
    PrometheusSource,
    open_client,
    parse_result,
)
from rollbackd.sources.prometheus_http import (
    ERROR_BODY_BYTES,
    MAX_RESPONSE_BYTES,
    Answer,
    InstantQueries,
)
from tests.helpers import wait_until
from tests.servers import Exporter, Prometheus, free_port
from tests.test_actions_web import Certificate, self_signed

NOW = 1_700_000_000.0


def rule(query: str) -> RuleConfig:
    """Build a rule reading ``query`` from the source under test."""
    return RuleConfig(name="r", source="prom", query=query, above=1.0)


def make_source(url: str, timeout: float = 2.0, **extra: object) -> PrometheusSource:
    """Build a source for ``url`` through the registry, as the daemon does."""
    kind = source_types().get("prometheus")
    options = kind.options.model_validate({"url": url, "timeout": f"{timeout}s", **extra})
    source = kind.build("prom", options)
    assert isinstance(source, PrometheusSource)
    return source


async def read_once(options: PrometheusOptions, query: str = "up") -> Reading:
    """Start a source on ``options``, read ``query`` once (one series), close the source."""
    source = PrometheusSource("prom", options)
    await source.start()
    try:
        [reading] = await source.read(rule(query), NOW)
    finally:
        await source.aclose()
    return reading


async def read_until(
    source: PrometheusSource,
    query: str,
    accept: Callable[[Sequence[Reading]], bool],
    timeout: float = 10.0,
) -> Sequence[Reading]:
    """Read ``query`` until ``accept`` likes the readings (scrapes happen every second)."""
    deadline = time.monotonic() + timeout
    while True:
        readings = await source.read(rule(query), NOW)
        if accept(readings) or time.monotonic() > deadline:
            return readings
        await asyncio.sleep(0.1)


@pytest.fixture
async def prom_source(prometheus: Prometheus) -> AsyncIterator[PrometheusSource]:
    """Start a source reading the session's Prometheus."""
    source = make_source(prometheus.url)
    await source.start()
    yield source
    await source.aclose()


@pytest.fixture(scope="module")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> Certificate:
    """One self-signed loopback certificate for the module's TLS tests."""
    return self_signed(tmp_path_factory.mktemp("tls"))


@pytest.fixture
def silent_port() -> Iterator[int]:
    """Listen on a loopback port that accepts connections and never answers (a hung server)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(16)
        yield int(sock.getsockname()[1])


def test_entry_point_is_registered() -> None:
    """The ``prometheus`` entry point resolves to this module's SourceType needing ``query``."""
    assert source_types().get("prometheus") is PROMETHEUS
    assert PROMETHEUS.rule_keys == {"query"}


def test_options_reject_inline_secrets_and_two_auths() -> None:
    """Secrets are references only, and bearer_token and basic_auth exclude each other."""
    with pytest.raises(ValueError, match="never written in the config"):
        PrometheusOptions.model_validate({"url": "http://x", "bearer_token": "abc"})
    with pytest.raises(ValueError, match="at most one of"):
        PrometheusOptions.model_validate(
            {
                "url": "http://x",
                "bearer_token": {"env": "T"},
                "basic_auth": {"username": "u", "password": {"env": "P"}},
            }
        )
    with pytest.raises(ValueError, match="http"):
        PrometheusOptions.model_validate({"url": "127.0.0.1:9090"})


def test_parse_result_shapes() -> None:
    """Scalars read as one unlabelled value, matrices and strings as problems, NaN as no data."""
    assert parse_result([NOW, "2.5"], NOW)[0][0].value == 2.5
    assert "not a number: 'hello'" in parse_result([NOW, "hello"], NOW)[1]
    assert "matrix" in parse_result([{"metric": {}, "values": [[NOW, "1"]]}], NOW)[1]
    nan = parse_result([{"metric": {}, "value": [NOW, "NaN"]}], NOW)[0][0]
    assert nan.status is ReadingStatus.NO_DATA
    assert "unexpected" in parse_result({"oops": 1}, NOW)[1]


def test_prometheus_special_values_keep_their_meaning() -> None:
    """+Inf and -Inf are values (beyond any threshold), NaN is no data, as Prometheus means them."""
    up = parse_result([{"metric": {}, "value": [NOW, "+Inf"]}], NOW)[0][0]
    assert (up.status, up.value) == (ReadingStatus.OK, math.inf)
    down = parse_result([{"metric": {}, "value": [NOW, "-Inf"]}], NOW)[0][0]
    assert (down.status, down.value) == (ReadingStatus.OK, -math.inf)
    assert parse_result([NOW, "+Inf"], NOW)[0][0].value == math.inf
    assert parse_result([NOW, "NaN"], NOW)[0][0].status is ReadingStatus.NO_DATA
    assert parse_result([NOW, "1e+06"], NOW)[0][0].value == 1e6


@pytest.mark.parametrize(
    "result",
    [
        [{"metric": "not an object", "value": [NOW, "1"]}],
        [{"metric": 5, "value": [NOW, "1"]}],
        [{"metric": ["x"], "value": [NOW, "1"]}],
        [{"metric": {}, "value": [NOW, 10**400]}],
        [{"metric": {}, "value": [NOW, "9_8"]}],
        [{"metric": {}, "value": [NOW, "\u0669\u0668"]}],
        [{"metric": {}, "value": "x"}],
        [NOW, 10**400],
        [NOW, True],
        [{"metric": {}, "value": [NOW, "1"]}, "junk"],
    ],
)
def test_malformed_results_are_problems_not_raises(result: object) -> None:
    """An odd series (metric not an object, a huge or odd number) is a problem, never a raise."""
    readings, problem = parse_result(result, NOW)
    assert (readings, bool(problem)) == ([], True)
    assert len(problem) < 400


class FakeClient:
    """Stands in for the HTTP client: answers ``answer`` as a result, or raises it."""

    def __init__(self, answer: object = ()) -> None:
        self.answer = answer
        self.closed = False

    async def query(self, query: str) -> Answer:
        """Answer ``answer`` as ``data.result`` (raise it if it is an exception)."""
        if isinstance(self.answer, BaseException):
            raise self.answer
        return self.answer, ""

    async def aclose(self) -> None:
        """Note the close."""
        self.closed = True


def fake_source(client: InstantQueries, timeout: str = "2s", **extra: object) -> PrometheusSource:
    """A source answering from ``client``."""
    options = PrometheusOptions.model_validate(
        {"url": "http://127.0.0.1:1", "timeout": timeout, **extra}
    )
    return PrometheusSource("prom", options, client=client)


@pytest.mark.parametrize(
    "answer",
    [
        [{"metric": "not an object", "value": [NOW, "1"]}],
        [{"metric": {}, "value": [NOW, 10**400]}],
        ValueError("Exceeds the limit (4300 digits) for integer string conversion"),
        RecursionError("maximum recursion depth exceeded"),
        UnicodeEncodeError("latin-1", "x", 0, 1, "ordinal not in range(256)"),
        RuntimeError("a bug in the client"),
    ],
)
async def test_read_turns_any_failure_into_an_error_reading(answer: object) -> None:
    """Whatever the client answers or raises, read returns the rule's error reading, with why."""
    client = FakeClient(answer)
    source = fake_source(client)
    await source.start()
    try:
        [reading] = await source.read(rule("up"), NOW)
    finally:
        await source.aclose()
    assert reading.status is ReadingStatus.ERROR
    assert reading.reason.endswith("(query: up)")
    assert client.closed


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def scalar(value: str) -> dict[str, object]:
    """Prometheus's answer to a scalar query."""
    return {"status": "success", "data": {"resultType": "scalar", "result": [NOW, value]}}


@dataclass
class QueryServer:
    """A stand-in Prometheus on 127.0.0.1: answers ``/api/v1/query`` with ``handler``.

    It counts the requests in flight; while ``hold`` is clear, every request waits for it.
    """

    handler: Handler | None = None
    tls: ssl.SSLContext | None = None
    received: list[web.Request] = field(default_factory=list)
    in_flight: int = 0
    most_in_flight: int = 0
    hold: asyncio.Event = field(default_factory=asyncio.Event)
    port: int = 0
    _runner: web.AppRunner | None = None

    @property
    def url(self) -> str:
        """The base URL a source is configured with."""
        return f"{'https' if self.tls else 'http'}://127.0.0.1:{self.port}"

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        self.received.append(request)
        self.in_flight += 1
        self.most_in_flight = max(self.most_in_flight, self.in_flight)
        try:
            await self.hold.wait()
            if self.handler is not None:
                return await self.handler(request)
            return web.json_response(scalar("1"))
        finally:
            self.in_flight -= 1

    async def start(self) -> QueryServer:
        """Listen on a free loopback port; requests are answered at once."""
        self.hold.set()
        app = web.Application()
        app.router.add_get("/api/v1/query", self._handle)
        self._runner = web.AppRunner(app, shutdown_timeout=1.0)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", 0, ssl_context=self.tls).start()
        self.port = self._runner.addresses[0][1]
        return self

    async def stop(self) -> None:
        """Release held requests and stop."""
        self.hold.set()
        if self._runner is not None:
            await self._runner.cleanup()


@pytest.fixture
async def server() -> AsyncIterator[QueryServer]:
    """Run a stand-in Prometheus on loopback for one test."""
    running = await QueryServer().start()
    yield running
    await running.stop()


async def test_reads_in_flight_never_exceed_max_concurrency(server: QueryServer) -> None:
    """Twenty reads at once reach the server at most max_concurrency at a time, then all read ok."""
    server.hold.clear()
    source = make_source(server.url, timeout=5.0, max_concurrency=3)
    await source.start()
    try:
        reads = [asyncio.create_task(source.read(rule(f"q{i}"), NOW)) for i in range(20)]
        await wait_until(lambda: server.in_flight == 3, what="3 queries at the server")
        await asyncio.sleep(0.2)  # room for a 4th query to arrive if the bound leaked
        assert server.in_flight == 3
        server.hold.set()
        for [reading] in await asyncio.gather(*reads):
            assert (reading.status, reading.value) == (ReadingStatus.OK, 1.0)
    finally:
        await source.aclose()
    assert server.most_in_flight == 3
    assert sorted(r.query["query"] for r in server.received) == sorted(f"q{i}" for i in range(20))


async def test_aclose_closes_the_session_and_later_reads_open_none(server: QueryServer) -> None:
    """Closing the source closes its aiohttp session; a later read is an error, sending nothing."""
    options = PrometheusOptions.model_validate({"url": server.url})
    client = open_client(options)
    source = PrometheusSource("prom", options, client=client)
    await source.start()
    [before] = await source.read(rule("up"), NOW)
    assert before.status is ReadingStatus.OK
    assert not client.closed
    await source.aclose()
    assert client.closed
    [after] = await source.read(rule("up"), NOW)
    assert after.status is ReadingStatus.ERROR
    assert after.reason == "the source is closed (query: up)"
    assert len(server.received) == 1


async def test_a_query_in_flight_at_aclose_reads_error_at_once(server: QueryServer) -> None:
    """Closing the source ends a query the server holds: it reads error well before its timeout."""
    server.hold.clear()
    source = make_source(server.url, timeout=10.0)
    await source.start()
    read = asyncio.create_task(source.read(rule("up"), NOW))
    await wait_until(lambda: server.in_flight == 1, what="the query at the server")
    started = time.monotonic()
    await source.aclose()
    [reading] = await asyncio.wait_for(read, 2.0)
    assert time.monotonic() - started < 2.0
    assert reading.status is ReadingStatus.ERROR


async def test_an_exhausted_default_executor_does_not_stall_queries(server: QueryServer) -> None:
    """Blocking work filling the loop's default pool (a stuck file action) leaves queries alone."""
    loop = asyncio.get_running_loop()
    stuck = threading.Event()
    default = ThreadPoolExecutor(max_workers=1)
    loop.set_default_executor(default)
    blocker = loop.run_in_executor(None, stuck.wait, 10)
    source = make_source(server.url, timeout=1.0)
    await source.start()
    try:
        [reading] = await source.read(rule("up"), NOW)
    finally:
        stuck.set()
        await blocker
        await source.aclose()
    assert (reading.status, reading.value) == (ReadingStatus.OK, 1.0)


async def test_the_query_and_the_credentials_are_sent_as_requests_sent_them(
    server: QueryServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """GET /api/v1/query?query=..., the bearer token or basic auth revealed from its reference."""
    monkeypatch.setenv("ROLLBACKD_TEST_TOKEN", "tok-1")
    monkeypatch.setenv("ROLLBACKD_TEST_PASSWORD", "pa:ss é")
    for auth in (
        {"bearer_token": {"env": "ROLLBACKD_TEST_TOKEN"}},
        {"basic_auth": {"username": "ops", "password": {"env": "ROLLBACKD_TEST_PASSWORD"}}},
    ):
        options = PrometheusOptions.model_validate({"url": server.url, **auth})
        reading = await read_once(options, 'sum(rate(x{a="b c"}[1m]))')
        assert reading.status is ReadingStatus.OK
    bearer, basic = server.received
    assert bearer.method == "GET"
    assert bearer.query["query"] == 'sum(rate(x{a="b c"}[1m]))'
    assert bearer.headers["Authorization"] == "Bearer tok-1"
    assert basic.headers["Authorization"] == "Basic b3BzOnBhOnNzIOk="  # requests' Latin-1 form


async def _chunked(request: web.Request, size: int) -> web.StreamResponse:
    response = web.StreamResponse()
    await response.prepare(request)
    for _ in range(size // 2**20 + 1):
        await response.write(b" " * 2**20)
    await response.write_eof()
    return response


def _answer(status: int, body: str) -> Handler:
    async def handler(request: web.Request) -> web.StreamResponse:
        return web.Response(status=status, text=body)

    return handler


@pytest.mark.parametrize(
    ("handler", "says"),
    [
        (
            _answer(503, '{"status":"error","errorType":"timeout","error":"query timed out"}'),
            "HTTP 503: timeout: query timed out (query: up)",
        ),
        (_answer(502, "<html>\n  Bad   gateway\n</html>"), "HTTP 502: <html> Bad gateway </html>"),
        (_answer(500, ""), "HTTP 500: (empty body)"),
        (_answer(200, "<html>login</html>"), "malformed JSON in response: Expecting value"),
        (_answer(200, '{"status":"success"}'), "malformed response: KeyError 'data'"),
        (_answer(200, "[1]"), "malformed response: TypeError"),
        (_answer(200, '{"data":{"result":"x"}}'), "unexpected result: str"),
        (_answer(200, "[" * 100_000), "JSON nested too deep"),
        (_answer(200, " " * (MAX_RESPONSE_BYTES + 1)), "response larger than 16 MiB"),
        (partial(_chunked, size=MAX_RESPONSE_BYTES), "response larger than 16 MiB"),
        (_answer(404, "x" * (ERROR_BODY_BYTES + 1)), "HTTP 404: (a body of more than 64 KiB)"),
    ],
)
async def test_http_failures_read_as_errors_with_the_reason(
    server: QueryServer, handler: Handler, says: str
) -> None:
    """Error statuses (with Prometheus's error JSON or not), odd and oversized bodies are errors."""
    server.handler = handler
    source = make_source(server.url)
    await source.start()
    try:
        [reading] = await source.read(rule("up"), NOW)
    finally:
        await source.aclose()
    assert reading.status is ReadingStatus.ERROR
    assert says in reading.reason
    assert reading.reason.endswith("(query: up)")
    assert len(reading.reason) < 500


@pytest.mark.parametrize(
    ("extra", "says"),
    [
        ({}, "certificate verification failed: self-signed certificate"),
        ({"tls_verify": False}, ""),
        ({"ca_file": "CA"}, ""),
        ({"ca_file": "CA", "tls_verify": False}, ""),
    ],
)
async def test_https_is_verified_with_ca_file_or_not_at_all(
    certificate: Certificate, extra: dict[str, object], says: str
) -> None:
    """The system CAs refuse a self-signed server; ca_file naming it, or tls_verify false, read."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(certificate.cert, certificate.key)
    server = await QueryServer(tls=context).start()
    if extra.get("ca_file"):
        extra = {**extra, "ca_file": str(certificate.cert)}
    options = PrometheusOptions.model_validate({"url": server.url, **extra})
    try:
        reading = await read_once(options)
    finally:
        await server.stop()
    if says:
        assert reading.status is ReadingStatus.ERROR
        assert f"cannot connect to {server.url}: {says}" in reading.reason
        assert server.received == []
    else:
        assert (reading.status, reading.value) == (ReadingStatus.OK, 1.0)


async def test_a_long_query_is_echoed_truncated() -> None:
    """A 1 MB query is named in the reason and the log by its first 200 characters only."""
    query = "sum(" + "x" * 1_000_000 + ")"
    source = make_source(f"http://127.0.0.1:{free_port()}", timeout=1.0)
    try:
        with capture_logs() as logs:
            [reading] = await source.read(rule(query), NOW)
    finally:
        await source.aclose()
    assert reading.status is ReadingStatus.ERROR
    assert len(reading.reason) < 500
    assert "sum(" + "x" * 196 + "…" in reading.reason
    assert all(len(str(event)) < 1000 for event in logs)


async def test_missing_secret_reads_error_without_leaking() -> None:
    """A bearer token that cannot be read makes every read an error naming the variable."""
    options = PrometheusOptions.model_validate(
        {"url": "http://127.0.0.1:1", "bearer_token": {"env": "ROLLBACKD_TEST_UNSET_TOKEN"}}
    )
    reading = await read_once(options)
    assert reading.status is ReadingStatus.ERROR
    assert "ROLLBACKD_TEST_UNSET_TOKEN" in reading.reason


async def test_an_unreadable_ca_file_reads_error_until_it_is_back(
    certificate: Certificate, tmp_path: Path
) -> None:
    """A ca_file gone after the config loaded makes reads errors naming it; back, reads heal."""
    ca_file = tmp_path / "ca.pem"
    shutil.copy(certificate.cert, ca_file)
    port = free_port()
    options = PrometheusOptions.model_validate(
        {"url": f"https://127.0.0.1:{port}", "ca_file": str(ca_file)}
    )
    ca_file.unlink()
    source = PrometheusSource("prom", options)
    await source.start()
    try:
        [gone] = await source.read(rule("up"), NOW)
        shutil.copy(certificate.cert, ca_file)
        [back] = await source.read(rule("up"), NOW)
    finally:
        await source.aclose()
    assert gone.status is ReadingStatus.ERROR
    assert gone.reason.startswith(f"cannot read ca_file {ca_file}: ")
    assert back.reason.startswith(f"cannot connect to https://127.0.0.1:{port}: connection refused")


@pytest.mark.slow
async def test_vector_series_are_read_with_their_labels(
    exporter: Exporter, prom_source: PrometheusSource
) -> None:
    """Each series of a vector becomes one ok reading carrying its labels."""
    gauge = exporter.gauge("boop_test_error_rate", ["region"])
    for region, value in (("eu", 0.5), ("us", 1.5), ("ap", 2.5)):
        gauge.labels(region).set(value)
    readings = await read_until(prom_source, "boop_test_error_rate", lambda r: len(r) == 3)
    by_region = {dict(r.labels)["region"]: r for r in readings}
    assert {k: r.value for k, r in by_region.items()} == {"eu": 0.5, "us": 1.5, "ap": 2.5}
    assert all(r.status is ReadingStatus.OK and r.at == NOW for r in readings)
    assert dict(by_region["eu"].labels)["job"] == "test"


@pytest.mark.slow
async def test_value_change_is_seen(exporter: Exporter, prom_source: PrometheusSource) -> None:
    """After the exporter's value changes, a later read returns the new value."""
    gauge = exporter.gauge("boop_test_changing")
    gauge.set(1.0)
    await read_until(prom_source, "boop_test_changing", lambda r: r[0].value == 1.0)
    gauge.set(42.0)
    [reading] = await read_until(prom_source, "boop_test_changing", lambda r: r[0].value == 42.0)
    assert reading.value == 42.0


@pytest.mark.slow
async def test_scalar_query_reads_one_unlabelled_value(prom_source: PrometheusSource) -> None:
    """A scalar expression reads as one ok reading without labels."""
    [reading] = await prom_source.read(rule("scalar(vector(3))"), NOW)
    assert (reading.status, reading.value, reading.labels) == (ReadingStatus.OK, 3.0, ())


@pytest.mark.slow
async def test_empty_vector_is_no_data(prom_source: PrometheusSource) -> None:
    """A query matching no series reads no_data("empty result"), not ok and not error."""
    [reading] = await prom_source.read(rule("boop_metric_that_does_not_exist"), NOW)
    assert reading.status is ReadingStatus.NO_DATA
    assert reading.reason == "empty result"


@pytest.mark.slow
async def test_nan_is_no_data(exporter: Exporter, prom_source: PrometheusSource) -> None:
    """A NaN sample reads as no data, so it can neither pass nor breach a threshold."""
    exporter.gauge("boop_test_nan").set(math.nan)
    [reading] = await read_until(
        prom_source, "boop_test_nan", lambda r: r[0].reason != "empty result"
    )
    assert reading.status is ReadingStatus.NO_DATA
    assert "NaN" in reading.reason


@pytest.mark.slow
async def test_bad_query_is_an_error_with_the_reason(prom_source: PrometheusSource) -> None:
    """An invalid PromQL query reads error with Prometheus's reason and the query, and logs it."""
    with capture_logs() as logs:
        [reading] = await prom_source.read(rule("sum(boop"), NOW)
    assert reading.status is ReadingStatus.ERROR
    assert "HTTP 400" in reading.reason
    assert "parse error" in reading.reason
    assert "sum(boop" in reading.reason
    [event] = [e for e in logs if e["event"] == "source_error"]
    assert event["source"] == "prom"
    assert event["query"] == "sum(boop"
    assert event["log_level"] == "warning"


@pytest.mark.slow
async def test_range_vector_is_an_error(prom_source: PrometheusSource) -> None:
    """A range-vector (matrix) result is an error: rules need one value per series."""
    [reading] = await prom_source.read(rule("up[1m]"), NOW)
    assert reading.status is ReadingStatus.ERROR
    assert "matrix" in reading.reason


async def test_dead_prometheus_reads_error_within_timeout() -> None:
    """A rule pointed at a port nobody listens on reads error quickly, naming the refusal."""
    source = make_source(f"http://127.0.0.1:{free_port()}", timeout=1.0)
    started = time.monotonic()
    [reading] = await source.read(rule("up"), NOW)
    assert time.monotonic() - started < 1.5
    assert reading.status is ReadingStatus.ERROR
    assert "connection refused" in reading.reason
    await source.aclose()


async def test_hung_server_reads_error_within_timeout(silent_port: int) -> None:
    """A server that accepts but never answers reads error("timed out ...") within the timeout."""
    source = make_source(f"http://127.0.0.1:{silent_port}", timeout=0.5)
    started = time.monotonic()
    readings = await asyncio.gather(*(source.read(rule(f"q{i}"), NOW) for i in range(6)))
    assert time.monotonic() - started < 1.5
    for [reading] in readings:
        assert reading.status is ReadingStatus.ERROR
        assert "timed out after 0.5s" in reading.reason
    await source.aclose()


@pytest.mark.slow
async def test_outage_then_recovery_with_the_same_source(
    start_prometheus: Callable[..., Prometheus],
) -> None:
    """Stopping Prometheus turns reads into errors within the timeout; restarting heals them."""
    server = start_prometheus()
    source = make_source(server.url, timeout=1.0)
    await source.start()
    [before] = await source.read(rule("vector(7)"), NOW)
    assert (before.status, before.value) == (ReadingStatus.OK, 7.0)

    await asyncio.to_thread(server.stop)
    started = time.monotonic()
    [during] = await source.read(rule("vector(7)"), NOW)
    assert time.monotonic() - started < 1.5
    assert during.status is ReadingStatus.ERROR

    await asyncio.to_thread(server.start)
    [after] = await source.read(rule("vector(7)"), NOW)
    assert (after.status, after.value) == (ReadingStatus.OK, 7.0)
    await source.aclose()
