"""End to end: the daemon as a subprocess against real Prometheus, Mosquitto and Alertmanager."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest

from rollbackd.api import post_rearm, read_control_token
from rollbackd.demo import prepare
from tests.helpers import config_file, daemon_table, payment_error_rate, route_legacy, stop_traffic
from tests.servers import (
    Alertmanager,
    Exporter,
    Mosquitto,
    Prometheus,
    Rollbackd,
    free_port,
    wait_for,
)

pytestmark = pytest.mark.slow

RULE_METRIC = "e2e_payment_error_rate"


@pytest.fixture
def stack(tmp_path: Path) -> Iterator[dict[str, Any]]:
    """Exporter, private Prometheus, Mosquitto and Alertmanager, all on loopback."""
    exporter = Exporter()
    prom = Prometheus(tmp_path / "prometheus", [exporter.target])
    broker = Mosquitto(tmp_path / "mosquitto")
    am = Alertmanager(tmp_path / "alertmanager")
    try:
        broker.start()
        am.start()
        prom.start()
        exporter.gauge(RULE_METRIC).set(0.05)
        publish_retained(broker.port, "boop/auth/success_rate", "99.8")
        prom.wait_targets_up()
        yield {"exporter": exporter, "prometheus": prom, "mosquitto": broker, "alertmanager": am}
    finally:
        for server in (prom, broker, am):
            server.stop()
        exporter.close()


def publish_retained(port: int, topic: str, payload: str) -> None:
    """Publish one retained message with paho (aiomqtt's own client library)."""
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2)
    client.connect("127.0.0.1", port)
    client.loop_start()
    try:
        client.publish(topic, payload, qos=1, retain=True).wait_for_publish(5)
    finally:
        client.loop_stop()
        client.disconnect()


def write_config(tmp_path: Path, stack: dict[str, Any], port: int) -> Path:
    """An armed config: a Prometheus-polled payments monitor and an MQTT auth monitor."""
    prom: Prometheus = stack["prometheus"]
    broker: Mosquitto = stack["mosquitto"]
    am: Alertmanager = stack["alertmanager"]
    boop = tmp_path / "boop"
    prepare(boop)
    raw = {
        "daemon": daemon_table(tmp_path / "state", environment="e2e", listen=f"127.0.0.1:{port}"),
        "sources": {
            "prom": {"type": "prometheus", "url": prom.url, "timeout": "500ms"},
            "bus": {"type": "mqtt", "host": "127.0.0.1", "port": broker.port, "stale_after": "30s"},
        },
        "monitors": {
            "payments": {
                "interval": "500ms",
                "rollback_after": 3,
                "blind_after": 1000,
                "on_rollback": ["stop-traffic", "route-legacy", "page"],
                "rules": [payment_error_rate("prom", RULE_METRIC)],
            },
            "authentication": {
                "interval": "1s",
                "rollback_after": 3,
                "on_rollback": ["page"],
                "rules": [
                    {
                        "name": "auth-success-rate",
                        "source": "bus",
                        "topic": "boop/auth/success_rate",
                        "below": 99.0,
                    }
                ],
            },
        },
        "actions": {
            "stop-traffic": stop_traffic(boop / "flags.json"),
            "route-legacy": route_legacy(boop / "traffic.env"),
            "page": {"type": "alert.alertmanager", "url": am.url},
        },
    }
    return config_file(tmp_path, raw)


def checks_advance(daemon: Rollbackd, by: int) -> Callable[[], bool]:
    """A condition: the payments monitor has run ``by`` more checks than now."""
    start = daemon.monitor()["checks"]
    return lambda: daemon.monitor()["checks"] >= start + by


def rollbacks(daemon: Rollbackd) -> list[dict[str, Any]]:
    """Rollback incidents listed by /status."""
    return [i for i in daemon.status()["incidents"] if i["event"] == "rollback"]


def test_outage_then_breach_then_sigkill(tmp_path: Path, stack: dict[str, Any]) -> None:
    """Healthy, outage, breach, SIGKILL, re-arm: nothing, nothing, one rollback, latch, resolve.

    Prometheus down for many intervals never rolls back; a breach rolls back after exactly
    rollback_after checks; after SIGKILL and restart the latch holds and nothing runs again;
    re-arming resolves the alert in Alertmanager.
    """
    port = free_port()
    daemon = Rollbackd(write_config(tmp_path, stack, port), port, tmp_path)
    boop = tmp_path / "boop"
    daemon.start()
    try:
        wait_for(checks_advance(daemon, 3), 15, what="healthy checks")
        assert daemon.monitor()["state"] == "ok"
        assert rollbacks(daemon) == []
        auth = daemon.monitor("authentication")
        assert (auth["state"], auth["last_outcome"]) == ("ok", "ok")

        stack["prometheus"].stop()
        wait_for(checks_advance(daemon, 8), 30, what="checks during the outage")
        monitor = daemon.monitor()
        assert monitor["state"] == "ok"  # inconclusive: neither failing nor healthy-reset
        assert monitor["consecutive_failures"] == 0
        assert monitor["consecutive_errors"] >= 8
        assert monitor["last_outcome"] == "inconclusive"
        assert rollbacks(daemon) == []
        assert "BOOP_TRAFFIC_PERCENT=5" in (boop / "traffic.env").read_text()

        stack["prometheus"].start()
        wait_for(lambda: daemon.monitor()["last_outcome"] == "ok", 30, what="recovery")
        stack["exporter"].gauge(RULE_METRIC).set(2.5)
        wait_for(lambda: rollbacks(daemon), 30, what="rollback")
        wait_for(lambda: rollbacks(daemon)[0]["finished_at"], 30, what="plan finished")
        (incident,) = rollbacks(daemon)
        assert [s["status"] for s in incident["steps"]] == ["ok", "ok", "ok"]
        record = json.loads(
            (tmp_path / "state" / "incidents" / f"{incident['id']}.json").read_text()
        )
        outcomes = [c["outcome"] for c in record["details"]["checks"]]
        assert outcomes[-3:] == ["breach"] * 3
        assert "breach" not in outcomes[:-3][-1:]  # the streak is exactly rollback_after long
        assert "BOOP_TRAFFIC_PERCENT=0" in (boop / "traffic.env").read_text()
        flags = json.loads((boop / "flags.json").read_text())
        assert flags["flags"]["boop-payments"]["defaultVariant"] == "off"
        am: Alertmanager = stack["alertmanager"]
        alerts = wait_for(am.alerts, 10, what="alert in Alertmanager")
        assert any(a["labels"].get("rule") == "payment-error-rate" for a in alerts)

        daemon.kill()
        daemon.start()
        assert daemon.monitor()["state"] == "rolled_back"
        wait_for(checks_advance(daemon, 4), 15, what="checks after restart")
        assert daemon.monitor()["state"] == "rolled_back"
        assert len(rollbacks(daemon)) == 1

        stack["exporter"].gauge(RULE_METRIC).set(0.05)
        wait_for(lambda: daemon.monitor()["last_outcome"] == "ok", 30, what="healthy again")
        token = read_control_token(tmp_path / "state")
        asyncio.run(post_rearm(f"127.0.0.1:{port}", token, "payments"))
        assert daemon.monitor()["state"] == "ok"
        wait_for(lambda: am.alerts() == [], 20, what="the rollback alert resolved")
    finally:
        code = daemon.stop()
    assert code == 0, daemon.log()
