"""Detection latency: a breach visible at the source -> the first rollback action starting.

Prometheus (polled), MQTT (evaluate on arrival), and side by side on the same Prometheus breach:
an alerting rule with the equivalent ``for:`` through a real Alertmanager (default and tuned
``group_wait``). Run: ``.venv/bin/python -m bench.detection [--quick]``.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import random
import tempfile
import time
import urllib.parse
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt

from bench.common import (
    Arrival,
    DaemonProcess,
    Receiver,
    parse_args,
    summary,
    table,
    toml_config,
    write_result,
)
from rollbackd.state import Store
from tests.servers import Alertmanager, Exporter, Mosquitto, Prometheus, free_port, wait_for

METRIC = "bench_error_rate"
THRESHOLD = 1.0
HEALTHY, BREACHING = 0.2, 5.0
INTERVAL = 1.0  # seconds between the daemon's checks of a polled monitor
ROLLBACK_AFTER = 3
FLOOR = ROLLBACK_AFTER * INTERVAL
MQTT_GAP = 0.1  # seconds between the breaching samples of one MQTT trial
BURST = 100  # samples per burst trial, published back to back with QoS 1
BURST_BREACHING = frozenset({20, 21, 50, 51, 52, *range(80, 90)})
"""A streak of 2 (reset), the first streak of ROLLBACK_AFTER = 3 (ends at 52), then latched."""
BURST_TRIGGER = 52
POLL_PAUSE = 0.002  # between the bench's queries while it waits for the breach to show


class AlertingPrometheus(Prometheus):
    """Prometheus with one alerting rule (``for:`` = the floor) sending to Alertmanagers."""

    def __init__(self, workdir: Path, targets: Sequence[str], alertmanagers: Sequence[str]) -> None:
        super().__init__(workdir, targets, scrape_interval="1s")
        self.alertmanagers = list(alertmanagers)

    def argv(self) -> Sequence[str]:
        argv = super().argv()
        conf = self.workdir / "prometheus.yml"
        rules = self.workdir / "rules.yml"
        group = {
            "name": "bench",
            "interval": f"{INTERVAL:g}s",
            "rules": [
                {"alert": "BenchBreach", "expr": f"{METRIC} > {THRESHOLD}", "for": f"{FLOOR:g}s"}
            ],
        }
        rules.write_text(json.dumps({"groups": [group]}))
        config = json.loads(conf.read_text())
        config["rule_files"] = [str(rules)]
        config["alerting"] = {
            "alertmanagers": [{"static_configs": [{"targets": self.alertmanagers}]}]
        }
        conf.write_text(json.dumps(config, indent=2))
        return argv


class WebhookAlertmanager(Alertmanager):
    """Alertmanager sending every alert, one group per label set, to a webhook."""

    def __init__(self, workdir: Path, url: str, group_wait: str | None) -> None:
        super().__init__(workdir)
        self.hook_url, self.group_wait = url, group_wait

    def argv(self) -> Sequence[str]:
        argv = super().argv()
        route: dict[str, Any] = {"receiver": "hook", "group_by": ["..."]}
        if self.group_wait is not None:  # None: Alertmanager's default (30s)
            route["group_wait"] = self.group_wait
        config = {
            "route": route,
            "receivers": [
                {
                    "name": "hook",
                    "webhook_configs": [{"url": self.hook_url, "send_resolved": False}],
                }
            ],
        }
        (self.workdir / "alertmanager.yml").write_text(json.dumps(config, indent=2))
        return argv


class PromPoller:
    """Asks Prometheus for one series over a kept-alive connection (the bench's own view)."""

    def __init__(self, port: int) -> None:
        self.conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)

    def value(self, promql: str) -> float | None:
        self.conn.request("GET", "/api/v1/query?" + urllib.parse.urlencode({"query": promql}))
        response = self.conn.getresponse()
        result = json.loads(response.read())["data"]["result"]
        return float(result[0]["value"][1]) if result else None

    def until_above(self, promql: str, threshold: float, timeout: float) -> tuple[float, float]:
        """``(send time, window)`` of the first query answering above ``threshold``.

        The window is that query's receive time minus the previous query's send time: the
        breach became visible inside it.
        """
        deadline = time.monotonic() + timeout
        previous = time.time()
        while time.monotonic() < deadline:
            sent = time.time()
            value = self.value(promql)
            if value is not None and value > threshold:
                return sent, time.time() - previous
            previous = sent
            time.sleep(POLL_PAUSE)
        raise TimeoutError(f"{promql} did not rise above {threshold} within {timeout}s")


def daemon_config(
    *,
    workdir: Path, prom: Prometheus, broker: Mosquitto, receiver: Receiver, port: int,
    prom_trials: int, mqtt_trials: int,
) -> Path:  # fmt: skip
    monitors: dict[str, dict[str, Any]] = {}
    for i in range(prom_trials):
        monitors[f"prom-{i}"] = {
            "interval": f"{INTERVAL:g}s",
            "rollback_after": ROLLBACK_AFTER,
            "on_rollback": ["hook"],
            "rules": [
                {
                    "name": "error-rate",
                    "source": "prom",
                    "query": f'{METRIC}{{trial="{i}"}}',
                    "above": THRESHOLD,
                }
            ],
        }
    for j in range(mqtt_trials):
        monitors[f"mqtt-{j}"] = {
            "interval": "1m",  # a push monitor's tick only looks for staleness
            "rollback_after": ROLLBACK_AFTER,
            "on_rollback": ["hook"],
            "rules": [
                {"name": "error-rate", "source": "bus", "topic": f"bench/{j}", "above": THRESHOLD}
            ],
        }
    text = toml_config(
        daemon={
            "mode": "armed",
            "environment": "bench",
            "state_dir": str(workdir / "state"),
            "listen": f"127.0.0.1:{port}",
            "log_level": "info",
        },
        sources={
            "prom": {"type": "prometheus", "url": prom.url, "timeout": "2s"},
            "bus": {"type": "mqtt", "host": "127.0.0.1", "port": broker.port, "stale_after": "1h"},
        },
        actions={
            "hook": {
                "type": "alert.webhook",
                "url": receiver.url("/rollbackd"),
                "timeout": "5s",
                "retries": 0,
            }
        },
        monitors=monitors,
    )
    path = workdir / "rollbackd.toml"
    path.write_text(text)
    return path


def from_daemon(monitor: str) -> Any:
    return lambda a: a.path == "/rollbackd" and (a.body or {}).get("monitor") == monitor


def from_alertmanager(path: str, trial: int) -> Any:
    def match(a: Arrival) -> bool:
        if a.path != path:
            return False
        alerts = (a.body or {}).get("alerts", [])
        return any(x.get("labels", {}).get("trial") == str(trial) for x in alerts)

    return match


def settle(daemon: DaemonProcess, broker: Mosquitto, topics: int) -> None:
    """Wait until every monitor's last check is ok; MQTT ones get a healthy sample meanwhile.

    The MQTT source subscribes after the daemon reports ready, so samples are repeated
    (every 0.2 s, for 30 s at most) until each monitor has seen one.
    """
    client = publisher(broker.port)

    def healthy() -> bool:
        monitors = daemon.status()["monitors"]
        waiting = [name for name, m in monitors.items() if m["last_outcome"] != "ok"]
        for name in waiting:
            if name.startswith("mqtt-"):
                client.publish(f"bench/{name.removeprefix('mqtt-')}", str(HEALTHY), qos=0)
        return not waiting

    try:
        wait_for(healthy, 30, interval=0.2, what=f"every monitor ok ({topics} on MQTT)")
    finally:
        client.loop_stop()
        client.disconnect()


def publisher(port: int, max_inflight: int = 20) -> mqtt.Client:
    """A connected paho client; ``max_inflight``: QoS 1 messages awaiting an ack (0: no cap)."""
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2)
    client.max_inflight_messages_set(max_inflight)
    client.connect("127.0.0.1", port)
    client.loop_start()
    return client


def prometheus_trials(
    trials: int, exporter: Exporter, prom: Prometheus, receiver: Receiver
) -> list[dict[str, Any]]:
    """Breach one series per trial; note when it shows and when each notifier answers."""
    gauge = exporter.gauge(METRIC, ["trial"])
    poller = PromPoller(prom.port)
    out = []
    for i in range(trials):
        time.sleep(random.uniform(0.0, INTERVAL))  # a random phase against scrapes and checks
        gauge.labels(trial=str(i)).set(BREACHING)
        visible, window = poller.until_above(f'{METRIC}{{trial="{i}"}}', THRESHOLD, 10)
        action = receiver.wait(from_daemon(f"prom-{i}"), 15)
        tuned = receiver.wait(from_alertmanager("/am/tuned", i), 20)
        out.append(
            {
                "trial": i,
                "visible": visible,
                "visibility_window_s": window,
                "rollbackd_action": action.at if action else None,
                "alertmanager_tuned": tuned.at if tuned else None,
            }
        )
        print(f"  trial {i}: rollbackd {ms(action, visible)}, alertmanager {ms(tuned, visible)}")
    return out


def ms(arrival: Arrival | None, origin: float) -> str:
    return "missed" if arrival is None else f"{(arrival.at - origin) * 1000:.0f} ms"


def mqtt_trials(
    *, trials: int, first: int, gap: float, broker: Mosquitto, receiver: Receiver, wait: float
) -> list[dict[str, Any]]:
    """Publish ROLLBACK_AFTER breaching samples ``gap`` apart to one monitor's topic per trial."""
    client = publisher(broker.port)
    out = []
    try:
        for j in range(first, first + trials):
            published = 0.0
            for _ in range(ROLLBACK_AFTER):
                if published:
                    time.sleep(gap)
                published = time.time()
                client.publish(f"bench/{j}", str(BREACHING), qos=0)
            action = receiver.wait(from_daemon(f"mqtt-{j}"), wait)
            out.append(
                {
                    "trial": j,
                    "gap_s": gap,
                    "last_published": published,
                    "rollbackd_action": action.at if action else None,
                }
            )
            time.sleep(0.05)
    finally:
        client.loop_stop()
        client.disconnect()
    return out


def burst_value(i: int) -> float:
    """Sample ``i`` of a burst: unique, so the check that triggered tells which sample it was."""
    return round(BREACHING + i / 1000 if i in BURST_BREACHING else HEALTHY + i / 10_000, 4)


def burst_trials(
    *, trials: int, first: int, daemon: DaemonProcess, broker: Mosquitto, receiver: Receiver
) -> list[dict[str, Any]]:
    """Publish BURST samples back to back (QoS 1) per trial; count the checks they made."""
    client = publisher(broker.port, max_inflight=0)  # no cap: the whole burst goes out at once
    out = []
    try:
        for j in range(first, first + trials):
            name = f"mqtt-{j}"
            before = daemon.status()["monitors"][name]["checks"]
            sent, trigger_published = [], 0.0
            for i in range(BURST):
                if i == BURST_TRIGGER:
                    trigger_published = time.time()
                sent.append(client.publish(f"bench/{j}", str(burst_value(i)), qos=1))
            for info in sent:
                info.wait_for_publish(5)
            action = receiver.wait(from_daemon(name), 5)
            with contextlib.suppress(TimeoutError):  # fewer checks than samples: reported
                wait_for(
                    lambda: daemon.status()["monitors"][name]["checks"] >= before + BURST,  # noqa: B023
                    10,
                    interval=0.05,
                    what=f"{BURST} checks of {name}",
                )
            out.append(
                {
                    "trial": j,
                    "samples_sent": BURST,
                    "checks_counted": daemon.status()["monitors"][name]["checks"] - before,
                    "trigger_published": trigger_published,
                    "rollbackd_action": action.at if action else None,
                }
            )
    finally:
        client.loop_stop()
        client.disconnect()
    return out


def incidents(state_dir: Path) -> dict[str, dict[str, Any]]:
    """Per monitor: the first step's start and the times of the checks behind its rollback."""
    out: dict[str, dict[str, Any]] = {}
    with Store.open(state_dir) as store:
        for incident in store.incidents(limit=10_000):
            if incident.event != "rollback" or not incident.steps:
                continue
            checks = incident.details.get("checks", [])
            streak = [c["at"] for c in checks if c["outcome"] == "breach"][-ROLLBACK_AFTER:]
            previous = out.get(incident.monitor, {}).get("rollbacks", 0)
            trigger = incident.details.get("trigger", {}).get("results", [{}])
            out[incident.monitor] = {
                "rollbacks": previous + 1,
                "trigger_value": trigger[0].get("value") if trigger else None,
                "opened_at": incident.opened_at,
                "step_started": incident.steps[0].started_at,
                "first_breach_check": streak[0] if streak else None,
                "trigger_check": streak[-1] if streak else None,
                "breach_checks": len(streak),
            }
    return out


def main() -> None:
    args = parse_args(__doc__ or "")
    prom_n = 3 if args.quick else 8
    mqtt_n = 15 if args.quick else 50
    burst_n = 3 if args.quick else 10
    random.seed(7)
    with tempfile.TemporaryDirectory(prefix="rollbackd-bench-") as tmp:
        workdir = Path(tmp)
        receiver = Receiver()
        exporter = Exporter()
        gauge = exporter.gauge(METRIC, ["trial"])
        for i in range(prom_n):
            gauge.labels(trial=str(i)).set(HEALTHY)
        am_default = WebhookAlertmanager(workdir / "am-default", receiver.url("/am/default"), None)
        am_tuned = WebhookAlertmanager(workdir / "am-tuned", receiver.url("/am/tuned"), "0s")
        prom = AlertingPrometheus(
            workdir / "prometheus",
            [exporter.target],
            [f"127.0.0.1:{am_default.port}", f"127.0.0.1:{am_tuned.port}"],
        )
        broker = Mosquitto(workdir / "mosquitto")
        port = free_port()
        config = daemon_config(
            workdir=workdir,
            prom=prom,
            broker=broker,
            receiver=receiver,
            port=port,
            prom_trials=prom_n,
            mqtt_trials=mqtt_n + burst_n,
        )
        daemon = DaemonProcess(config, workdir, port)
        servers = [broker, am_default, am_tuned, prom]
        try:
            for server in servers:
                server.start()
            prom.wait_targets_up()
            daemon.start()
            settle(daemon, broker, mqtt_n + burst_n)
            print(f"MQTT: {mqtt_n} trials, samples {MQTT_GAP * 1000:.0f} ms apart")
            mq = mqtt_trials(
                trials=mqtt_n, first=0, gap=MQTT_GAP, broker=broker, receiver=receiver, wait=5
            )
            print(f"MQTT burst: {burst_n} trials, {BURST} samples back to back (QoS 1)")
            burst = burst_trials(
                trials=burst_n, first=mqtt_n, daemon=daemon, broker=broker, receiver=receiver
            )
            print(f"Prometheus: {prom_n} trials (Alertmanager default group_wait arrives later)")
            pr = prometheus_trials(prom_n, exporter, prom, receiver)
            for row in pr:
                late = receiver.wait(from_alertmanager("/am/default", row["trial"]), 60)
                row["alertmanager_default"] = late.at if late else None
        finally:
            daemon.stop()
            for server in reversed(servers):
                server.stop()
            exporter.close()
            receiver.close()
        found = incidents(workdir / "state")
        for row in burst:
            inc = found.get(f"mqtt-{row['trial']}", {})
            row["rollbacks"] = inc.get("rollbacks", 0)
            row["trigger_right"] = inc.get("trigger_value") == burst_value(BURST_TRIGGER)
        report(args, pr, mq, burst, found)


def report(
    args: Any, pr: list[dict[str, Any]], mq: list[dict[str, Any]], burst: list[dict[str, Any]],
    found: dict[str, dict[str, Any]],
) -> None:  # fmt: skip
    lat: dict[str, list[float]] = {k: [] for k in ("rollbackd", "tuned", "default")}
    above, overhead, step_lag = [], [], []
    for row in pr:
        vis = row["visible"]
        inc = found.get(f"prom-{row['trial']}", {})
        row["incident"] = inc
        if row["rollbackd_action"]:
            lat["rollbackd"].append(row["rollbackd_action"] - vis)
            above.append(row["rollbackd_action"] - vis - FLOOR)
            if inc.get("first_breach_check"):
                first = inc["first_breach_check"]
                overhead.append(row["rollbackd_action"] - first - (ROLLBACK_AFTER - 1) * INTERVAL)
                step_lag.append(inc["step_started"] - inc["trigger_check"])
        for key, name in (("alertmanager_tuned", "tuned"), ("alertmanager_default", "default")):
            if row.get(key):
                lat[name].append(row[key] - vis)
    mqtt_lat = [r["rollbackd_action"] - r["last_published"] for r in mq if r["rollbackd_action"]]
    burst_lat = [
        r["rollbackd_action"] - r["trigger_published"] for r in burst if r["rollbackd_action"]
    ]
    mqtt_step = [
        found[f"mqtt-{r['trial']}"]["step_started"] - r["last_published"]
        for r in mq
        if f"mqtt-{r['trial']}" in found
    ]
    rows = {
        "prometheus_rollbackd_latency": summary(lat["rollbackd"], 1000),
        "prometheus_rollbackd_above_floor": summary(above, 1000),
        "prometheus_rollbackd_overhead": summary(overhead, 1000),
        "prometheus_rollbackd_trigger_to_step": summary(step_lag, 1000),
        "alertmanager_tuned_latency": summary(lat["tuned"], 1000),
        "alertmanager_default_latency": summary(lat["default"], 1000),
        "mqtt_rollbackd_latency": summary(mqtt_lat, 1000),
        "mqtt_rollbackd_to_step_started": summary(mqtt_step, 1000),
        "mqtt_burst_latency": summary(burst_lat, 1000),
        "visibility_window": summary([r["visibility_window_s"] for r in pr], 1000),
    }
    med = {k: v["median"] for k, v in rows.items()}
    speedup = (
        round(med["alertmanager_default_latency"] / med["prometheus_rollbackd_latency"], 1)
        if med["alertmanager_default_latency"] and med["prometheus_rollbackd_latency"]
        else None
    )
    speedup_tuned = (
        round(med["alertmanager_tuned_latency"] / med["prometheus_rollbackd_latency"], 2)
        if med["alertmanager_tuned_latency"] and med["prometheus_rollbackd_latency"]
        else None
    )
    labels = {
        "prometheus_rollbackd_latency": ("rollbackd, Prometheus poll: visible -> action", "ms"),
        "prometheus_rollbackd_above_floor": ("  same, minus floor (3 x 1 s)", "ms"),
        "prometheus_rollbackd_overhead": ("  overhead: action - 1st breach check - 2 s", "ms"),
        "prometheus_rollbackd_trigger_to_step": ("  3rd breach check -> step started", "ms"),
        "alertmanager_tuned_latency": ("Prometheus for: 3s + Alertmanager group_wait 0s", "ms"),
        "alertmanager_default_latency": ("Prometheus for: 3s + Alertmanager default 30s", "ms"),
        "mqtt_rollbackd_latency": ("rollbackd, MQTT: 3rd sample published -> action", "ms"),
        "mqtt_rollbackd_to_step_started": ("  3rd sample published -> step started", "ms"),
        "mqtt_burst_latency": (
            f"  burst of {BURST}: sample #{BURST_TRIGGER} published -> action",
            "ms",
        ),
        "visibility_window": ("bench's uncertainty on 'visible' (poll window)", "ms"),
    }
    print()
    print(
        table(
            "Detection latency (action = webhook arrival at the bench's receiver)",
            ["measure", "unit", "n", "median", "p99", "min", "max"],
            [
                (labels[k][0], labels[k][1], v["n"], v["median"], v["p99"], v["min"], v["max"])
                for k, v in rows.items()
            ],
        )
    )
    counted = [r["checks_counted"] for r in burst]
    exact = sum(
        1
        for r in burst
        if r["checks_counted"] == BURST and r["rollbacks"] == 1 and r["trigger_right"]
    )
    print(
        f"\nrollbackd acts {speedup}x sooner than Alertmanager with the default group_wait "
        f"(tuned: {speedup_tuned}x)"
    )
    print(
        f"MQTT bursts of {BURST} back-to-back samples: checks counted {counted} "
        f"(samples sent {BURST} each); exactly one rollback at sample #{BURST_TRIGGER} "
        f"in {exact}/{len(burst)} trials"
    )
    write_result(
        "detection",
        args,
        {
            "method": {
                "daemon": "subprocess `python -m rollbackd run --config FILE`, mode armed, "
                f"log level info (JSON to a file); polled monitors: interval {INTERVAL:g}s, "
                f"rollback_after {ROLLBACK_AFTER}; first on_rollback step: alert.webhook to "
                "a receiver in the bench process, which notes time.time() on arrival",
                "visible": "the bench polls Prometheus's query API every ~2 ms over a kept-"
                "alive connection; 'visible' is the send time of the first query answering "
                "the breaching value (the scrape interval is 1 s; each trial waits a random "
                "0-1 s before breaching so phases vary)",
                "floor": f"rollback_after x interval = {FLOOR:g}s; 'above floor' = latency - "
                "floor (negative: the first breaching check came less than one interval "
                "after the breach showed); 'overhead' = action - time of the first breaching "
                f"check - {ROLLBACK_AFTER - 1} intervals, the daemon's own cost, phase-free",
                "alertmanager": f"same breach, same Prometheus: alerting rule `{METRIC} > "
                f"{THRESHOLD}` with for: {FLOOR:g}s, rule group interval {INTERVAL:g}s, to two "
                "Alertmanagers (group_by ['...'], one default group_wait 30s, one 0s) "
                "webhooking to the bench's receiver",
                "mqtt": f"Mosquitto; per trial a fresh monitor gets {ROLLBACK_AFTER} breaching "
                f"samples {MQTT_GAP * 1000:.0f} ms apart (paho, QoS 0); latency from the "
                f"publish call of the {ROLLBACK_AFTER}rd sample to the webhook's arrival; "
                f"burst: per trial a fresh monitor gets {BURST} samples back to back (paho, "
                f"QoS 1, no in-flight cap), breaching at {sorted(BURST_BREACHING)}; counted = "
                "the monitor's checks after minus before (from /status); right = exactly one "
                f"rollback, triggered by sample #{BURST_TRIGGER}'s check",
            },
            "targets": {
                "above_floor_median_ms": 50,
                "mqtt_p99_ms": 20,
                "mqtt_burst_checks_per_sample": 1,
                "times_sooner_than_alertmanager_default": 10,
            },
            "summary": rows,
            "times_sooner_than_alertmanager_default": speedup,
            "times_sooner_than_alertmanager_tuned": speedup_tuned,
            "mqtt_burst": burst,
            "mqtt_burst_checks_counted": counted,
            "mqtt_burst_exact_trials": f"{exact}/{len(burst)}",
            "prometheus_trials": pr,
            "mqtt_trials": mq,
        },
    )


if __name__ == "__main__":
    main()
