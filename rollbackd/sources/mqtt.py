"""The ``mqtt`` source: the latest value per topic from a broker (aiomqtt), pushed to monitors.

A task owned by the source keeps one connection, subscribes to every watched topic filter,
reconnects with capped exponential backoff, and hands listeners each value as it arrives (an
``Arrival`` per monitor, carrying the value). Ages are measured on the monotonic clock.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Literal

import aiomqtt
import structlog
from pydantic import Field, model_validator

from rollbackd import broker
from rollbackd.broker import BrokerOptions
from rollbackd.config import RuleConfig
from rollbackd.errors import SecretError
from rollbackd.options import Duration
from rollbackd.readings import (
    Labels,
    Reading,
    error,
    excerpt,
    labels_of,
    no_data,
    ok,
    parse_number,
)
from rollbackd.sources import Arrival, ArrivalListener, SourceType

log = structlog.get_logger(__name__)

ClientFactory = Callable[[], aiomqtt.Client]
"""Makes a fresh, not yet connected client; one per connection attempt."""

MAX_PAYLOAD = 1 << 20
"""Bytes of a payload worth parsing; a bigger one reads as an error without being parsed."""


class MqttOptions(BrokerOptions):
    """``[sources.NAME]`` keys of ``type = "mqtt"``: the broker's, then how to subscribe."""

    host: str = Field(min_length=1)
    stale_after: Duration = 60.0
    """A value older than this reads as no data (the sender has gone quiet)."""
    keepalive: int = Field(default=30, ge=5, le=65535)
    """Seconds between MQTT pings; a dead broker is noticed within about 1.5 times this."""
    qos: Literal[0, 1, 2] = 0
    connect_timeout: Duration = 10.0
    reconnect_initial: Duration = 0.5
    """First wait before reconnecting; doubles after each failure up to ``reconnect_max``."""
    reconnect_max: Duration = 30.0
    max_topics_per_rule: int = Field(default=1000, ge=1)
    """Concrete topics kept per wildcard topic filter; the first ones to arrive are kept."""

    @model_validator(mode="after")
    def _backoff(self) -> MqttOptions:
        if self.reconnect_initial > self.reconnect_max:
            raise ValueError("reconnect_initial must not be greater than reconnect_max")
        return self


def client_factory(options: MqttOptions) -> ClientFactory:
    """Return a factory of aiomqtt clients for ``options`` (secrets revealed per connection)."""

    def make() -> aiomqtt.Client:
        return broker.client(
            options,
            tls=broker.tls_context(options),
            keepalive=options.keepalive,
            timeout=options.connect_timeout,
        )

    return make


@dataclass(frozen=True, slots=True)
class Sample:
    """The latest payload of one concrete topic and when it arrived (monotonic seconds)."""

    payload: bytes
    arrived: float
    parsed: dict[str | None, tuple[float | None, str]] = field(default_factory=dict, compare=False)
    """``parse_payload`` of this payload per json_field, filled on first use (parsed once)."""

    def value(self, json_field: str | None) -> tuple[float | None, str]:
        """``parse_payload(self.payload, json_field)``, computed once per field."""
        found = self.parsed.get(json_field)
        if found is None:
            found = self.parsed[json_field] = parse_payload(self.payload, json_field)
        return found


class MqttSource:
    """Subscribes to the watched topic filters and keeps the latest payload per topic.

    Each filter keeps its own topics (at most ``max_topics_per_rule``, first come first kept),
    so a message costs one match per filter and a read costs only its own filter's topics.
    ``clock`` is monotonic: it times the age of values, never the wall clock.
    """

    push = True
    local = True
    """``read`` answers from the latest values held: no I/O, no task per rule."""

    def __init__(
        self,
        name: str,
        options: MqttOptions,
        make_client: ClientFactory | None = None,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self.name = name
        self.options = options
        self._make_client = make_client or client_factory(options)
        self._clock = clock
        self._wall_clock = wall_clock  # stamps an arrival's readings (unix seconds)
        self._watched: dict[str, set[tuple[str, RuleConfig]]] = {}  # topic filter -> readers
        self._series: dict[str, dict[str, Sample]] = {}  # topic filter -> topic -> latest
        self._full: set[str] = set()  # filters that reached max_topics_per_rule (warned)
        self._invalid: dict[str, str] = {}  # topic filter -> why it cannot be subscribed
        self._listeners: list[ArrivalListener] = []
        self._task: asyncio.Task[None] | None = None
        self._connected = False
        self._down_reason = ""
        self.subscribed = asyncio.Event()
        """Set while connected with every filter subscribed (tests wait on it)."""

    def watch(self, monitor: str, rule: RuleConfig) -> None:
        """Subscribe to ``rule.topic`` on the next connection; ``monitor`` hears its arrivals."""
        topic = rule.topic or ""
        try:
            aiomqtt.Wildcard(topic)
        except ValueError as exc:
            self._invalid[topic] = str(exc)
            return
        self._watched.setdefault(topic, set()).add((monitor, rule))
        self._series.setdefault(topic, {})

    def add_listener(self, listener: ArrivalListener) -> None:
        """Call ``listener(arrival)`` for each value a watched topic gets, once per monitor."""
        self._listeners.append(listener)

    @property
    def connected(self) -> bool:
        """Whether the broker connection is up."""
        return self._connected

    async def start(self) -> None:
        """Start the connection task; returns at once, even if the broker is down."""
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name=f"mqtt-source-{self.name}")

    async def aclose(self) -> None:
        """Cancel the connection task and wait for it (the disconnect is bounded in time)."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, TimeoutError):
                async with asyncio.timeout(5):
                    await task
        self._down("source closed")

    async def _run(self) -> None:
        delay = self.options.reconnect_initial
        while True:
            try:
                await self._session()
            except aiomqtt.MqttError as exc:
                reason = str(exc) or type(exc).__name__
            except SecretError as exc:
                reason = f"cannot read the password: {exc}"
            except Exception as exc:  # keep the source alive: a dead task would read stale "ok"s
                reason = f"unexpected {type(exc).__name__}: {exc}"
                log.exception("mqtt_failed", source=self.name)
            else:  # the message stream ended without an error
                reason = "connection closed"
            if self._connected:  # an established connection was lost: retry soon
                delay = self.options.reconnect_initial
            self._down(reason)
            log.warning(
                "mqtt_disconnected", source=self.name, reason=self._down_reason, retry_in=delay
            )
            await asyncio.sleep(delay)
            delay = min(delay * 2, self.options.reconnect_max)

    async def _session(self) -> None:
        async with self._make_client() as client:
            for topic in sorted(self._watched):
                await client.subscribe(topic, qos=self.options.qos)
            self._connected, self._down_reason = True, ""
            self.subscribed.set()
            log.info("mqtt_connected", source=self.name, topics=len(self._watched))
            async for message in client.messages:
                self.take(message)

    def _down(self, reason: str) -> None:
        self._connected, self._down_reason = False, reason
        self.subscribed.clear()

    def take(self, message: aiomqtt.Message) -> None:
        """Keep ``message`` as the latest of its topic and hand it to the monitors watching it.

        Each monitor gets one ``Arrival`` carrying this value's reading for each of its rules
        the topic answers, so the value is judged on its own however long it waits.
        """
        payload = message.payload
        if isinstance(payload, str):
            payload = payload.encode()
        elif not isinstance(payload, bytes | bytearray):
            payload = str(payload).encode()  # int/float/None as paho may hand them over
        sample = Sample(bytes(payload), self._clock())
        concrete = message.topic.value
        at = self._wall_clock()
        found: dict[str, dict[str, Reading]] = {}
        for topic_filter, series in self._series.items():
            if not message.topic.matches(topic_filter):
                continue
            if concrete not in series and len(series) >= self.options.max_topics_per_rule:
                self._limit_reached(topic_filter)
                continue
            series[concrete] = sample
            labels = labels_of({"topic": concrete}) if _wildcard(topic_filter) else ()
            for monitor, rule in self._watched[topic_filter]:
                found.setdefault(monitor, {})[rule.name] = _fresh(sample, rule, at, labels)
        for monitor in sorted(found):
            self._tell(Arrival(monitor, self.name, concrete, found[monitor]))

    def _tell(self, arrival: Arrival) -> None:
        for listener in self._listeners:
            try:
                listener(arrival)
            except Exception:  # a listener's bug must not stop the subscription
                log.exception("listener_failed", source=self.name, monitor=arrival.monitor)

    def _limit_reached(self, topic_filter: str) -> None:
        if topic_filter in self._full:
            return
        self._full.add(topic_filter)
        log.warning(
            "mqtt_topic_limit_reached",
            source=self.name,
            filter=excerpt(topic_filter),
            max_topics_per_rule=self.options.max_topics_per_rule,
            action="new topics under this filter are ignored (the first ones are kept); "
            "narrow the filter or raise max_topics_per_rule",
        )

    async def read(self, rule: RuleConfig, now: float) -> Sequence[Reading]:
        """Latest value(s) of ``rule.topic``: one per concrete topic for a wildcard filter.

        Never raises: a failure is the rule's error reading with the reason (and a log line).
        """
        topic = rule.topic or ""
        try:
            return self._read(rule, topic, now)
        except Exception as exc:  # the outermost edge: one odd value must not crash the check
            log.exception("source_read_failed", source=self.name, topic=excerpt(topic))
            return [error(f"reading {excerpt(topic)!r} failed: {type(exc).__name__}", now)]

    def _read(self, rule: RuleConfig, topic: str, now: float) -> Sequence[Reading]:
        if topic in self._invalid:
            reason = excerpt(self._invalid[topic])
            return [error(f"invalid topic filter {excerpt(topic)!r}: {reason}", now)]
        if not self._connected:
            if self._down_reason:
                return [error(f"broker unreachable: {excerpt(self._down_reason)}", now)]
            return [no_data("not connected to the broker yet", now)]
        series = self._series.get(topic, {})
        if not _wildcard(topic):
            sample = series.get(topic)
            if sample is None:
                return [no_data(f"nothing received on {excerpt(topic)} yet", now)]
            return [self._reading(sample, rule, now, ())]
        readings = [
            self._reading(sample, rule, now, labels_of({"topic": concrete}))
            for concrete, sample in sorted(series.items())
        ]
        return readings or [no_data(f"nothing received on {excerpt(topic)} yet", now)]

    def _reading(self, sample: Sample, rule: RuleConfig, now: float, labels: Labels) -> Reading:
        age = self._clock() - sample.arrived
        if age > self.options.stale_after:
            return no_data(f"stale: last value {age:.0f}s ago", now, labels)
        return _fresh(sample, rule, now, labels)


def _fresh(sample: Sample, rule: RuleConfig, at: float, labels: Labels) -> Reading:
    """``sample``'s reading for ``rule`` (its value, or why it has none), age not considered."""
    value, problem = sample.value(rule.json_field)
    if value is None:
        return error(problem, at, labels)
    return ok(value, at, labels)


def _wildcard(topic_filter: str) -> bool:
    return "+" in topic_filter or "#" in topic_filter


def parse_payload(payload: bytes, json_field: str | None) -> tuple[float | None, str]:
    """Return ``(number, "")`` from a plain-number or JSON payload, or ``(None, reason)``.

    A number is finite and written as JSON writes numbers (see ``readings.parse_number``);
    JSON's numbers are kept as their text, so ``1e309`` or a 5000-digit integer is named as
    received. A payload nested too deep or too big is refused, never a crash.
    """
    text, problem = _text(payload)
    if text is None:
        return None, problem
    if json_field is None:
        value = parse_number(text)
        return value, "" if value is not None else f"payload is not a number: {_shown(text)}"
    return _json_field(text, json_field)


def _text(payload: bytes) -> tuple[str | None, str]:
    if len(payload) > MAX_PAYLOAD:
        return None, f"payload is {len(payload)} bytes, more than the {MAX_PAYLOAD} read"
    try:
        return payload.decode("utf-8").strip(), ""
    except UnicodeDecodeError:
        return None, f"payload is not UTF-8 text: {_shown(payload.decode('utf-8', 'replace'))}"


def _json_field(text: str, json_field: str) -> tuple[float | None, str]:
    try:
        document: object = json.loads(text, parse_int=str, parse_float=str, parse_constant=str)
    except RecursionError:
        return None, "payload is JSON nested deeper than the parser goes"
    except ValueError:  # JSONDecodeError
        return None, f"payload is not JSON: {_shown(text)}"
    found, document = _field(document, json_field)
    if not found:
        return None, f"payload has no field {json_field!r}: {_shown(text)}"
    value = parse_number(document)
    if value is None:
        shown = document if isinstance(document, str) else json.dumps(document)
        return None, f"field {json_field!r} is not a number: {_shown(shown)}"
    return value, ""


def _shown(text: str) -> str:
    """How a reason quotes received text: cut to ``readings.EXCERPT_CHARS``."""
    return repr(excerpt(text))


def _field(document: object, dotted: str) -> tuple[bool, object]:
    """Follow ``a.b.0.c`` through objects and arrays."""
    for part in dotted.split("."):
        if isinstance(document, dict) and part in document:
            document = document[part]
        elif isinstance(document, list) and _index(part) < len(document):
            document = document[int(part)]
        else:
            return False, None
    return True, document


def _index(part: str) -> int:
    """``part`` as a list index, or a number past any list when it is not ASCII digits."""
    return int(part) if part.isascii() and part.isdigit() else 1 << 62


MQTT = SourceType(options=MqttOptions, rule_keys=frozenset({"topic"}), build=MqttSource)
"""Entry point ``mqtt`` of ``rollbackd.sources``."""

__all__ = ["MQTT", "MqttOptions", "MqttSource", "Sample", "client_factory", "parse_payload"]
