"""Footprint: RSS and CPU of an idle daemon subprocess with 10 and 100 monitors at a 1 s interval.

Idle: every source stays healthy, so every check is ok and nothing acts. The synthetic rows
read the synthetic source only; the both-sources row loads the two real sources, a
``prometheus`` source on a local Prometheus and an ``mqtt`` source on a local Mosquitto.
Run: ``.venv/bin/python -m bench.footprint [--quick]``.
"""

from __future__ import annotations

import contextlib
import os
import statistics
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt

from bench.common import DaemonProcess, parse_args, table, toml_config, write_result
from tests.servers import Exporter, Mosquitto, Prometheus, free_port, http_get, wait_for

METRICS = ("auth_error_rate", "auth_response_time_ms", "auth_success_rate")
THRESHOLDS = {
    "auth_error_rate": {"above": 1.0},
    "auth_response_time_ms": {"above": 3000.0},
    "auth_success_rate": {"below": 99.0},
}
TICK = os.sysconf("SC_CLK_TCK")

BOTH_HALF = 50
"""Both-sources row: this many Prometheus-polled monitors and as many MQTT (push) monitors."""
GAUGE = "bench_error_rate"
HEALTHY = 0.1
THRESHOLD = 1.0


def write_config(
    workdir: Path, port: int, sources: dict[str, dict[str, Any]], monitors: dict[str, Any]
) -> Path:
    text = toml_config(
        daemon={
            "mode": "dry-run",
            "environment": "bench",
            "state_dir": str(workdir / "state"),
            "listen": f"127.0.0.1:{port}",
        },
        sources=sources,
        actions={"note": {"type": "alert.log"}},
        monitors=monitors,
    )
    path = workdir / "rollbackd.toml"
    path.write_text(text)
    return path


def monitor(rules: list[dict[str, Any]]) -> dict[str, Any]:
    return {"interval": "1s", "rollback_after": 5, "on_rollback": ["note"], "rules": rules}


def config(workdir: Path, monitors: int, rules: int, port: int) -> Path:
    """``monitors`` monitors of ``rules`` rules each on the synthetic source."""
    return write_config(
        workdir,
        port,
        {"synthetic": {"type": "synthetic", "phases": [{"kind": "healthy"}]}},
        {
            f"m{i:03d}": monitor(
                [
                    {"name": m, "source": "synthetic", "query": m, **THRESHOLDS[m]}
                    for m in METRICS[:rules]
                ]
            )
            for i in range(monitors)
        },
    )


def both_config(workdir: Path, port: int, prometheus_url: str, broker_port: int) -> Path:
    """``BOTH_HALF`` monitors with one Prometheus rule, ``BOTH_HALF`` with one MQTT rule."""
    query = GAUGE + '{{monitor="{:03d}"}}'
    monitors = {
        f"prom-{i:03d}": monitor(
            [{"name": "error-rate", "source": "prom", "query": query.format(i), "above": THRESHOLD}]
        )
        for i in range(BOTH_HALF)
    }
    monitors |= {
        f"mqtt-{i:03d}": monitor(
            [{"name": "error-rate", "source": "bus", "topic": topic(i), "above": THRESHOLD}]
        )
        for i in range(BOTH_HALF)
    }
    sources = {
        "prom": {"type": "prometheus", "url": prometheus_url, "timeout": "2s"},
        "bus": {"type": "mqtt", "host": "127.0.0.1", "port": broker_port},
    }
    return write_config(workdir, port, sources, monitors)


def topic(i: int) -> str:
    return f"bench/footprint/{i:03d}"


def rss_kib(pid: int) -> tuple[int, int]:
    """``(VmRSS, VmHWM)`` in KiB from /proc/<pid>/status."""
    found = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in {"VmRSS", "VmHWM"}:
            found[key] = int(value.split()[0])
    return found["VmRSS"], found["VmHWM"]


def cpu_seconds(pid: int) -> float:
    """utime + stime of the process (all threads) from /proc/<pid>/stat."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2 :].split()  # after "pid (comm) "
    return (int(fields[11]) + int(fields[12])) / TICK  # fields 14 and 15 of stat(5)


def run_ns(pid: int) -> int:
    """Nanoseconds on a CPU of the process's live threads (/proc/<pid>/task/*/schedstat).

    The same clock as utime + stime, to the nanosecond instead of the 10 ms tick, so one
    second of an idle daemon (a few ms of CPU) can be measured on its own.
    """
    total = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(FileNotFoundError, ProcessLookupError):  # a thread ended
            total += int((task / "schedstat").read_text().split()[0])
    return total


def total_checks(daemon: DaemonProcess) -> int:
    return sum(m["checks"] for m in daemon.status()["monitors"].values())


def non_ok_checks(daemon: DaemonProcess) -> int:
    """Checks whose outcome was not ok so far (``rollbackd_checks_total`` from /metrics)."""
    code, body = http_get(f"http://127.0.0.1:{daemon.port}/metrics")
    if code != 200:
        raise RuntimeError(f"/metrics answered {code}")
    total = 0.0
    for line in body.decode().splitlines():
        if line.startswith("rollbackd_checks_total{") and 'outcome="ok"' not in line:
            total += float(line.rsplit(" ", 1)[1])
    return int(total)


def all_ok(daemon: DaemonProcess) -> bool:
    return all(m["last_outcome"] == "ok" for m in daemon.status()["monitors"].values())


def sample(
    daemon: DaemonProcess, window: float, warmup: float, settle: Callable[[], None] | None = None
) -> dict[str, Any]:
    """Start ``daemon``, warm up (``settle`` first), then sample RSS and CPU over ``window``."""
    started = time.monotonic()
    daemon.start()
    ready_s = time.monotonic() - started
    try:
        if settle is not None:
            settle()
        time.sleep(warmup)  # startup imports and the first checks are not idle
        pid = daemon.pid
        bad0 = non_ok_checks(daemon)
        checks0, cpu0, wall0 = total_checks(daemon), cpu_seconds(pid), time.monotonic()
        samples = []
        seconds = []  # CPU % of each second on its own (the VM's bursts of noise stand out)
        ran, at = run_ns(pid), time.monotonic()
        while time.monotonic() - wall0 < window:
            time.sleep(1.0)
            samples.append(rss_kib(pid)[0])
            ran_now, at_now = run_ns(pid), time.monotonic()
            seconds.append(max(ran_now - ran, 0) / 1e7 / (at_now - at))
            ran, at = ran_now, at_now
        # /status is read before and after, outside the window's CPU figure as far as
        # possible: read CPU first, then the check count
        cpu1, wall1 = cpu_seconds(pid), time.monotonic()
        checks1 = total_checks(daemon)
        bad1 = non_ok_checks(daemon)
        hwm = rss_kib(pid)[1]
        threads = len(list(Path(f"/proc/{pid}/task").iterdir()))
    finally:
        daemon.stop()
    wall = wall1 - wall0
    return {
        "window_s": round(wall, 1),
        "ready_s": round(ready_s, 2),
        "rss_mib_median": round(statistics.median(samples) / 1024, 1),
        "rss_mib_max": round(max(samples) / 1024, 1),
        "hwm_mib": round(hwm / 1024, 1),
        "cpu_percent_of_core": round(100 * (cpu1 - cpu0) / wall, 2),
        "cpu_percent_median_second": round(statistics.median(seconds), 2),
        "cpu_percent_quietest_second": round(min(seconds), 2),
        "checks_per_s": round((checks1 - checks0) / wall, 1),
        "threads": threads,
        "non_ok_checks": bad1 - bad0,
    }


def measure(monitors: int, rules: int, window: float, warmup: float) -> dict[str, Any]:
    """Synthetic source only: ``monitors`` x ``rules``."""
    with tempfile.TemporaryDirectory(prefix="rollbackd-bench-") as tmp:
        workdir = Path(tmp)
        port = free_port()
        daemon = DaemonProcess(config(workdir, monitors, rules, port), workdir, port)
        row = sample(daemon, window, warmup)
    return {"monitors": monitors, "rules_per_monitor": rules, **row}


class Publisher:
    """A paho client publishing ``HEALTHY`` to each of ``topics`` topics every second (QoS 0)."""

    def __init__(self, port: int, topics: int) -> None:
        self.topics = topics
        self.sent = 0
        self._stop = threading.Event()
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2)
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        next_at = time.monotonic()
        while not self._stop.is_set():
            for i in range(self.topics):
                self.client.publish(topic(i), str(HEALTHY), qos=0)
            self.sent += self.topics
            next_at += 1.0
            self._stop.wait(max(0.0, next_at - time.monotonic()))

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self.client.loop_stop()
        self.client.disconnect()


def measure_both(window: float, warmup: float) -> dict[str, Any]:
    """Both real sources: a local Prometheus (scraping an exporter) and a local Mosquitto."""
    with tempfile.TemporaryDirectory(prefix="rollbackd-bench-") as tmp:
        workdir = Path(tmp)
        exporter = Exporter()
        gauge = exporter.gauge(GAUGE, ["monitor"])
        for i in range(BOTH_HALF):
            gauge.labels(monitor=f"{i:03d}").set(HEALTHY)
        prom = Prometheus(workdir / "prometheus", [exporter.target], scrape_interval="1s")
        broker = Mosquitto(workdir / "mosquitto")
        publisher: Publisher | None = None
        try:
            prom.start()
            prom.wait_targets_up()
            broker.start()
            publisher = Publisher(broker.port, BOTH_HALF)
            port = free_port()
            path = both_config(workdir, port, prom.url, broker.port)
            daemon = DaemonProcess(path, workdir, port)

            def settle() -> None:  # the MQTT source subscribes after daemon_ready
                wait_for(lambda: all_ok(daemon), 30, interval=0.2, what="every monitor ok")

            row = sample(daemon, window, warmup, settle)
        finally:
            if publisher is not None:
                publisher.close()
            broker.stop()
            prom.stop()
            exporter.close()
    return {
        "monitors": 2 * BOTH_HALF,
        "rules_per_monitor": 1,
        "prometheus_monitors": BOTH_HALF,
        "mqtt_monitors": BOTH_HALF,
        "mqtt_samples_per_s": BOTH_HALF,
        **row,
    }


def main() -> None:
    args = parse_args(__doc__ or "")
    window = 30.0 if args.quick else 60.0
    warmup = 3.0 if args.quick else 5.0
    runs = [(10, 1), (100, 1)] if args.quick else [(10, 1), (100, 1), (100, 3)]
    results = []
    for monitors, rules in runs:
        print(f"  {monitors} monitors x {rules} rule(s), synthetic: {window:g} s ...", flush=True)
        results.append(measure(monitors, rules, window, warmup))
    print(
        f"  {BOTH_HALF} Prometheus + {BOTH_HALF} MQTT monitors x 1 rule: {window:g} s ...",
        flush=True,
    )
    both = measure_both(window, warmup)
    print()
    keys = ("monitors", "rules_per_monitor", "checks_per_s", "rss_mib_median", "rss_mib_max",
            "hwm_mib", "cpu_percent_of_core", "cpu_percent_median_second",
            "cpu_percent_quietest_second", "threads", "ready_s", "non_ok_checks")  # fmt: skip
    header = ["sources", "monitors", "rules/mon", "checks/s", "RSS MiB (median)", "RSS max",
              "HWM", "CPU % of a core", "median second", "quietest second", "threads",
              "ready s", "non-ok checks"]  # fmt: skip
    rows = [["synthetic", *(r[k] for k in keys)] for r in results]
    rows.append(["prometheus+mqtt", *(both[k] for k in keys)])
    title = f"Idle daemon subprocess, interval 1 s, healthy sources ({window:g} s window)"
    print(table(title, header, rows))
    write_result(
        "footprint",
        args,
        {
            "method": "daemon subprocess `python -m rollbackd run --config FILE`, dry-run, "
            "listen on a free loopback port, state_dir in a temporary directory; `runs`: "
            "synthetic source with one healthy phase; after a warm-up, VmRSS from "
            "/proc/<pid>/status every second and utime+stime from /proc/<pid>/stat over the "
            "window; CPU % = CPU seconds / wall seconds x 100 (also each second on its own, "
            "from the threads' /proc/<pid>/task/*/schedstat run time in ns: the median and "
            "the quietest second); checks/s from /status before "
            "and after; non-ok checks from rollbackd_checks_total on /metrics",
            "both_sources_method": f"same measurement with both real sources loaded: "
            f"{BOTH_HALF} monitors with one rule on a `prometheus` source (a local Prometheus "
            f"on 127.0.0.1 scraping, every 1 s, an exporter with {BOTH_HALF} healthy series of "
            f"`{GAUGE}`, one per monitor) and {BOTH_HALF} monitors with one rule on an `mqtt` "
            f"source (a local Mosquitto; a paho publisher thread in the bench sends a healthy "
            f"value to each monitor's topic every second, QoS 0, so those push monitors check "
            f"on arrival); all at interval 1 s; the window starts once every monitor's last "
            f"check is ok, after the warm-up",
            "target": {"rss_mib": 60, "cpu_percent_of_core": 1.0},
            "runs": results,
            "both_sources": both,
        },
    )


if __name__ == "__main__":
    main()
