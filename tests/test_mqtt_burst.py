"""A burst of MQTT samples through a real Mosquitto: every sample is one check, in order.

Also the backlog that holds a push monitor's arrivals: bounded, oldest dropped, one warning.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from structlog.testing import capture_logs

from rollbackd import assemble, readings
from rollbackd.assemble import Registries
from rollbackd.config import RuleConfig
from rollbackd.engine import Check
from rollbackd.readings import Reading
from rollbackd.schedule import Backlog
from rollbackd.sources import Arrival, SourceType
from rollbackd.sources.mqtt import MqttOptions, MqttSource
from tests.helpers import daemon_table, serving, wait_until
from tests.servers import Mosquitto

SAMPLES = 100
ROLLBACK_AFTER = 5
TOPIC = "boop/auth/error_rate"
LATENCY = "boop/auth/latency_ms"
"""The monitor's second rule: read at its latest value by each check of the burst."""
THRESHOLD = 1.0
BREACHING = {10, 11, 12, 20, 21, 22, 23, 40, 41, 42, 43, 44, 45, 46, 70, 71, 72, 73, 74, 75}
"""Streaks of 3 and 4 reset by a healthy sample; 40-44 is the first streak of five."""
TRIGGER = 44
"""The sample whose check is the fifth failing one in a row: the rollback's trigger."""


def value(i: int) -> float:
    """Sample ``i``'s value: unique, so each check tells which sample it judged."""
    return round(5.0 + i / 1000 if i in BREACHING else 0.1 + i / 10_000, 4)


class AwaitingMqttSource(MqttSource):
    """The mqtt source, whose reads await a little, as a networked source's reads do.

    A check then spans several turns of the event loop, so samples arrive while it runs:
    the case where today's arrival path folded a burst into fewer checks.
    """

    async def read(self, rule: RuleConfig, now: float) -> Sequence[Reading]:
        """The mqtt reading, after a 2 ms pause."""
        await asyncio.sleep(0.002)
        return await super().read(rule, now)


REGISTRIES = Registries()
REGISTRIES.sources.register(
    "test.awaiting-mqtt", SourceType(MqttOptions, frozenset({"topic"}), AwaitingMqttSource)
)


def publish_burst(port: int, topic: str, payloads: Sequence[str]) -> None:
    """Publish ``payloads`` back to back with QoS 1 (paho, its own thread); return once acked."""
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2)
    client.max_inflight_messages_set(len(payloads))
    client.connect("127.0.0.1", port)
    client.loop_start()
    try:
        deadline = time.monotonic() + 5
        while not client.is_connected():
            if time.monotonic() > deadline:
                raise TimeoutError("the publisher did not connect")
            time.sleep(0.01)
        sent = [client.publish(topic, payload, qos=1) for payload in payloads]
        for info in sent:
            info.wait_for_publish(5)
    finally:
        client.loop_stop()
        client.disconnect()


def config(tmp_path: Path, port: int, kind: str) -> assemble.Assembly:
    """One push monitor of two rules, rolling back (a log alert) after 5 failing checks."""
    return assemble.from_dict(
        {
            "daemon": {**daemon_table(tmp_path / "state", environment="test"), "history": 500},
            "sources": {
                "bus": {
                    "type": kind,
                    "host": "127.0.0.1",
                    "port": port,
                    "qos": 1,
                    "stale_after": "1h",
                }
            },
            "monitors": {
                "auth": {
                    "interval": "1h",  # ticks only look for staleness: none during the test
                    "rollback_after": ROLLBACK_AFTER,
                    "on_rollback": ["note"],
                    "rules": [
                        {"name": "error-rate", "source": "bus", "topic": TOPIC, "above": THRESHOLD},
                        {"name": "latency", "source": "bus", "topic": LATENCY, "above": 500.0},
                    ],
                }
            },
            "actions": {"note": {"type": "alert.log"}},
        },
        registries=REGISTRIES,
    )


def judged(check: Check | None, rule: str = "error-rate") -> float | None:
    """The value of ``rule`` a check judged."""
    found = [r.value for r in check.results if r.rule == rule] if check is not None else []
    return found[0] if found else None


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["mqtt", "test.awaiting-mqtt"])
async def test_a_burst_of_100_samples_is_100_checks_and_one_rollback_at_the_right_sample(
    tmp_path: Path, mosquitto: Mosquitto, kind: str
) -> None:
    """100 QoS 1 samples back to back: 100 checks on their own values, one rollback at #44.

    The second rule is read at its latest value by each check; with reads that await, the
    samples arrive while checks run.
    """
    async with serving(config(tmp_path, mosquitto.port, kind), registries=REGISTRIES) as daemon:
        source = daemon.sources["bus"]
        assert isinstance(source, MqttSource)
        await asyncio.wait_for(source.subscribed.wait(), 10)
        monitor = daemon.monitors["auth"]
        await asyncio.to_thread(publish_burst, mosquitto.port, LATENCY, ["120"])
        await wait_until(lambda: judged(monitor.last_check, "latency") == 120, what="latency")
        before = monitor.state.checks

        payloads = [str(value(i)) for i in range(SAMPLES)]
        await asyncio.to_thread(publish_burst, mosquitto.port, TOPIC, payloads)
        last = value(SAMPLES - 1)
        await wait_until(lambda: judged(monitor.last_check) == last, what="the last sample judged")

        assert monitor.state.checks - before == SAMPLES, "checks counted vs samples sent"
        checks = daemon.store.recent_checks("auth", SAMPLES)
        assert [judged(c) for c in checks] == [value(i) for i in range(SAMPLES)]
        assert {judged(c, "latency") for c in checks} == {120}
        rollbacks = [i for i in daemon.store.incidents() if i.event == "rollback"]
        assert len(rollbacks) == 1
        trigger = rollbacks[0].details["trigger"]
        assert trigger["results"][0]["value"] == value(TRIGGER)
        behind = [c["results"][0]["value"] for c in rollbacks[0].details["checks"]]
        assert behind[-ROLLBACK_AFTER - 1 :] == [
            value(i) for i in range(TRIGGER - ROLLBACK_AFTER, TRIGGER + 1)
        ]
        assert str(monitor.state.phase) == "rolled_back"


def arrival(n: float) -> Arrival:
    """An arrival carrying the value ``n``."""
    return Arrival("auth", "bus", TOPIC, {"error-rate": readings.ok(n, 0.0)})


async def test_backlog_keeps_order_and_drops_the_oldest_past_its_limit_with_one_warning() -> None:
    """A flood past the limit drops the oldest arrivals, counts them and warns once per episode."""
    backlog = Backlog("auth", limit=3)
    with capture_logs() as logs:
        for n in range(5):
            backlog.put(arrival(n))
        assert backlog.dropped == 2
        taken = [await backlog.get() for _ in range(3)]
        backlog.put(arrival(9))
        backlog.put(arrival(10))
    assert [a.readings["error-rate"].value for a in taken if a is not None] == [2, 3, 4]
    assert [e["event"] for e in logs] == ["arrivals_dropped", "arrival_backlog_cleared"]
    assert logs[1]["dropped"] == 2
    backlog.close()
    assert await backlog.get() == arrival(9)
    assert await backlog.get() == arrival(10)
    assert await backlog.get() is None


async def test_backlog_discard_counts_what_was_left() -> None:
    """What is still queued when the schedule stops is dropped and counted, the end mark not."""
    backlog = Backlog("auth")
    for n in range(4):
        backlog.put(arrival(n))
    backlog.close()
    assert backlog.discard() == 4
    assert (len(backlog), backlog.dropped) == (0, 4)


def config_toml(tmp_path: Path, port: int) -> str:
    """The same monitor as ``config`` (awaiting reads), as the file a reload re-reads."""
    return f"""
[daemon]
mode = "armed"
environment = "test"
state_dir = "{tmp_path / "state"}"
listen = ""
history = 500

[sources.bus]
type = "test.awaiting-mqtt"
host = "127.0.0.1"
port = {port}
qos = 1
stale_after = "1h"

[actions.note]
type = "alert.log"

[monitors.auth]
interval = "1h"
rollback_after = {ROLLBACK_AFTER}
on_rollback = ["note"]
rules = [
    {{ name = "error-rate", source = "bus", topic = "{TOPIC}", above = {THRESHOLD} }},
    {{ name = "latency", source = "bus", topic = "{LATENCY}", above = 500.0 }},
]
"""


@pytest.mark.slow
async def test_samples_arriving_during_reloads_are_each_one_check_in_order(
    tmp_path: Path, mosquitto: Mosquitto
) -> None:
    """Reloads while a burst is being judged: 100 samples are still 100 checks, one rollback.

    The queued and the arriving samples pass to the new config's monitor, in order.
    """
    path = tmp_path / "rollbackd.toml"
    path.write_text(config_toml(tmp_path, mosquitto.port))
    async with serving(assemble.load(path, registries=REGISTRIES), path, REGISTRIES) as daemon:
        source = daemon.sources["bus"]
        assert isinstance(source, MqttSource)
        await asyncio.wait_for(source.subscribed.wait(), 10)
        await asyncio.to_thread(publish_burst, mosquitto.port, LATENCY, ["120"])
        await wait_until(
            lambda: judged(daemon.monitors["auth"].last_check, "latency") == 120, what="latency"
        )
        before = daemon.monitors["auth"].state.checks
        payloads = [str(value(i)) for i in range(SAMPLES)]
        burst = asyncio.create_task(
            asyncio.to_thread(publish_burst, mosquitto.port, TOPIC, payloads)
        )
        reloads = 0
        while not burst.done() or reloads < 3:  # each check awaits 2 ms: the burst queues up
            assert await daemon.reload()
            reloads += 1
            await asyncio.sleep(0.01)
        await burst
        assert daemon.sources["bus"] is source, "the unchanged source was kept"
        last = value(SAMPLES - 1)
        monitor = lambda: daemon.monitors["auth"]  # noqa: E731 - a reload replaces the runner
        await wait_until(lambda: judged(monitor().last_check) == last, what="the last sample")
        assert monitor().state.checks - before == SAMPLES, "checks counted vs samples sent"
        checks = daemon.store.recent_checks("auth", SAMPLES)
        assert [judged(c) for c in checks] == [value(i) for i in range(SAMPLES)]
        rollbacks = [i for i in daemon.store.incidents() if i.event == "rollback"]
        assert len(rollbacks) == 1
        assert rollbacks[0].details["trigger"]["results"][0]["value"] == value(TRIGGER)
