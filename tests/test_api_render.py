"""/metrics and /status render off the event loop: /health answers while a big one renders.

The clients run in threads, so a blocked event loop shows as a /health that does not answer
(on the loop, the test's own client would be blocked too and prove nothing).
"""

from __future__ import annotations

import asyncio
import threading
import time
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from prometheus_client import CollectorRegistry
from prometheus_client.core import GaugeMetricFamily, Metric

from rollbackd.api import ApiServer

TOKEN = "render-token"
MONITORS = 10_000


@dataclass
class Gate:
    """Holds a render until the test releases it (or 10 s pass)."""

    started: threading.Event = field(default_factory=threading.Event)
    release: threading.Event = field(default_factory=threading.Event)

    def hold(self) -> None:
        """Say the render started, then wait for the release."""
        self.started.set()
        self.release.wait(10)


class BigRegistry:
    """A collector with the series of ``MONITORS`` monitors (several MB of exposition)."""

    def __init__(self, gate: Gate | None = None, series: int = 5) -> None:
        self.gate, self.series = gate, series

    def collect(self) -> Iterator[Metric]:
        """Yield one gauge family with a series per monitor and rule."""
        if self.gate is not None:
            self.gate.hold()
        family = GaugeMetricFamily(
            "rollbackd_rule_value", "latest value per rule", labels=["monitor", "rule"]
        )
        for m in range(MONITORS):
            for r in range(self.series):
                family.add_metric([f"monitor-{m}", f"rule-{r}"], m * 0.5 + r)
        yield family


class HeldDocument(dict[str, Any]):
    """A /status document whose JSON encoding waits on a gate (json.dumps calls items())."""

    def __init__(self, gate: Gate, data: dict[str, Any]) -> None:
        super().__init__(data)
        self.gate = gate

    def items(self) -> Any:
        """Hold the encoder, then give the items."""
        self.gate.hold()
        return super().items()


@dataclass
class Surface:
    """Healthy, with a status document the test sets."""

    document: dict[str, Any] = field(default_factory=dict)
    mode: str = "dry-run"

    def health(self) -> tuple[bool, str]:
        """Always healthy."""
        return True, "ok"

    def status(self) -> dict[str, Any]:
        """The document as set."""
        return self.document

    async def rearm(self, monitor: str) -> dict[str, Any]:
        """Not used here."""
        return {"monitor": monitor}


def _get(url: str, timeout: float) -> tuple[int, int, float]:
    """``(status, body bytes, monotonic time done)``; status 0 when it did not answer in time."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as answer:
            return int(answer.status), len(answer.read()), time.monotonic()
    except OSError:
        return 0, 0, time.monotonic()


async def _health_while_held(server: ApiServer, path: str, gate: Gate) -> dict[str, float]:
    """GET ``path`` (held by ``gate``), then /health once the render started; figures."""
    base = f"http://127.0.0.1:{server.port}"
    with ThreadPoolExecutor(2) as threads:
        loop = asyncio.get_running_loop()
        held = loop.run_in_executor(threads, _get, base + path, 30.0)

        def health_once_started() -> tuple[int, int, float]:
            assert gate.started.wait(10), "the render never started"
            try:
                return _get(base + "/health", 3.0)
            finally:
                gate.release.set()

        sent = time.monotonic()
        health = await loop.run_in_executor(threads, health_once_started)
        done = await held
    assert done[0] == 200, done
    return {
        "health_status": health[0],
        "health_done": health[2],
        "render_done": done[2],
        "health_seconds": health[2] - sent,
    }


async def test_health_answers_while_metrics_render() -> None:
    """While /metrics is rendering, /health answers (before /metrics finishes)."""
    gate = Gate()
    registry = CollectorRegistry()
    registry.register(BigRegistry(gate, series=1))
    address = ("127.0.0.1", 0)
    async with ApiServer(Surface(), registry, TOKEN, address, version="t") as server:
        figures = await _health_while_held(server, "/metrics", gate)
    assert figures["health_status"] == 200, "/health did not answer while /metrics rendered"
    assert figures["health_done"] < figures["render_done"]


async def test_health_answers_while_status_renders() -> None:
    """While /status is being encoded, /health answers (before /status finishes)."""
    gate = Gate()
    monitors = {f"monitor-{i}": {"state": "ok", "value": i} for i in range(MONITORS)}
    surface = Surface(HeldDocument(gate, {"mode": "dry-run", "monitors": monitors}))
    address = ("127.0.0.1", 0)
    async with ApiServer(surface, CollectorRegistry(), TOKEN, address, version="t") as server:
        figures = await _health_while_held(server, "/status", gate)
    assert figures["health_status"] == 200, "/health did not answer while /status rendered"
    assert figures["health_done"] < figures["render_done"]


async def test_health_latency_during_a_big_metrics_render() -> None:
    """Figures: /health latency while a 10,000-monitor /metrics renders (printed, not timed)."""
    registry = CollectorRegistry()
    registry.register(BigRegistry(series=10))
    address = ("127.0.0.1", 0)
    async with ApiServer(Surface(), registry, TOKEN, address, version="t") as server:
        base = f"http://127.0.0.1:{server.port}"
        stop = threading.Event()

        def poll() -> list[tuple[float, float, int]]:
            seen = []
            while not stop.is_set():
                before = time.monotonic()
                status, _, after = _get(base + "/health", 10.0)
                seen.append((before, after, status))
                time.sleep(0.01)
            return seen

        def scrape() -> tuple[int, int, float, float]:
            started = time.monotonic()
            try:
                status, size, done = _get(base + "/metrics", 60.0)
            finally:
                stop.set()
            return status, size, started, done

        with ThreadPoolExecutor(2) as threads:
            loop = asyncio.get_running_loop()
            polled = loop.run_in_executor(threads, poll)
            status, size, started, done = await loop.run_in_executor(threads, scrape)
            samples = await polled
    assert status == 200
    during = [after - before for before, after, code in samples if started < after < done]
    worst = max(during, default=float("nan"))
    print(
        f"\n/metrics: {size / 1e6:.1f} MB in {done - started:.2f} s; "
        f"/health answered {len(during)} times meanwhile, worst {worst * 1000:.0f} ms"
    )
    assert all(code == 200 for _, _, code in samples)
    assert during, "no /health answered while /metrics rendered"
