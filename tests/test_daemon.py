"""The daemon in-process: checks on schedule, exactly one rollback, latch across restart, reload."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from rollbackd import assemble, readings
from rollbackd import daemon as daemon_module
from rollbackd.actions import ActionContext, ActionType
from rollbackd.assemble import Assembly, Registries
from rollbackd.config import RuleConfig
from rollbackd.daemon import Daemon
from rollbackd.demo import prepare
from rollbackd.engine import Phase
from rollbackd.errors import (
    IncidentNotRetryableError,
    MonitorNotLatchedError,
    RollbackdError,
    StateError,
    UnknownIncidentError,
)
from rollbackd.options import Frozen
from rollbackd.readings import Reading
from rollbackd.sources import Arrival, ArrivalListener, SourceType
from tests import helpers
from tests.helpers import (
    config_file,
    daemon_table,
    payment_error_rate,
    route_legacy,
    stop_traffic,
    to_toml,
    wait_until,
)
from tests.scripted import PolledStub


class ScriptedOptions(Frozen):
    """No options: the test sets values through ``SCRIPT``."""


@dataclass
class Script:
    """What the scripted source answers: a value, an error, or nothing."""

    value: float | None = 0.1
    failing: str | None = None
    reads: int = 0
    listeners: list[ArrivalListener] = field(default_factory=list)


SCRIPT = Script()


@dataclass
class ScriptedSource(PolledStub):
    """A poll source whose answer the test controls."""

    async def read(self, rule: RuleConfig, now: float) -> Sequence[Reading]:
        """Answer from the script."""
        SCRIPT.reads += 1
        if SCRIPT.failing is not None:
            return [readings.error(SCRIPT.failing, now)]
        if SCRIPT.value is None:
            return []
        return [readings.ok(SCRIPT.value, now)]


REGISTRIES = Registries()
"""The installed types and this file's test source types."""


def register(kind: str, build: Callable[[str, Any], Any], key: str = "query") -> None:
    """Register a test source type whose rules use ``key``."""
    REGISTRIES.sources.register(kind, SourceType(ScriptedOptions, frozenset({key}), build))


def from_dict(raw: dict[str, Any]) -> Assembly:
    """Assemble a config document with this file's registries."""
    return assemble.from_dict(raw, registries=REGISTRIES)


def load(path: Path) -> Assembly:
    """Load and assemble a config file with this file's registries."""
    return assemble.load(path, registries=REGISTRIES)


register("test.scripted", lambda name, options: ScriptedSource(name))

INTERVAL = 0.05


def config_dict(state_dir: Path, **monitor: Any) -> dict[str, Any]:
    """A config with one scripted monitor whose rollback plan edits files in state_dir."""
    flags = state_dir / "flags.json"
    return {
        "daemon": daemon_table(state_dir, environment="test"),
        "sources": {"script": {"type": "test.scripted"}},
        "monitors": {
            "payments": {
                "interval": f"{int(INTERVAL * 1000)}ms",
                "rollback_after": 3,
                "alert_after": 1,
                "blind_after": 4,
                "on_alert": ["note"],
                "on_rollback": ["stop-traffic", "route-legacy", "note"],
                "rules": [payment_error_rate("script", "x", above=1.0)],
                **monitor,
            }
        },
        "actions": {
            "stop-traffic": stop_traffic(flags),
            "route-legacy": route_legacy(state_dir / "traffic.env"),
            "note": {"type": "alert.log"},
        },
    }


async def running(config: Assembly, body: Callable[[Daemon], Awaitable[None]]) -> None:
    """Serve a daemon with this file's test types, run body against it, stop it."""
    await helpers.running(config, body, REGISTRIES)


@pytest.fixture(autouse=True)
def reset_script() -> None:
    """Each test starts healthy."""
    SCRIPT.value, SCRIPT.failing, SCRIPT.reads = 0.1, None, 0


def plan_done(daemon: Daemon) -> bool:
    """The rollback incident exists and has finished."""
    return any(i.event == "rollback" and i.finished_at for i in daemon.store.incidents())


async def test_a_short_history_bounds_what_an_incident_copies(tmp_path: Path) -> None:
    """``history = 3``: the store trims in batches, yet the record copies exactly 3 checks.

    Quiet checks leave up to ``TRIM_SLACK`` more rows on disk than ``history``; the checks an
    incident copies from before it are the newest 3 (not ``blind_after`` - 1 = 5), and its
    record's recent samples are the newest 3 (not 50).
    """
    prepare(tmp_path)
    raw = config_dict(tmp_path, rollback_after=5, blind_after=6)
    raw["daemon"]["history"] = 3
    config = from_dict(raw)

    async def body(daemon: Daemon) -> None:
        monitor = daemon.monitors["payments"]
        await wait_until(lambda: monitor.state.checks >= 50)  # a few group commits
        SCRIPT.value = 2.5
        await wait_until(lambda: plan_done(daemon))
        (alert,) = [i for i in daemon.store.incidents() if i.event == "alert"]
        before = [c["outcome"] for c in alert.details["checks"]]
        assert before == ["ok", "ok", "ok", "breach"]  # the 3 kept before it, and its own
        (incident,) = [i for i in daemon.store.incidents() if i.event == "rollback"]
        streak = [c["outcome"] for c in incident.details["checks"]]
        assert streak == ["breach"] * 4
        record = json.loads((tmp_path / "incidents" / f"{incident.id}.json").read_text())
        (samples,) = record["recent_samples"].values()
        assert len(samples) == 3

    await running(config, body)


async def test_rollback_after_exactly_n_failing_checks(tmp_path: Path) -> None:
    """Healthy checks do nothing; three breaches in a row run the plan once and latch."""
    prepare(tmp_path)
    config = from_dict(config_dict(tmp_path))

    async def body(daemon: Daemon) -> None:
        monitor = daemon.monitors["payments"]
        await wait_until(lambda: monitor.state.checks >= 4)
        assert monitor.state.phase is Phase.OK
        assert daemon.store.incidents() == []
        SCRIPT.value = 2.5
        await wait_until(lambda: plan_done(daemon))
        assert monitor.state.phase is Phase.ROLLED_BACK
        checks_at_latch = monitor.state.checks
        await wait_until(lambda: monitor.state.checks >= checks_at_latch + 5)
        rollbacks = [i for i in daemon.store.incidents() if i.event == "rollback"]
        assert len(rollbacks) == 1
        (incident,) = rollbacks
        assert [s.status for s in incident.steps] == ["ok", "ok", "ok"]
        assert len(incident.details["checks"]) >= 3
        breaches = [c for c in incident.details["checks"] if c["outcome"] == "breach"]
        assert len(breaches) == 3
        alerts = [i for i in daemon.store.incidents() if i.event == "alert"]
        assert len(alerts) == 1

    await running(config, body)
    flags = json.loads((tmp_path / "flags.json").read_text())
    assert flags["flags"]["boop-payments"]["defaultVariant"] == "off"
    assert "BOOP_TRAFFIC_PERCENT=0" in (tmp_path / "traffic.env").read_text()
    records = list((tmp_path / "incidents").glob("*.json"))
    assert any(json.loads(p.read_text())["event"] == "rollback" for p in records)


async def test_source_outage_never_rolls_back(tmp_path: Path) -> None:
    """A failing source is inconclusive for as long as it lasts: blind alert, no rollback."""
    prepare(tmp_path)
    config = from_dict(config_dict(tmp_path))
    SCRIPT.failing = "connection refused"

    async def body(daemon: Daemon) -> None:
        monitor = daemon.monitors["payments"]
        await wait_until(lambda: monitor.state.checks >= 12)
        assert monitor.state.phase is Phase.BLIND
        assert monitor.state.consecutive_failures == 0
        events = [i.event for i in daemon.store.incidents()]
        assert events == ["blind"]
        SCRIPT.failing = None
        await wait_until(lambda: monitor.state.phase is Phase.OK)

    await running(config, body)
    assert "BOOP_TRAFFIC_PERCENT=5" in (tmp_path / "traffic.env").read_text()


async def test_restart_keeps_latch_and_does_not_roll_back_again(tmp_path: Path) -> None:
    """A restarted daemon restores the latch and never runs a second plan for the incident."""
    prepare(tmp_path)
    config = from_dict(config_dict(tmp_path))
    SCRIPT.value = 5.0

    async def first(daemon: Daemon) -> None:
        await wait_until(lambda: plan_done(daemon))

    await running(config, first)

    async def second(daemon: Daemon) -> None:
        monitor = daemon.monitors["payments"]
        assert monitor.state.phase is Phase.ROLLED_BACK
        before = monitor.state.checks
        await wait_until(lambda: monitor.state.checks >= before + 5)
        assert len([i for i in daemon.store.incidents() if i.event == "rollback"]) == 1

    await running(config, second)


async def test_rearm_clears_latch_and_next_streak_rolls_back_again(tmp_path: Path) -> None:
    """After an operator re-arms, the monitor counts from zero and can roll back again."""
    prepare(tmp_path)
    config = from_dict(config_dict(tmp_path))
    SCRIPT.value = 5.0

    async def body(daemon: Daemon) -> None:
        await wait_until(lambda: plan_done(daemon))
        SCRIPT.value = 0.1
        result = await daemon.rearm("payments")
        assert result["state"] == "ok"
        monitor = daemon.monitors["payments"]
        await wait_until(lambda: monitor.state.checks >= 3 and monitor.state.phase is Phase.OK)
        SCRIPT.value = 5.0
        await wait_until(
            lambda: len([i for i in daemon.store.incidents() if i.event == "rollback"]) == 2
        )
        assert any(i.event == "rearm" for i in daemon.store.incidents())

    await running(config, body)


class PagerOptions(Frozen):
    """acme.pager takes no options."""


PAGED: list[tuple[str, str]] = []
"""(event, incident) of every page the third-party pager sent."""


@dataclass
class AcmePager:
    """A third-party alert type: it pages, and its registration says it resolves."""

    name: str
    options: PagerOptions

    async def run(self, ctx: ActionContext) -> str:
        """Record the page."""
        PAGED.append((str(ctx.incident.event), ctx.incident.id))
        return "paged"

    async def aclose(self) -> None:
        """Nothing to close."""


REGISTRIES.actions.register("acme.pager", ActionType(PagerOptions, AcmePager, resolves=True))


async def test_third_party_alert_that_resolves_hears_the_rearm(tmp_path: Path) -> None:
    """A rollback step of a third-party type declaring ``resolves`` is told of the re-arm."""
    prepare(tmp_path)
    raw = config_dict(tmp_path, on_alert=[], on_rollback=["stop-traffic", "pager"])
    raw["actions"]["pager"] = {"type": "acme.pager"}
    PAGED.clear()
    SCRIPT.value = 5.0

    async def body(daemon: Daemon) -> None:
        await wait_until(lambda: plan_done(daemon))
        SCRIPT.value = 0.1
        await daemon.rearm("payments")
        await wait_until(lambda: len(PAGED) == 2)
        (rollback,) = [i for i in daemon.store.incidents() if i.event == "rollback"]
        (rearm,) = [i for i in daemon.store.incidents() if i.event == "rearm"]
        assert [s.action for s in rearm.steps] == ["pager"], "flag steps never run again"
        assert [("rollback", rollback.id), ("rearm", rearm.id)] == PAGED
        assert rearm.details["resolves"] == rollback.id

    await running(from_dict(raw), body)


async def test_dry_run_records_but_touches_nothing(tmp_path: Path) -> None:
    """In dry-run the plan is recorded as would_run and no file changes."""
    prepare(tmp_path)
    raw = config_dict(tmp_path)
    raw["daemon"]["mode"] = "dry-run"
    config = from_dict(raw)
    SCRIPT.value = 5.0

    async def body(daemon: Daemon) -> None:
        await wait_until(lambda: plan_done(daemon))
        (incident,) = [i for i in daemon.store.incidents() if i.event == "rollback"]
        assert {s.status for s in incident.steps} == {"would_run"}

    await running(config, body)
    assert "BOOP_TRAFFIC_PERCENT=5" in (tmp_path / "traffic.env").read_text()
    assert (
        json.loads((tmp_path / "flags.json").read_text())["flags"]["boop-payments"][
            "defaultVariant"
        ]
        == "on"
    )


async def test_reload_keeps_counters_and_rejects_bad_config(tmp_path: Path) -> None:
    """Reload keeps the failure counter; a broken file is refused and the old config runs."""
    prepare(tmp_path)
    raw = config_dict(tmp_path, rollback_after=1000, interval="1s")
    path = config_file(tmp_path, raw)
    config = load(path)
    SCRIPT.value = 5.0

    async def body(daemon: Daemon) -> None:
        monitor = daemon.monitors["payments"]
        await wait_until(lambda: monitor.state.consecutive_failures >= 1)
        before = daemon.monitors["payments"].state.consecutive_failures
        path.write_text(to_toml(raw).replace('interval = "1s"', 'interval = "50ms"'))
        assert await daemon.reload()
        assert daemon.monitors["payments"].config.interval == 0.05
        assert daemon.monitors["payments"].state.consecutive_failures >= before
        path.write_text("this is not toml = [")
        assert not await daemon.reload()
        assert daemon.monitors["payments"].config.interval == 0.05
        failures = daemon.monitors["payments"].state.consecutive_failures
        await wait_until(lambda: daemon.monitors["payments"].state.consecutive_failures > failures)

    daemon_config = config
    await running(daemon_config, body_with_path(body, path))


def body_with_path(
    body: Callable[[Daemon], Awaitable[None]], path: Path
) -> Callable[[Daemon], Awaitable[None]]:
    """Give the daemon its config path (reload reads it) before running body."""

    async def run(daemon: Daemon) -> None:
        daemon.config_path = path
        await body(daemon)

    return run


async def test_second_daemon_on_same_state_dir_is_refused(tmp_path: Path) -> None:
    """Two daemons never share a state directory: the second fails with a clear error."""
    prepare(tmp_path)
    config = from_dict(config_dict(tmp_path))

    async def body(daemon: Daemon) -> None:
        with pytest.raises(StateError, match="in use by another rollbackd"):
            await Daemon(config, registry=CollectorRegistry(), registries=REGISTRIES).serve()

    await running(config, body)


async def test_failed_rollback_step_is_alerted_and_later_steps_run(tmp_path: Path) -> None:
    """A failing step does not stop the plan, and the monitor's alert actions hear about it."""
    prepare(tmp_path)
    raw = config_dict(tmp_path)
    raw["actions"]["route-legacy"]["path"] = str(tmp_path / "missing-dir" / "traffic.env")
    raw["actions"]["route-legacy"]["retries"] = 1
    config = from_dict(raw)
    SCRIPT.value = 5.0

    async def body(daemon: Daemon) -> None:
        await wait_until(lambda: plan_done(daemon))
        (rollback,) = [i for i in daemon.store.incidents() if i.event == "rollback"]
        assert [s.status for s in rollback.steps] == ["ok", "failed", "ok"]
        assert rollback.steps[1].attempts == 2
        await wait_until(lambda: any("incomplete" in i.reason for i in daemon.store.incidents()))
        (notice,) = [i for i in daemon.store.incidents() if "incomplete" in i.reason]
        assert notice.event == "alert"
        assert "route-legacy" in notice.reason

    await running(config, body)


@dataclass
class PushedSource(ScriptedSource):
    """A push source: the test publishes values and the listeners hear of them."""

    push: bool = True
    monitors: list[str] = field(default_factory=list)

    def watch(self, monitor: str, rule: RuleConfig) -> None:
        """Remember which monitors read this source."""
        self.monitors.append(monitor)

    def add_listener(self, listener: ArrivalListener) -> None:
        """Keep the listener for publish()."""
        SCRIPT.listeners.append(listener)

    async def read(self, rule: RuleConfig, now: float) -> Sequence[Reading]:
        """The latest value, or stale once the test says so."""
        if SCRIPT.failing is not None:
            return [readings.no_data(SCRIPT.failing, now)]
        return await super().read(rule, now)


register("test.pushed", lambda name, options: PushedSource(name), key="topic")

PUSHED_RULE = "payment-error-rate"
"""The rule of ``push_config``'s monitor that the pushed values answer."""


def publish(value: float) -> None:
    """A new sample arrives on the push source (carrying its value, as MQTT's do)."""
    SCRIPT.value = value
    arrival = Arrival(
        "payments", "bus", "boop/payments/error_rate", {PUSHED_RULE: readings.ok(value, 0.0)}
    )
    for listener in SCRIPT.listeners:
        listener(arrival)


def push_config(tmp_path: Path, interval: str) -> Assembly:
    """The scripted monitor, reading a push source instead."""
    raw = config_dict(tmp_path, interval=interval)
    raw["sources"] = {"bus": {"type": "test.pushed"}}
    rule = raw["monitors"]["payments"]["rules"][0]
    del rule["query"]
    rule.update(source="bus", topic="boop/payments/error_rate")
    return from_dict(raw)


async def test_push_monitor_counts_each_arrival_not_the_interval(tmp_path: Path) -> None:
    """Three breaching samples are three failing checks, long before one interval passes."""
    prepare(tmp_path)
    SCRIPT.listeners.clear()
    config = push_config(tmp_path, "1h")

    async def body(daemon: Daemon) -> None:
        monitor = daemon.monitors["payments"]
        assert monitor.push
        before = monitor.state.checks  # ticks over fresh values add no checks
        for expected in (1, 2):
            publish(5.0)
            await wait_until(lambda: monitor.state.consecutive_failures == expected)  # noqa: B023
        publish(5.0)
        await wait_until(lambda: plan_done(daemon))
        assert monitor.state.checks == before + 3

    await running(config, body)


async def test_push_monitor_tick_judges_only_stale_values(tmp_path: Path) -> None:
    """An interval tick with fresh values adds no check; a stale value makes it inconclusive."""
    prepare(tmp_path)
    SCRIPT.listeners.clear()
    config = push_config(tmp_path, "100ms")

    async def body(daemon: Daemon) -> None:
        monitor = daemon.monitors["payments"]
        publish(5.0)
        await wait_until(lambda: monitor.state.consecutive_failures == 1)
        checks = monitor.state.checks
        await asyncio.sleep(0.5)  # five ticks over fresh values: not a synchronisation
        assert monitor.state.checks == checks
        SCRIPT.failing = "stale: last value 61s ago"
        await wait_until(lambda: monitor.state.consecutive_errors >= 2)
        assert monitor.state.consecutive_failures == 1
        assert monitor.last_check is not None
        assert str(monitor.last_check.outcome) == "inconclusive"

    await running(config, body)


async def test_stop_interrupts_a_long_step_which_resumes_at_next_start(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SIGTERM mid-step: checks stop first, the step gets the grace period, then resumes later."""
    monkeypatch.setattr(daemon_module, "STOP_GRACE_SECONDS", 0.5)
    prepare(tmp_path)
    marker, delay = tmp_path / "marker", tmp_path / "delay"
    delay.write_text("30")
    raw = config_dict(tmp_path)
    raw["actions"]["slow"] = {
        "type": "exec",
        "argv": ["/bin/sh", "-c", f"echo run >> {marker}; sleep $(cat {delay})"],
        "timeout": "60s",
        "retries": 3,
    }
    raw["monitors"]["payments"]["on_rollback"] = ["slow", "route-legacy"]
    config = from_dict(raw)
    SCRIPT.value = 5.0

    async def first(daemon: Daemon) -> None:
        await wait_until(marker.exists)
        daemon.stop()
        checks = daemon.monitors["payments"].state.checks
        await asyncio.sleep(0.3)  # within the grace period: not a synchronisation
        assert daemon.monitors["payments"].state.checks == checks

    await running(config, first)
    assert "BOOP_TRAFFIC_PERCENT=5" in (tmp_path / "traffic.env").read_text()
    delay.write_text("0")

    async def second(daemon: Daemon) -> None:
        await wait_until(lambda: plan_done(daemon))
        (incident,) = [i for i in daemon.store.incidents() if i.event == "rollback"]
        assert [s.status for s in incident.steps] == ["ok", "ok"]
        assert incident.steps[0].attempts == 2

    await running(config, second)
    assert marker.read_text().splitlines() == ["run", "run"]  # the interrupted step, again
    assert "BOOP_TRAFFIC_PERCENT=0" in (tmp_path / "traffic.env").read_text()


def fragile(name: str, options: object) -> ScriptedSource:
    """A source type that validates but cannot be built (e.g. a client that fails to start)."""
    raise RollbackdError(f"source {name}: cannot build a client")


register("test.fragile", fragile)


async def test_reload_that_cannot_start_keeps_the_old_config(tmp_path: Path) -> None:
    """A new config that validates but fails to start is rolled back to the running one."""
    prepare(tmp_path)
    raw = config_dict(tmp_path)
    path = config_file(tmp_path, raw)
    config = load(path)

    async def body(daemon: Daemon) -> None:
        monitor = daemon.monitors["payments"]
        await wait_until(lambda: monitor.state.checks >= 2)
        raw["sources"]["extra"] = {"type": "test.fragile"}
        path.write_text(to_toml(raw))
        assert not await daemon.reload()
        assert daemon.config.sha256 == config.config.sha256
        runner = daemon.monitors["payments"]
        checks = runner.state.checks
        await wait_until(lambda: runner.state.checks > checks + 2)

    await running(config, body_with_path(body, path))


@dataclass
class ClosableSource(ScriptedSource):
    """A scripted source that reads as an error once closed, like a real client."""

    closed: bool = False

    async def aclose(self) -> None:
        """Close for good."""
        self.closed = True

    async def read(self, rule: RuleConfig, now: float) -> Sequence[Reading]:
        """The script's value while open."""
        if self.closed:
            return [readings.error("source closed", now)]
        return await super().read(rule, now)


register("test.closable", lambda name, options: ClosableSource(name))


async def test_reload_during_a_wait_step_keeps_its_source_open(tmp_path: Path) -> None:
    """A plan step reading a source finishes normally across a reload (old parts close later)."""
    prepare(tmp_path)
    raw = config_dict(tmp_path)
    raw["sources"] = {"script": {"type": "test.closable"}}
    raw["actions"]["drain"] = {
        "type": "wait",
        "source": "script",
        "query": "inflight",
        "poll": "50ms",
        "timeout": "20s",
    }
    raw["monitors"]["payments"]["on_rollback"] = ["drain", "route-legacy"]
    path = config_file(tmp_path, raw)
    SCRIPT.value = 5.0

    async def body(daemon: Daemon) -> None:
        await wait_until(
            lambda: any(
                s.status == "running"
                for i in daemon.store.incidents()
                if i.event == "rollback"
                for s in i.steps
            )
        )
        assert await daemon.reload()
        SCRIPT.value = 0.0
        await wait_until(lambda: plan_done(daemon))
        (incident,) = [i for i in daemon.store.incidents() if i.event == "rollback"]
        assert incident.steps[0].status == "ok"
        assert incident.steps[0].detail.startswith("drained"), incident.steps[0].detail

    await running(load(path), body_with_path(body, path))


async def test_concurrent_rearms_are_one_operation(tmp_path: Path) -> None:
    """Six re-arms at once: one clears the latch and opens one re-arm incident; five are refused."""
    prepare(tmp_path)
    SCRIPT.value = 5.0

    async def body(daemon: Daemon) -> None:
        await wait_until(lambda: plan_done(daemon))
        SCRIPT.value = 0.1
        results = await asyncio.gather(
            *(daemon.rearm("payments") for _ in range(6)), return_exceptions=True
        )
        won = [r for r in results if isinstance(r, dict)]
        refused = [r for r in results if isinstance(r, MonitorNotLatchedError)]
        assert (len(won), len(refused)) == (1, 5), results
        await wait_until(lambda: all(i.finished_at for i in daemon.store.incidents()))
        rearms = [i for i in daemon.store.incidents() if i.event == "rearm"]
        assert len(rearms) == 1
        assert rearms[0].details["resolves"] == won[0]["resolved_incident"]

    await running(from_dict(config_dict(tmp_path)), body)


async def test_retry_reruns_only_the_failed_steps_of_a_finished_plan(tmp_path: Path) -> None:
    """``retry`` re-runs a finished plan's failed step once its cause is fixed; ok steps stay."""
    prepare(tmp_path)
    raw = config_dict(tmp_path, on_alert=[], on_rollback=["route-legacy", "stop-traffic"])
    missing = tmp_path / "not-yet"
    raw["actions"]["stop-traffic"]["path"] = str(missing / "flags.json")
    raw["actions"]["stop-traffic"]["retries"] = 0
    (tmp_path / "traffic.env").write_text("BOOP_TRAFFIC_PERCENT=5\n")
    SCRIPT.value = 5.0

    async def body(daemon: Daemon) -> None:
        await wait_until(lambda: plan_done(daemon))
        (incident,) = [i for i in daemon.store.incidents() if i.event == "rollback"]
        assert [s.status for s in incident.steps] == ["ok", "failed"]
        (alert,) = [i for i in daemon.store.incidents() if i.event == "alert"]  # no steps
        with pytest.raises(IncidentNotRetryableError, match="no step failed"):
            await daemon.retry(alert.id)
        with pytest.raises(UnknownIncidentError):
            await daemon.retry("no-such-incident")
        (tmp_path / "traffic.env").write_text("BOOP_TRAFFIC_PERCENT=7\n")  # not touched again
        missing.mkdir()
        (missing / "flags.json").write_text((tmp_path / "flags.json").read_text())
        assert (await daemon.retry(incident.id))["steps"] == [1]
        await wait_until(lambda: daemon.store.incident(incident.id).finished_at is not None)
        steps = daemon.store.incident(incident.id).steps
        assert [s.status for s in steps] == ["ok", "ok"]
        assert "BOOP_TRAFFIC_PERCENT=7" in (tmp_path / "traffic.env").read_text()
        assert '"defaultVariant": "off"' in (missing / "flags.json").read_text()

    await running(from_dict(raw), body)


@dataclass
class BrokenSource(ScriptedSource):
    """A third-party source with a bug: its ``read`` raises for the query ``boom``."""

    async def read(self, rule: RuleConfig, now: float) -> Sequence[Reading]:
        """Raise for ``boom``; answer the script otherwise."""
        if rule.query == "boom":
            raise ValueError("metric is not an object")
        return await super().read(rule, now)


register("test.broken", lambda name, options: BrokenSource(name))


async def test_a_crashing_rule_does_not_stop_the_other_from_rolling_back(tmp_path: Path) -> None:
    """One rule whose source raises is inconclusive with the reason; the breaching one counts."""
    prepare(tmp_path)
    raw = config_dict(tmp_path)
    raw["sources"]["script"]["type"] = "test.broken"
    rules = raw["monitors"]["payments"]["rules"]
    rules.append({**rules[0], "name": "odd", "query": "boom"})
    SCRIPT.value = 5.0

    async def body(daemon: Daemon) -> None:
        await wait_until(lambda: plan_done(daemon))
        assert daemon.monitors["payments"].state.consecutive_failures == 3
        [odd] = daemon.status()["monitors"]["payments"]["rules"]["odd"]
        assert odd["verdict"] == "error"
        assert "reading failed: ValueError: metric is not an object" in odd["reason"]

    await running(from_dict(raw), body)


async def test_a_monitor_whose_checks_keep_crashing_goes_blind_and_alerts(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Checks that crash are recorded as inconclusive: blind after blind_after, an alert, 503."""
    prepare(tmp_path)

    def bug(*_: object) -> None:
        raise RuntimeError("a bug in deciding")

    async def body(daemon: Daemon) -> None:
        monkeypatch.setattr("rollbackd.monitor.engine.decide", bug)
        monitor = daemon.monitors["payments"]
        await wait_until(lambda: monitor.state.phase is Phase.BLIND)
        (blind,) = [i for i in daemon.store.incidents() if i.event == "blind"]
        assert "check failed to run: RuntimeError: a bug in deciding" in blind.reason
        assert [s.action for s in blind.steps] == ["note"]
        healthy, why = daemon.health()
        assert not healthy
        assert "checks in a row failed" in why

    await running(from_dict(config_dict(tmp_path)), body)


async def test_a_burst_of_pushed_values_is_one_check_each_in_order(tmp_path: Path) -> None:
    """Values pushed faster than checks run are judged one by one, each on its own value."""
    prepare(tmp_path)
    SCRIPT.listeners.clear()
    config = push_config(tmp_path, "1h")
    burst = [0.2, 5.0, 5.1, 0.3, 5.2, 5.3, 5.4, 0.4]  # only 5.2-5.4 is a streak of three

    async def body(daemon: Daemon) -> None:
        monitor = daemon.monitors["payments"]
        before = monitor.state.checks  # ticks over fresh values add no checks
        for value in burst:  # no await in between: all queued while the first check runs
            publish(value)
        await wait_until(lambda: monitor.state.checks == before + len(burst), what="8 checks")
        judged = [c.results[0].value for c in daemon.store.recent_checks("payments", len(burst))]
        assert judged == burst
        await wait_until(lambda: plan_done(daemon))
        (rollback,) = [i for i in daemon.store.incidents() if i.event == "rollback"]
        assert rollback.details["trigger"]["results"][0]["value"] == 5.4

    await running(config, body)


async def test_stop_judges_the_arrivals_already_queued(tmp_path: Path) -> None:
    """Values that arrived before a stop are still checks: the schedule drains its queue."""
    prepare(tmp_path)
    SCRIPT.listeners.clear()
    config = push_config(tmp_path, "1h")
    daemon = Daemon(config, registry=CollectorRegistry(), registries=REGISTRIES)
    serving = asyncio.create_task(daemon.serve())
    await asyncio.wait_for(daemon.ready.wait(), 10)
    monitor = daemon.monitors["payments"]
    before = monitor.state.checks  # ticks over fresh values add no checks
    for value in (0.2, 0.3, 0.4):
        publish(value)
    daemon.stop()
    assert await asyncio.wait_for(serving, 30) == 0
    assert monitor.state.checks == before + 3
