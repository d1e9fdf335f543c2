"""The ``mqtt`` source: the latest value per topic from a broker (aiomqtt), pushed to monitors.

A task owned by the source keeps one connection, subscribes to every watched topic filter,
reconnects with capped exponential backoff, and tells listeners which monitors got a new value.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

import aiomqtt
import structlog
from pydantic import Field, model_validator

from rollbackd import broker
from rollbackd.broker import BrokerOptions
from rollbackd.config import RuleConfig
from rollbackd.errors import SecretError
from rollbackd.options import Duration
from rollbackd.readings import Reading, error, labels_of, no_data, ok, parse_number
from rollbackd.sources import ArrivalListener, SourceType

log = structlog.get_logger(__name__)

ClientFactory = Callable[[], aiomqtt.Client]
"""Makes a fresh, not yet connected client; one per connection attempt."""


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
    """The latest payload of one concrete topic and when it arrived (unix seconds)."""

    payload: bytes
    arrived: float


class MqttSource:
    """Subscribes to the watched topic filters and keeps the latest payload per topic."""

    push = True

    def __init__(
        self,
        name: str,
        options: MqttOptions,
        make_client: ClientFactory | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.name = name
        self.options = options
        self._make_client = make_client or client_factory(options)
        self._clock = clock
        self._watched: dict[str, set[str]] = {}  # topic filter -> monitors
        self._invalid: dict[str, str] = {}  # topic filter -> why it cannot be subscribed
        self._listeners: list[ArrivalListener] = []
        self._latest: dict[str, Sample] = {}
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
        self._watched.setdefault(topic, set()).add(monitor)

    def add_listener(self, listener: ArrivalListener) -> None:
        """Call ``listener(monitor)`` whenever a watched topic of ``monitor`` gets a value."""
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
                self._arrived(message)

    def _down(self, reason: str) -> None:
        self._connected, self._down_reason = False, reason
        self.subscribed.clear()

    def _arrived(self, message: aiomqtt.Message) -> None:
        payload = message.payload
        if isinstance(payload, str):
            payload = payload.encode()
        elif not isinstance(payload, bytes | bytearray):
            payload = str(payload).encode()  # int/float/None as paho may hand them over
        self._latest[message.topic.value] = Sample(bytes(payload), self._clock())
        monitors = {
            monitor
            for topic, names in self._watched.items()
            if message.topic.matches(topic)
            for monitor in names
        }
        for monitor in sorted(monitors):
            for listener in self._listeners:
                try:
                    listener(monitor)
                except Exception:  # a listener's bug must not stop the subscription
                    log.exception("listener_failed", source=self.name, monitor=monitor)

    async def read(self, rule: RuleConfig, now: float) -> Sequence[Reading]:
        """Latest value(s) of ``rule.topic``: one per concrete topic for a wildcard filter."""
        topic = rule.topic or ""
        if topic in self._invalid:
            return [error(f"invalid topic filter {topic!r}: {self._invalid[topic]}", now)]
        if not self._connected:
            if self._down_reason:
                return [error(f"broker unreachable: {self._down_reason}", now)]
            return [no_data("not connected to the broker yet", now)]
        if "+" not in topic and "#" not in topic:
            sample = self._latest.get(topic)
            if sample is None:
                return [no_data(f"nothing received on {topic} yet", now)]
            return [self._reading(sample, rule, now, ())]
        readings = [
            self._reading(sample, rule, now, labels_of({"topic": concrete}))
            for concrete, sample in sorted(self._latest.items())
            if aiomqtt.Topic(concrete).matches(topic)
        ]
        return readings or [no_data(f"nothing received on {topic} yet", now)]

    def _reading(
        self, sample: Sample, rule: RuleConfig, now: float, labels: tuple[tuple[str, str], ...]
    ) -> Reading:
        age = now - sample.arrived
        if age > self.options.stale_after:
            return no_data(f"stale: last value {age:.0f}s ago", now, labels)
        value, problem = parse_payload(sample.payload, rule.json_field)
        if value is None:
            return error(problem, now, labels)
        return ok(value, now, labels)


def parse_payload(payload: bytes, json_field: str | None) -> tuple[float | None, str]:
    """Return ``(number, "")`` from a plain-number or JSON payload, or ``(None, reason)``."""
    preview = payload[:60].decode("utf-8", "replace")
    try:
        text = payload.decode("utf-8").strip()
    except UnicodeDecodeError:
        return None, f"payload is not UTF-8 text: {preview!r}"
    if json_field is None:
        value = parse_number(text)
        return value, "" if value is not None else f"payload is not a number: {preview!r}"
    try:
        document: object = json.loads(text)
    except json.JSONDecodeError:
        return None, f"payload is not JSON: {preview!r}"
    found, document = _field(document, json_field)
    if not found:
        return None, f"payload has no field {json_field!r}: {preview!r}"
    value = parse_number(document)
    if value is None:
        return None, f"field {json_field!r} is not a number: {str(document)[:60]!r}"
    return value, ""


def _field(document: object, dotted: str) -> tuple[bool, object]:
    """Follow ``a.b.0.c`` through objects and arrays."""
    for part in dotted.split("."):
        if isinstance(document, dict) and part in document:
            document = document[part]
        elif isinstance(document, list) and part.isdigit() and int(part) < len(document):
            document = document[int(part)]
        else:
            return False, None
    return True, document


MQTT = SourceType(options=MqttOptions, rule_keys=frozenset({"topic"}), build=MqttSource)
"""Entry point ``mqtt`` of ``rollbackd.sources``."""

__all__ = ["MQTT", "MqttOptions", "MqttSource", "Sample", "client_factory", "parse_payload"]
