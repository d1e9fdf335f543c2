"""Decisions at the 5 % stage, against a real Prometheus scraping an exporter the test drives.

The volume guard, shadow rules and dependency holds (``held_by``).

The figures are gauges the test sets (an error rate in %, the requests behind it over the
rule's window), so each scenario is exact and needs no minutes of counter history.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from rollbackd import assemble
from rollbackd.daemon import Daemon
from rollbackd.engine import Event, Phase
from tests import helpers
from tests.helpers import wait_until
from tests.servers import Exporter, Prometheus

pytestmark = pytest.mark.slow

_names = itertools.count()


def metric(exporter: Exporter, what: str, value: float) -> str:
    """A gauge of this test's own (the Prometheus is shared), set to ``value``; its name."""
    name = f"guard_{what}_{next(_names)}"
    exporter.gauge(name).set(value)
    return name


def config(tmp_path: Path, url: str, monitors: dict[str, Any]) -> dict[str, Any]:
    """An armed config reading ``url``; every plan writes a line to a file (seen once each)."""
    return {
        "daemon": {"mode": "armed", "environment": "test", "state_dir": str(tmp_path / "state"),
                   "listen": ""},
        "sources": {"prom": {"type": "prometheus", "url": url}},
        "monitors": monitors,
        "actions": {
            "route": {"type": "route.file", "path": str(tmp_path / "traffic.env"),
                      "key": "BOOP_TRAFFIC_PERCENT", "value": "0"},
            "note": {"type": "alert.log"},
        },
    }  # fmt: skip


def monitor(*rules: dict[str, Any], **keys: Any) -> dict[str, Any]:
    """A monitor checked every 200 ms, rolling back after 3 failing checks."""
    return {
        "interval": "200ms",
        "rollback_after": 3,
        "blind_after": 3,
        "on_alert": ["note"],
        "on_rollback": ["route", "note"],
        "rules": list(rules),
        **keys,
    }


def rule(name: str, query: str, above: float, **keys: Any) -> dict[str, Any]:
    """A rule breaching above ``above`` (in %)."""
    return {"name": name, "source": "prom", "query": query, "above": above, "unit": "%", **keys}


async def running(raw: dict[str, Any], body: Callable[[Daemon], Awaitable[None]]) -> None:
    """Serve a daemon on ``raw``, run body against it, stop it."""
    await helpers.running(assemble.from_dict(raw), body)


def events(daemon: Daemon, monitor: str) -> list[str]:
    """The events of the monitor's incidents, oldest first."""
    return [str(i.event) for i in reversed(daemon.store.incidents(monitor, limit=100))]


async def scraped(prometheus: Prometheus, *names: str) -> None:
    """Wait until Prometheus has scraped every named gauge."""
    from rollbackd.config import RuleConfig  # noqa: PLC0415
    from rollbackd.sources.prometheus import PrometheusOptions, PrometheusSource  # noqa: PLC0415

    source = PrometheusSource("probe", PrometheusOptions(url=prometheus.url))
    await source.start()
    try:
        for name in names:
            probe = RuleConfig(name="probe", source="probe", query=name, above=0.0)

            async def seen(probe: RuleConfig = probe) -> bool:
                readings = await source.read(probe, 0.0)
                return bool(readings) and readings[0].value is not None

            for _ in range(100):
                if await seen():
                    break
                await asyncio.sleep(0.1)
    finally:
        await source.aclose()


async def test_three_requests_a_minute_never_roll_back_and_go_blind(
    tmp_path: Path, prometheus: Prometheus, exporter: Exporter
) -> None:
    """1 failure in 3 requests is 33 %: insufficient volume, inconclusive, then blind."""
    rate = metric(exporter, "auth_error_rate", 33.3)
    volume = metric(exporter, "auth_requests", 3.0)
    await scraped(prometheus, rate, volume)
    guarded = rule("auth-error-rate", rate, 1.0, volume=volume, min_volume=100)
    raw = config(tmp_path, prometheus.url, {"auth": monitor(guarded)})

    async def body(daemon: Daemon) -> None:
        runner = daemon.monitors["auth"]
        await wait_until(lambda: runner.state.phase is Phase.BLIND, what="blind")
        assert events(daemon, "auth") == ["blind"]
        (blind,) = daemon.store.incidents("auth")
        assert "insufficient volume: 3.0 events, min_volume 100.0" in blind.reason
        assert runner.state.consecutive_failures == 0
        [series] = daemon.status()["monitors"]["auth"]["rules"]["auth-error-rate"]
        assert series["verdict"] == "insufficient"
        assert not (tmp_path / "traffic.env").exists()

    await running(raw, body)


async def test_six_hundred_a_minute_at_two_percent_rolls_back_after_exactly_n(
    tmp_path: Path, prometheus: Prometheus, exporter: Exporter
) -> None:
    """With enough volume the same guard judges: 2 % errors over 600 requests roll back at 3."""
    rate = metric(exporter, "pay_error_rate", 2.0)
    volume = metric(exporter, "pay_requests", 600.0)
    await scraped(prometheus, rate, volume)
    guarded = rule("payment-error-rate", rate, 1.0, volume=volume, min_volume=100)
    raw = config(tmp_path, prometheus.url, {"payments": monitor(guarded)})

    async def body(daemon: Daemon) -> None:
        runner = daemon.monitors["payments"]
        await wait_until(lambda: runner.state.phase is Phase.ROLLED_BACK, what="rollback")
        assert (runner.state.consecutive_failures, runner.state.checks) == (3, 3)
        assert events(daemon, "payments") == ["rollback"]

    await running(raw, body)


async def test_a_shadow_rule_never_acts_and_a_real_one_still_does(
    tmp_path: Path, prometheus: Prometheus, exporter: Exporter
) -> None:
    """A shadow rule breaching for 3 x rollback_after checks: one shadow incident, no plan step.

    A real rule's breach then rolls back once.
    """
    shadowed = metric(exporter, "new_rule", 9.0)
    real = metric(exporter, "old_rule", 0.1)
    await scraped(prometheus, shadowed, real)
    raw = config(
        tmp_path,
        prometheus.url,
        {"payments": monitor(rule("old", real, 1.0), rule("new", shadowed, 1.0, shadow=True))},
    )

    async def body(daemon: Daemon) -> None:
        runner = daemon.monitors["payments"]
        await wait_until(lambda: runner.state.shadow_failures >= 9, what="9 shadow failures")
        assert events(daemon, "payments") == ["shadow"]
        (shadow,) = daemon.store.incidents("payments")
        assert [s.action for s in shadow.steps] == ["note"], "alerts only: no rollback step"
        assert runner.state.consecutive_failures == 0
        assert runner.state.phase is Phase.OK
        assert not (tmp_path / "traffic.env").exists()
        status = daemon.status()["monitors"]["payments"]
        assert (status["shadow_rules"], status["consecutive_failures"]) == (["new"], 0)
        exporter.gauge(real).set(5.0)
        await wait_until(lambda: runner.state.phase is Phase.ROLLED_BACK, what="real rollback")
        await asyncio.sleep(0.5)
        assert events(daemon, "payments") == ["shadow", "rollback"]

    await running(raw, body)


async def test_infrastructure_failing_holds_the_payments_rollback(
    tmp_path: Path, prometheus: Prometheus, exporter: Exporter
) -> None:
    """Payments breaching while infrastructure fails: held (one alert), rolled back after.

    The rollback runs once infrastructure recovers.
    """
    infra = metric(exporter, "connection_failures", 50.0)
    pay = metric(exporter, "payment_error_rate", 5.0)
    await scraped(prometheus, infra, pay)
    raw = config(
        tmp_path,
        prometheus.url,
        {
            "infrastructure": monitor(rule("connection-failures", infra, 5.0), rollback_after=1000),
            "payments": monitor(rule("payment-error-rate", pay, 1.0), held_by=["infrastructure"]),
        },
    )

    async def body(daemon: Daemon) -> None:
        payments = daemon.monitors["payments"]
        await wait_until(lambda: payments.state.consecutive_failures >= 6, what="6 failures")
        assert payments.state.phase is Phase.FAILING
        assert events(daemon, "payments") == ["alert"]
        (held,) = daemon.store.incidents("payments")
        assert "rollback held by infrastructure (failing)" in held.reason
        assert daemon.status()["monitors"]["payments"]["held"] == "infrastructure (failing)"
        exporter.gauge(infra).set(0.0)
        await wait_until(lambda: payments.state.phase is Phase.ROLLED_BACK, what="rollback")
        await asyncio.sleep(0.5)
        assert events(daemon, "payments") == ["alert", "rollback"]
        assert [i.event for i in daemon.store.incidents("payments")].count(Event.ROLLBACK) == 1

    await running(raw, body)
