"""Real servers for tests: Prometheus, Mosquitto, Alertmanager on loopback ports, and an exporter.

Each server is started from its Debian binary with a generated config in a temporary directory,
listens on 127.0.0.1 only, and can be stopped and started again on the same port (outage tests).
Waiting is always on a condition with a deadline (:func:`wait_for`), never a bare sleep.

Typical use (the fixtures in ``conftest.py`` do this for you)::

    with Mosquitto(tmp_path) as broker:      # started, accepting connections
        ...broker.port...
        broker.stop()                         # outage
        broker.start()                        # back, same port
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, Self

from prometheus_client import CollectorRegistry, Gauge, start_http_server

PROMETHEUS_BIN = "/usr/bin/prometheus"
MOSQUITTO_BIN = "/usr/sbin/mosquitto"
ALERTMANAGER_BIN = "/usr/bin/prometheus-alertmanager"

START_TIMEOUT = 20.0
"""Seconds a server may take to become ready (generous: CI machines have 2 cores)."""


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_for(
    condition: Callable[[], object],
    timeout: float = 10.0,
    interval: float = 0.05,
    what: str = "condition",
) -> Any:
    """Poll ``condition`` until it is truthy and return its result; TimeoutError at the deadline."""
    deadline = time.monotonic() + timeout
    while True:
        result = condition()
        if result:
            return result
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} not met within {timeout}s")
        time.sleep(interval)


def http_get(url: str, timeout: float = 2.0) -> tuple[int, bytes]:
    """``(status, body)`` of a GET; status 0 when nothing answered."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return int(response.status), response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()
    except (urllib.error.URLError, OSError):
        return 0, b""


def port_open(port: int, host: str = "127.0.0.1") -> bool:
    """Tell whether something accepts TCP connections on ``host:port``."""
    with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=0.5):
        return True
    return False


class Server:
    """A real server process on ``127.0.0.1:port`` with its files under ``workdir``.

    ``start`` waits until the server is ready; ``stop`` terminates it (SIGTERM, then SIGKILL) and
    waits until the port is closed, so an outage is real when ``stop`` returns. Both can be
    called any number of times; the port and the config stay the same.
    """

    binary = ""
    name = "server"

    def __init__(self, workdir: Path, port: int | None = None) -> None:
        if not Path(self.binary).exists():
            raise RuntimeError(f"{self.binary} is missing: run scripts/setup --test as root")
        self.workdir = workdir
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        self.log_path = self.workdir / f"{self.name}.log"
        self.process: subprocess.Popen[bytes] | None = None

    def argv(self) -> Sequence[str]:
        """Write the config files and return the command line."""
        raise NotImplementedError

    def ready(self) -> bool:
        """Tell whether the server serves requests (its port accepts connections)."""
        return port_open(self.port)

    @property
    def running(self) -> bool:
        """True while the process is alive."""
        return self.process is not None and self.process.poll() is None

    def start(self, timeout: float = START_TIMEOUT) -> Self:
        """Start the process and wait until it is ready (fails with the server's log)."""
        if self.running:
            return self
        argv = self.argv()
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                argv, stdout=log, stderr=subprocess.STDOUT, cwd=self.workdir
            )
        try:
            wait_for(self._ready_or_dead, timeout, what=f"{self.name} on port {self.port} ready")
        except (TimeoutError, RuntimeError):
            self.stop()
            raise
        return self

    def _ready_or_dead(self) -> bool:
        if self.process is not None and self.process.poll() is not None:
            tail = self.log_path.read_text(errors="replace")[-2000:]
            raise RuntimeError(f"{self.name} exited with {self.process.returncode}:\n{tail}")
        return self.ready()

    def stop(self, timeout: float = 10.0) -> None:
        """Terminate the process and wait until its port is closed."""
        process, self.process = self.process, None
        if process is None:
            return
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout)
        wait_for(lambda: not port_open(self.port), timeout, what=f"{self.name} port closed")

    def restart(self) -> Self:
        """Stop, then start again on the same port."""
        self.stop()
        return self.start()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


class Mosquitto(Server):
    """Mosquitto accepting anonymous MQTT on ``127.0.0.1:port``, without persistence."""

    binary = MOSQUITTO_BIN
    name = "mosquitto"

    def argv(self) -> Sequence[str]:
        """Write mosquitto.conf and return the command line."""
        conf = self.workdir / "mosquitto.conf"
        lines = [
            f"listener {self.port} 127.0.0.1",
            "allow_anonymous true",
            "persistence false",
            "log_dest stderr",
        ]
        if os.geteuid() == 0:
            lines.append("user root")  # keep access to the temporary dir when run as root
        conf.write_text("\n".join(lines) + "\n")
        return [self.binary, "-c", str(conf)]


class Prometheus(Server):
    """Prometheus scraping ``targets`` (``host:port`` strings) every ``scrape_interval``.

    ``start`` waits for ``/-/ready``; call :meth:`wait_targets_up` to wait for the first scrape.
    The TSDB lives in ``workdir/data`` and survives a restart.
    """

    binary = PROMETHEUS_BIN
    name = "prometheus"

    def __init__(
        self,
        workdir: Path,
        targets: Sequence[str] = (),
        port: int | None = None,
        scrape_interval: str = "1s",
    ) -> None:
        super().__init__(workdir, port)
        self.targets = list(targets)
        self.scrape_interval = scrape_interval

    @property
    def url(self) -> str:
        """Base URL of the HTTP API."""
        return f"http://127.0.0.1:{self.port}"

    def argv(self) -> Sequence[str]:
        """Write prometheus.yml and return the command line."""
        config = {
            "global": {
                "scrape_interval": self.scrape_interval,
                "evaluation_interval": self.scrape_interval,
            },
            "scrape_configs": [
                {"job_name": "test", "static_configs": [{"targets": self.targets}]},
            ],
        }
        conf = self.workdir / "prometheus.yml"
        conf.write_text(json.dumps(config, indent=2))  # JSON is YAML
        return [
            self.binary,
            f"--config.file={conf}",
            f"--storage.tsdb.path={self.workdir / 'data'}",
            f"--web.listen-address=127.0.0.1:{self.port}",
            "--web.enable-lifecycle",
            "--log.level=warn",
        ]

    def ready(self) -> bool:
        """Tell whether ``/-/ready`` answers 200."""
        return http_get(f"{self.url}/-/ready")[0] == 200

    def query(self, promql: str) -> dict[str, Any]:
        """Return the ``data`` of an instant query (for assertions in tests)."""
        query = urllib.parse.urlencode({"query": promql})
        status, body = http_get(f"{self.url}/api/v1/query?{query}")
        if status != 200:
            raise RuntimeError(f"query {promql!r} failed with {status}: {body[:200]!r}")
        data: dict[str, Any] = json.loads(body)["data"]
        return data

    def wait_targets_up(self, timeout: float = 15.0) -> None:
        """Wait until every target has been scraped successfully at least once."""

        def all_up() -> bool:
            status, body = http_get(f"{self.url}/api/v1/targets")
            if status != 200:
                return False
            active = json.loads(body)["data"]["activeTargets"]
            return len(active) == len(self.targets) and all(t["health"] == "up" for t in active)

        wait_for(all_up, timeout, interval=0.1, what="prometheus targets up")


class Alertmanager(Server):
    """Alertmanager routing every alert to a null receiver, without clustering."""

    binary = ALERTMANAGER_BIN
    name = "alertmanager"

    @property
    def url(self) -> str:
        """Base URL of the HTTP API."""
        return f"http://127.0.0.1:{self.port}"

    def argv(self) -> Sequence[str]:
        """Write alertmanager.yml and return the command line."""
        config = {
            "route": {"receiver": "null", "group_wait": "1s"},
            "receivers": [{"name": "null"}],
        }
        conf = self.workdir / "alertmanager.yml"
        conf.write_text(json.dumps(config, indent=2))
        return [
            self.binary,
            f"--config.file={conf}",
            f"--storage.path={self.workdir / 'data'}",
            f"--web.listen-address=127.0.0.1:{self.port}",
            "--cluster.listen-address=",
            "--log.level=warn",
        ]

    def ready(self) -> bool:
        """Tell whether ``/-/ready`` answers 200."""
        return http_get(f"{self.url}/-/ready")[0] == 200

    def alerts(self) -> list[dict[str, Any]]:
        """Return the alerts Alertmanager holds now (``GET /api/v2/alerts``)."""
        status, body = http_get(f"{self.url}/api/v2/alerts")
        if status != 200:
            raise RuntimeError(f"alertmanager answered {status}: {body[:200]!r}")
        alerts: list[dict[str, Any]] = json.loads(body)
        return alerts


class Exporter:
    """A tiny Prometheus exporter on loopback whose gauges the test sets.

    Each exporter has its own ``CollectorRegistry``, so nothing leaks between tests.
    """

    def __init__(self, port: int | None = None) -> None:
        self.registry = CollectorRegistry()
        self.port = port or free_port()
        self._server, self._thread = start_http_server(
            self.port, addr="127.0.0.1", registry=self.registry
        )
        self._gauges: dict[str, Gauge] = {}

    @property
    def target(self) -> str:
        """``host:port`` for a scrape config."""
        return f"127.0.0.1:{self.port}"

    def gauge(self, name: str, labelnames: Sequence[str] = ()) -> Gauge:
        """Return the gauge called ``name``, created on first use."""
        if name not in self._gauges:
            self._gauges[name] = Gauge(
                name, f"test gauge {name}", labelnames=labelnames, registry=self.registry
            )
        return self._gauges[name]

    def close(self) -> None:
        """Stop serving."""
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(5)


class Rollbackd:
    """The daemon itself, ``python -m rollbackd run --config FILE``, logging to a file."""

    def __init__(self, config: Path, port: int, workdir: Path) -> None:
        self.config, self.port, self.workdir = config, port, workdir
        self.process: subprocess.Popen[bytes] | None = None
        self.starts = 0

    def start(self) -> None:
        """Start and wait until /health answers."""
        self.starts += 1
        env = {**os.environ, "ROLLBACKD_LOG_LEVEL": "debug", "ROLLBACKD_LOG_FORMAT": "json"}
        with (self.workdir / f"daemon-{self.starts}.log").open("wb") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "rollbackd", "run", "--config", str(self.config)],
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
            )
        wait_for(self._healthy, 20, what="daemon /health")

    def _healthy(self) -> bool:
        assert self.process is not None
        if self.process.poll() is not None:
            raise AssertionError(f"daemon exited with {self.process.returncode}: {self.log()}")
        return http_get(f"http://127.0.0.1:{self.port}/health")[0] == 200

    def status(self) -> dict[str, Any]:
        """GET /status."""
        code, body = http_get(f"http://127.0.0.1:{self.port}/status")
        assert code == 200, body
        result: dict[str, Any] = json.loads(body)
        return result

    def monitor(self, name: str = "payments") -> dict[str, Any]:
        """One monitor of /status."""
        monitor: dict[str, Any] = self.status()["monitors"][name]
        return monitor

    def kill(self) -> None:
        """SIGKILL: no chance to clean up."""
        assert self.process is not None
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(10)

    def stop(self) -> int:
        """SIGTERM and wait for a graceful exit."""
        assert self.process is not None
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            self.process.wait(30)
        return self.process.returncode

    def log_bytes(self) -> bytes:
        """Everything the daemon logged, every start, as written."""
        return b"".join(
            (self.workdir / f"daemon-{n}.log").read_bytes() for n in range(1, self.starts + 1)
        )

    def log(self) -> str:
        """Everything the daemon logged (last start)."""
        return (self.workdir / f"daemon-{self.starts}.log").read_text(errors="replace")[-4000:]


PROMTOOL_BIN = "/usr/bin/promtool"


def backfill(openmetrics: Path, data_dir: Path) -> None:
    """Write TSDB blocks into ``data_dir`` from an OpenMetrics file (ending in ``# EOF``).

    ``promtool tsdb create-blocks-from openmetrics``: samples in time order per series.
    """
    result = subprocess.run(
        [PROMTOOL_BIN, "tsdb", "create-blocks-from", "openmetrics", "-q", *(openmetrics, data_dir)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    if result.returncode != 0:
        raise RuntimeError(f"promtool backfill failed: {result.stderr[-2000:]}")


class HistoryPrometheus(Prometheus):
    """Prometheus serving backfilled blocks however old they are (retention 100y), no targets."""

    def argv(self) -> Sequence[str]:
        """Prometheus's command line with a retention that keeps every backfilled block."""
        return [*super().argv(), "--storage.tsdb.retention.time=100y"]
