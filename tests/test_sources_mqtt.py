"""The mqtt source against a real Mosquitto: values, JSON fields, wildcards, staleness, outages."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence

import aiomqtt
import pytest
from structlog.testing import capture_logs

from rollbackd.config import RuleConfig
from rollbackd.readings import Reading, ReadingStatus
from rollbackd.sources import Arrival, source_types
from rollbackd.sources.mqtt import MQTT, MqttOptions, MqttSource, parse_payload
from tests.servers import Mosquitto, free_port

WAIT = 5.0
Start = Callable[..., Awaitable[MqttSource]]


def rule(topic: str, json_field: str | None = None, name: str = "r") -> RuleConfig:
    """Build a rule reading ``topic`` (and ``json_field``) from the source under test."""
    return RuleConfig(name=name, source="bus", topic=topic, json_field=json_field, below=99.0)


def make_source(port: int, **extra: object) -> MqttSource:
    """Build a source for a loopback broker through the registry, with fast reconnects."""
    kind = source_types().get("mqtt")
    raw = {
        "host": "127.0.0.1",
        "port": port,
        "stale_after": "60s",
        "reconnect_initial": "100ms",
        "reconnect_max": "500ms",
        **extra,
    }
    source = kind.build("bus", kind.options.model_validate(raw))
    assert isinstance(source, MqttSource)
    return source


async def publish(port: int, topic: str, payload: str | bytes) -> None:
    """Publish one message (QoS 1, so the broker has it when this returns)."""
    async with aiomqtt.Client("127.0.0.1", port) as client:
        await client.publish(topic, payload, qos=1)


async def read_until(
    source: MqttSource, r: RuleConfig, accept: Callable[[Sequence[Reading]], bool]
) -> Sequence[Reading]:
    """Read ``r`` until ``accept`` likes the readings or ``WAIT`` seconds pass."""
    deadline = time.monotonic() + WAIT
    while True:
        readings = await source.read(r, time.time())
        if accept(readings) or time.monotonic() > deadline:
            return readings
        await asyncio.sleep(0.02)


def has_value(readings: Sequence[Reading]) -> bool:
    """Tell whether every reading carries a value (ok or payload error, not waiting)."""
    return all(r.status is not ReadingStatus.NO_DATA for r in readings)


class Arrivals:
    """A listener recording the arrivals it is called with."""

    def __init__(self) -> None:
        self.queue: asyncio.Queue[Arrival] = asyncio.Queue()

    def __call__(self, arrival: Arrival) -> None:
        """Record one arrival."""
        self.queue.put_nowait(arrival)

    async def next(self) -> str:
        """Return the next arrival's monitor name, failing after ``WAIT`` seconds."""
        return (await self.next_arrival()).monitor

    async def next_arrival(self) -> Arrival:
        """Return the next arrival, failing after ``WAIT`` seconds."""
        async with asyncio.timeout(WAIT):
            return await self.queue.get()


@pytest.fixture
async def started(mosquitto: Mosquitto) -> AsyncIterator[Start]:
    """Build, watch and start sources on the test's broker; all are closed afterwards."""
    sources: list[MqttSource] = []

    async def start(*watched: tuple[str, RuleConfig], **extra: object) -> MqttSource:
        source = make_source(mosquitto.port, **extra)
        for monitor, r in watched:
            source.watch(monitor, r)
        sources.append(source)
        await source.start()
        async with asyncio.timeout(WAIT):
            await source.subscribed.wait()
        return source

    yield start
    for source in sources:
        await source.aclose()


def test_entry_point_is_registered() -> None:
    """The ``mqtt`` entry point resolves to this module's SourceType needing ``topic``."""
    assert source_types().get("mqtt") is MQTT
    assert MQTT.rule_keys == {"topic"}


def test_options_reject_inline_password_and_bad_backoff() -> None:
    """The password is a secret reference, and the backoff's start is not above its cap."""
    with pytest.raises(ValueError, match="never written in the config"):
        MqttOptions.model_validate({"host": "h", "username": "u", "password": "hunter2"})
    with pytest.raises(ValueError, match="reconnect_initial"):
        MqttOptions.model_validate({"host": "h", "reconnect_initial": "1m", "reconnect_max": "1s"})


@pytest.mark.parametrize(
    ("payload", "field", "value", "reason"),
    [
        (b"99.5", None, 99.5, ""),
        (b" 42\n", None, 42.0, ""),
        (b"fast", None, None, "payload is not a number: 'fast'"),
        (b"\xff\xfe", None, None, "not UTF-8"),
        (b'{"auth": {"rate": 98.5}}', "auth.rate", 98.5, ""),
        (b'{"regions": [{"rate": "97"}]}', "regions.0.rate", 97.0, ""),
        (b'{"auth": {}}', "auth.rate", None, "payload has no field 'auth.rate'"),
        (b'{"auth": {"rate": true}}', "auth.rate", None, "is not a number"),
        (b"not json", "auth.rate", None, "payload is not JSON"),
        (b"1e309", None, None, "payload is not a number: '1e309'"),
        (b"Infinity", None, None, "payload is not a number: 'Infinity'"),
        (b"-Infinity", None, None, "payload is not a number: '-Infinity'"),
        (b"NaN", None, None, "payload is not a number: 'NaN'"),
        (b"9_8", None, None, "payload is not a number: '9_8'"),
        ("\u0669\u0668".encode(), None, None, "payload is not a number"),
        (b'{"v": 1e309}', "v", None, "field 'v' is not a number: '1e309'"),
        (b'{"v": Infinity}', "v", None, "field 'v' is not a number: 'Infinity'"),
        (b'{"v": -Infinity}', "v", None, "field 'v' is not a number: '-Infinity'"),
        (b'{"v": NaN}', "v", None, "field 'v' is not a number: 'NaN'"),
        (b'{"v": "9_8"}', "v", None, "field 'v' is not a number: '9_8'"),
        (b'{"v": 1' + b"0" * 400 + b"}", "v", None, "field 'v' is not a number: '1000"),
        (b'{"v": 1' + b"0" * 5000 + b"}", "v", None, "field 'v' is not a number: '1000"),
        (b"[" * 200_000 + b"]" * 200_000, "v", None, "nested deeper than"),
    ],
)
def test_parse_payload(payload: bytes, field: str | None, value: float | None, reason: str) -> None:
    """Payloads are plain numbers or JSON with a dotted field; anything else names its problem."""
    got, problem = parse_payload(payload, field)
    assert got == value
    assert reason in problem
    assert bool(problem) == (value is None)
    assert len(problem) < 300


def test_a_huge_payload_is_echoed_truncated() -> None:
    """A 1 MB payload's reason shows its first 200 characters and an ellipsis, not all of it."""
    _, problem = parse_payload(b"x" * 1_000_000, None)
    assert "x" * 200 + "…" in problem
    assert len(problem) < 400
    _, problem = parse_payload(b'{"a": "' + b"x" * 1_000_000 + b'"}', "a")
    assert len(problem) < 400


async def test_invalid_topic_filter_reads_error() -> None:
    """A topic filter MQTT cannot subscribe to reads an error naming it instead of no data."""
    source = make_source(free_port())
    source.watch("auth", rule("boop/#/rate"))
    [reading] = await source.read(rule("boop/#/rate"), time.time())
    assert reading.status is ReadingStatus.ERROR
    assert "invalid topic filter 'boop/#/rate'" in reading.reason


async def test_dead_broker_reads_error_and_start_returns() -> None:
    """With no broker, start() returns at once and reads are errors saying it is unreachable."""
    source = make_source(free_port())
    source.watch("auth", rule("boop/auth/success_rate"))
    async with asyncio.timeout(1):
        await source.start()
    [reading] = await read_until(
        source, rule("boop/auth/success_rate"), lambda r: r[0].status is ReadingStatus.ERROR
    )
    assert reading.status is ReadingStatus.ERROR
    assert reading.reason.startswith("broker unreachable: ")
    await source.aclose()


@pytest.mark.slow
async def test_plain_number_is_read_without_labels(started: Start, mosquitto: Mosquitto) -> None:
    """A number published on a plain topic reads ok with that value and no labels."""
    r = rule("boop/auth/success_rate")
    source = await started(("auth", r))
    [before] = await source.read(r, time.time())
    assert before.status is ReadingStatus.NO_DATA
    await publish(mosquitto.port, "boop/auth/success_rate", "99.7")
    [reading] = await read_until(source, r, has_value)
    assert (reading.status, reading.value, reading.labels) == (ReadingStatus.OK, 99.7, ())


@pytest.mark.slow
async def test_json_field_is_extracted(started: Start, mosquitto: Mosquitto) -> None:
    """With json_field, a JSON payload's dotted field is the value; a missing field is an error."""
    good = rule("boop/stats", json_field="auth.success_rate")
    missing = rule("boop/stats", json_field="payments.success_rate")
    source = await started(("auth", good))
    await publish(mosquitto.port, "boop/stats", '{"auth": {"success_rate": 98.25}}')
    [reading] = await read_until(source, good, has_value)
    assert (reading.status, reading.value) == (ReadingStatus.OK, 98.25)
    [wrong] = await source.read(missing, time.time())
    assert wrong.status is ReadingStatus.ERROR
    assert "no field 'payments.success_rate'" in wrong.reason


@pytest.mark.slow
async def test_wildcard_reads_one_series_per_topic(started: Start, mosquitto: Mosquitto) -> None:
    """A wildcard filter reads one reading per concrete topic, labelled with that topic."""
    r = rule("boop/+/error_rate")
    source = await started(("auth", r))
    await publish(mosquitto.port, "boop/eu/error_rate", "0.5")
    await publish(mosquitto.port, "boop/us/error_rate", "2.5")
    await publish(mosquitto.port, "boop/us/latency", "900")
    readings = await read_until(source, r, lambda rs: len(rs) == 2)
    assert {dict(x.labels)["topic"]: x.value for x in readings} == {
        "boop/eu/error_rate": 0.5,
        "boop/us/error_rate": 2.5,
    }


@pytest.mark.slow
async def test_garbage_payload_is_an_error(started: Start, mosquitto: Mosquitto) -> None:
    """A payload that is not a number reads error with the reason, never ok or no data."""
    r = rule("boop/auth/success_rate")
    source = await started(("auth", r))
    await publish(mosquitto.port, "boop/auth/success_rate", "all good!")
    [reading] = await read_until(source, r, has_value)
    assert reading.status is ReadingStatus.ERROR
    assert "payload is not a number" in reading.reason


@pytest.mark.slow
async def test_a_later_wall_clock_does_not_make_a_value_stale(
    started: Start, mosquitto: Mosquitto
) -> None:
    """Age is not ``now`` minus a wall-clock stamp: a fresh value stays ok whatever ``now`` says."""
    r = rule("boop/auth/success_rate")
    source = await started(("auth", r), stale_after="60s")
    await publish(mosquitto.port, "boop/auth/success_rate", "99.9")
    [fresh] = await read_until(source, r, has_value)
    assert fresh.status is ReadingStatus.OK
    assert (await source.read(r, time.time() + 75))[0].status is ReadingStatus.OK


@pytest.mark.slow
async def test_listener_hears_matching_monitors(started: Start, mosquitto: Mosquitto) -> None:
    """Each arrival calls listeners with every monitor whose filter matches, and no other."""
    arrivals = Arrivals()
    source = make_source(mosquitto.port)
    source.watch("authentication", rule("boop/auth/#"))
    source.watch("regions", rule("boop/+/success_rate", name="r2"))
    source.watch("payments", rule("boop/payments/success_rate"))
    source.add_listener(arrivals)
    await source.start()
    try:
        async with asyncio.timeout(WAIT):
            await source.subscribed.wait()
        await publish(mosquitto.port, "boop/auth/success_rate", "99.1")
        assert {await arrivals.next(), await arrivals.next()} == {"authentication", "regions"}
        await publish(mosquitto.port, "boop/payments/success_rate", "99.9")
        assert {await arrivals.next(), await arrivals.next()} == {"payments", "regions"}
        assert arrivals.queue.empty()
    finally:
        await source.aclose()


@pytest.mark.slow
async def test_failing_listener_does_not_stop_the_subscription(
    started: Start, mosquitto: Mosquitto
) -> None:
    """A listener that raises is logged and the next listener and next value still arrive."""
    arrivals = Arrivals()

    def broken(arrival: Arrival) -> None:
        raise RuntimeError(arrival.monitor)

    r = rule("boop/auth/success_rate")
    source = make_source(mosquitto.port)
    source.watch("auth", r)
    source.add_listener(broken)
    source.add_listener(arrivals)
    await source.start()
    try:
        async with asyncio.timeout(WAIT):
            await source.subscribed.wait()
        for value in ("99.1", "99.2"):
            await publish(mosquitto.port, "boop/auth/success_rate", value)
            assert await arrivals.next() == "auth"
        [reading] = await source.read(r, time.time())
        assert reading.value == 99.2
        assert source.connected
    finally:
        await source.aclose()


@pytest.mark.slow
async def test_outage_then_recovery_resubscribes(started: Start, mosquitto: Mosquitto) -> None:
    """Stopping the broker makes reads errors; after a restart the same source re-subscribes."""
    r = rule("boop/auth/success_rate")
    source = await started(("auth", r))
    await publish(mosquitto.port, "boop/auth/success_rate", "99.5")
    await read_until(source, r, has_value)

    await asyncio.to_thread(mosquitto.stop)
    [down] = await read_until(source, r, lambda rs: rs[0].status is ReadingStatus.ERROR)
    assert down.status is ReadingStatus.ERROR
    assert down.reason.startswith("broker unreachable: ")
    assert not source.subscribed.is_set()

    await asyncio.to_thread(mosquitto.start)
    async with asyncio.timeout(WAIT):
        await source.subscribed.wait()
    await publish(mosquitto.port, "boop/auth/success_rate", "97.0")
    [back] = await read_until(source, r, lambda rs: rs[0].value == 97.0)
    assert (back.status, back.value) == (ReadingStatus.OK, 97.0)


@pytest.mark.slow
async def test_aclose_stops_the_connection(started: Start, mosquitto: Mosquitto) -> None:
    """After aclose() the connection task is gone and reads say the source is closed."""
    r = rule("boop/auth/success_rate")
    source = await started(("auth", r))
    await source.aclose()
    assert not source.connected
    [reading] = await source.read(r, time.time())
    assert reading.status is ReadingStatus.ERROR
    assert reading.reason == "broker unreachable: source closed"


class FakeClock:
    """A monotonic clock the test moves by hand."""

    def __init__(self, start: float = 1000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        """Return the current reading."""
        return self.now


async def start_direct(port: int, *rules: RuleConfig, **options: object) -> MqttSource:
    """Build a source with the given options and ``clock`` (not through the registry), started."""
    clock = options.pop("clock", None)
    raw = {"host": "127.0.0.1", "port": port, "reconnect_initial": "100ms", **options}
    kwargs = {} if clock is None else {"clock": clock}
    source = MqttSource("bus", MqttOptions.model_validate(raw), **kwargs)  # type: ignore[arg-type]
    for r in rules:
        source.watch("auth", r)
    await source.start()
    async with asyncio.timeout(WAIT):
        await source.subscribed.wait()
    return source


def message(topic: str, payload: bytes) -> aiomqtt.Message:
    """Build a message as the connection task hands it over."""
    return aiomqtt.Message(topic, payload, qos=0, retain=False, mid=0, properties=None)


@pytest.mark.slow
async def test_staleness_follows_the_monotonic_clock_not_the_wall_clock(
    mosquitto: Mosquitto,
) -> None:
    """A wall clock stepped back an hour changes nothing: age is measured on the monotonic clock."""
    clock = FakeClock()
    r = rule("boop/auth/success_rate")
    source = await start_direct(mosquitto.port, r, clock=clock, stale_after="60s")
    try:
        await publish(mosquitto.port, "boop/auth/success_rate", "99.9")
        wall = time.time()
        [fresh] = await read_until(source, r, has_value)
        assert fresh.status is ReadingStatus.OK
        clock.now += 30
        [still] = await source.read(r, wall + 3600)  # the wall clock jumped ahead: still fresh
        assert still.status is ReadingStatus.OK
        assert still.at == wall + 3600  # the reading is stamped with the wall clock it was given
        clock.now += 45
        [stale] = await source.read(r, wall - 3600)  # stepped back an hour: stale all the same
        assert stale.status is ReadingStatus.NO_DATA
        assert stale.reason == "stale: last value 75s ago"
    finally:
        await source.aclose()


@pytest.mark.slow
async def test_odd_payloads_read_error_and_never_raise(mosquitto: Mosquitto) -> None:
    """Deep nesting, huge integers and infinities are the rule's error readings, never a raise."""
    plain, field = rule("boop/plain"), rule("boop/json", json_field="v")
    source = await start_direct(mosquitto.port, plain, field)
    try:
        for payload in (b"1e309", b"Infinity", b"NaN", b"9_8", "\u0669\u0668".encode()):
            source.take(message("boop/plain", payload))
            [reading] = await source.read(plain, time.time())
            assert reading.status is ReadingStatus.ERROR, payload
            assert reading.value is None
        for payload in (
            b"[" * 200_000 + b"]" * 200_000,
            b'{"v": ' + b"[" * 200_000 + b"]" * 200_000 + b"}",
            b'{"v": 1' + b"0" * 400 + b"}",
            b'{"v": 1' + b"0" * 5000 + b"}",
            b'{"v": Infinity}',
        ):
            source.take(message("boop/json", payload))
            [reading] = await source.read(field, time.time())
            assert reading.status is ReadingStatus.ERROR, payload[:20]
            assert len(reading.reason) < 400
    finally:
        await source.aclose()


@pytest.mark.slow
async def test_topics_per_wildcard_are_capped_first_come_with_one_warning(
    mosquitto: Mosquitto,
) -> None:
    """20,000 topics under a filter: the first max_topics_per_rule are kept, one warning says so."""
    r = rule("boop/+/rate")
    source = await start_direct(mosquitto.port, r, max_topics_per_rule=1000)
    heard: list[str] = []
    source.add_listener(heard.append)
    try:
        started = time.monotonic()
        with capture_logs() as logs:
            for i in range(20_000):
                source.take(message(f"boop/t{i:05d}/rate", b"1"))
        assert time.monotonic() - started < 5
        assert len(heard) == 1000  # dropped topics are not arrivals
        readings = await source.read(r, time.time())
        assert len(readings) == 1000
        assert {dict(x.labels)["topic"] for x in readings} == {
            f"boop/t{i:05d}/rate" for i in range(1000)
        }
        warnings = [e for e in logs if e["event"] == "mqtt_topic_limit_reached"]
        assert len(warnings) == 1
        assert warnings[0]["max_topics_per_rule"] == 1000
        assert warnings[0]["filter"] == "boop/+/rate"
        source.take(message("boop/t00001/rate", b"2"))  # a kept topic still updates
        readings = await source.read(r, time.time())
        assert {dict(x.labels)["topic"]: x.value for x in readings}["boop/t00001/rate"] == 2.0
    finally:
        await source.aclose()


@pytest.mark.slow
async def test_reading_one_filter_does_not_scan_the_topics_of_another(
    mosquitto: Mosquitto,
) -> None:
    """Reads cost what their own filter holds: 20,000 topics elsewhere do not slow them down."""
    busy, quiet = rule("busy/+/rate"), rule("quiet/+/rate", name="q")
    source = await start_direct(mosquitto.port, busy, quiet, max_topics_per_rule=50_000)
    try:
        for i in range(20_000):
            source.take(message(f"busy/t{i}/rate", b"1"))
        source.take(message("quiet/eu/rate", b"3"))
        started = time.monotonic()
        for _ in range(200):
            [reading] = await source.read(quiet, time.time())
        assert time.monotonic() - started < 0.5
        assert reading.value == 3.0
    finally:
        await source.aclose()


def test_max_topics_per_rule_is_at_least_one() -> None:
    """max_topics_per_rule defaults to 1000 and refuses 0."""
    assert MqttOptions.model_validate({"host": "h"}).max_topics_per_rule == 1000
    with pytest.raises(ValueError, match="max_topics_per_rule"):
        MqttOptions.model_validate({"host": "h", "max_topics_per_rule": 0})


@pytest.mark.slow
async def test_a_long_topic_is_echoed_truncated(mosquitto: Mosquitto) -> None:
    """A reason names a long topic filter by its first 200 characters, not all of it."""
    long = rule("boop/" + "x" * 60_000)
    source = await start_direct(mosquitto.port, long)
    try:
        [reading] = await source.read(long, time.time())
        assert reading.status is ReadingStatus.NO_DATA
        assert len(reading.reason) < 400
        assert "…" in reading.reason
    finally:
        await source.aclose()


@pytest.mark.slow
async def test_each_arrival_carries_its_own_value_not_the_latest(mosquitto: Mosquitto) -> None:
    """Two values taken back to back: each arrival holds its own, while read() says the latest."""
    plain, regions = rule("boop/auth/rate"), rule("boop/+/rate", json_field="v", name="regional")
    source = await start_direct(mosquitto.port, plain, regions)
    arrivals = Arrivals()
    source.add_listener(arrivals)
    try:
        source.take(message("boop/auth/rate", b"1.5"))
        source.take(message("boop/auth/rate", b"2.5"))
        first, second = await arrivals.next_arrival(), await arrivals.next_arrival()
        assert (first.monitor, first.source, first.topic) == ("auth", "bus", "boop/auth/rate")
        assert first.readings["r"].value == 1.5
        assert second.readings["r"].value == 2.5
        assert first.readings["regional"].status is ReadingStatus.ERROR  # no field "v"
        assert dict(first.readings["regional"].labels) == {"topic": "boop/auth/rate"}
        assert first.readings["r"].labels == ()
        [latest] = await source.read(plain, time.time())
        assert latest.value == 2.5
        source.take(message("boop/eu/rate", b'{"v": 7}'))
        regional = await arrivals.next_arrival()
        assert set(regional.readings) == {"regional"}  # the plain rule's topic did not match
        assert regional.readings["regional"].value == 7.0
    finally:
        await source.aclose()
