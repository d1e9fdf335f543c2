"""The prometheus source against a real Prometheus: series with labels, no data, errors, outages."""

from __future__ import annotations

import asyncio
import math
import socket
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor

import pytest
from structlog.testing import capture_logs

from rollbackd.config import RuleConfig
from rollbackd.readings import Reading, ReadingStatus
from rollbackd.sources import source_types
from rollbackd.sources.prometheus import (
    PROMETHEUS,
    PrometheusOptions,
    PrometheusSource,
    parse_result,
)
from tests.servers import Exporter, Prometheus, free_port

NOW = 1_700_000_000.0


def rule(query: str) -> RuleConfig:
    """Build a rule reading ``query`` from the source under test."""
    return RuleConfig(name="r", source="prom", query=query, above=1.0)


def make_source(url: str, timeout: float = 2.0) -> PrometheusSource:
    """Build a source for ``url`` through the registry, as the daemon does."""
    kind = source_types().get("prometheus")
    options = kind.options.model_validate({"url": url, "timeout": f"{timeout}s"})
    source = kind.build("prom", options)
    assert isinstance(source, PrometheusSource)
    return source


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
    """Stands in for PrometheusConnect: answers, raises or blocks, and notes its threads."""

    def __init__(self, answer: object = (), block: threading.Event | None = None) -> None:
        self.answer = answer
        self.block = block
        self.threads: set[str] = set()
        self.active = 0
        self.most_active = 0
        self._lock = threading.Lock()

    def custom_query(self, query: str, timeout: float | None = None) -> object:
        """Answer ``answer`` (raise it if it is an exception), after ``block`` is set."""
        with self._lock:
            self.threads.add(threading.current_thread().name)
            self.active += 1
            self.most_active = max(self.most_active, self.active)
        try:
            if self.block is not None:
                self.block.wait(10)
            if isinstance(self.answer, BaseException):
                raise self.answer
            return self.answer
        finally:
            with self._lock:
                self.active -= 1

    def close(self) -> None:
        """Nothing to close."""


def fake_source(client: FakeClient, timeout: str = "2s", **extra: object) -> PrometheusSource:
    """A source answering from ``client``."""
    options = PrometheusOptions.model_validate(
        {"url": "http://127.0.0.1:1", "timeout": timeout, **extra}
    )
    return PrometheusSource("prom", options, client=client)  # type: ignore[arg-type]


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
    source = fake_source(FakeClient(answer))
    await source.start()
    try:
        [reading] = await source.read(rule("up"), NOW)
    finally:
        await source.aclose()
    assert reading.status is ReadingStatus.ERROR
    assert reading.reason.endswith("(query: up)")


async def test_queries_run_on_the_sources_own_bounded_threads() -> None:
    """Queries run on threads named after the source, at most max_concurrency of them at once."""
    release = threading.Event()
    client = FakeClient([NOW, "1"], block=release)
    source = fake_source(client, max_concurrency=2)
    await source.start()
    try:
        reads = [asyncio.create_task(source.read(rule(f"q{i}"), NOW)) for i in range(6)]
        await asyncio.sleep(0.2)
        release.set()
        for [reading] in await asyncio.gather(*reads):
            assert reading.value == 1.0
    finally:
        await source.aclose()
    assert client.most_active == 2
    assert client.threads
    assert all(name.startswith("rollbackd-prometheus-prom") for name in client.threads)


async def test_an_exhausted_default_executor_does_not_stall_queries() -> None:
    """Blocking work filling the loop's default pool (a stuck file action) leaves queries alone."""
    loop = asyncio.get_running_loop()
    stuck = threading.Event()
    default = ThreadPoolExecutor(max_workers=1)
    loop.set_default_executor(default)
    blocker = loop.run_in_executor(None, stuck.wait, 10)
    source = fake_source(FakeClient([NOW, "4"]), timeout="1s")
    await source.start()
    try:
        [reading] = await source.read(rule("up"), NOW)
    finally:
        stuck.set()
        await blocker
        await source.aclose()
    assert (reading.status, reading.value) == (ReadingStatus.OK, 4.0)


async def test_no_query_thread_outlives_aclose() -> None:
    """Closing waits for queries still running in threads; afterwards none of its threads lives."""
    release = threading.Event()
    source = fake_source(FakeClient([NOW, "1"], block=release), timeout="300ms")
    await source.start()
    [reading] = await source.read(rule("up"), NOW)
    assert "timed out" in reading.reason
    assert any(t.name.startswith("rollbackd-prometheus-prom") for t in threading.enumerate())
    loop = asyncio.get_running_loop()
    loop.call_later(0.2, release.set)
    await source.aclose()
    assert not [t for t in threading.enumerate() if t.name.startswith("rollbackd-prometheus-")]


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
    source = PrometheusSource("prom", options)
    await source.start()
    [reading] = await source.read(rule("up"), NOW)
    assert reading.status is ReadingStatus.ERROR
    assert "ROLLBACKD_TEST_UNSET_TOKEN" in reading.reason
    await source.aclose()


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
