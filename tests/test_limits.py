"""Rate limits: max_rollbacks makes plans wait for approval, rearm_cooldown delays them."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry
from structlog.testing import capture_logs

from rollbackd import cli, limits
from rollbackd.actions import ActionContext, ActionType
from rollbackd.config import DaemonConfig
from rollbackd.daemon import Daemon
from rollbackd.engine import Event
from rollbackd.errors import IncidentNotWaitingError, UnknownIncidentError
from rollbackd.options import Frozen
from rollbackd.records import IncidentDraft, IncidentRecord
from rollbackd.state import Store
from rollbackd.waitlog import WaitLog
from tests.helpers import daemon_table, payment_error_rate, wait_until
from tests.test_config import MINIMAL, load, problems_of, write
from tests.test_daemon import REGISTRIES, SCRIPT, from_dict, running
from tests.test_rollouts_daemon import VALUES as GATES
from tests.test_rollouts_daemon import config as rollouts_config
from tests.test_rollouts_daemon import rollout, route_percent
from tests.test_rollouts_daemon import serve as serve_rollouts


class EffectOptions(Frozen):
    """test.effect takes no options."""


EFFECTS: list[tuple[str, str, str, str]] = []
"""(event, monitor, incident, reason) of every step of a ``test.effect`` action that ran."""


@dataclass
class Effect:
    """An action whose every run the test can count."""

    name: str
    options: EffectOptions

    async def run(self, ctx: ActionContext) -> str:
        """Record the run."""
        incident = ctx.incident
        EFFECTS.append((str(incident.event), incident.monitor, incident.id, incident.reason))
        return "done"

    async def aclose(self) -> None:
        """Nothing to close."""


REGISTRIES.actions.register("test.effect", ActionType(EffectOptions, Effect))


@pytest.fixture(autouse=True)
def fresh() -> Iterator[None]:
    """Each test starts with a breaching source and no effects."""
    SCRIPT.value, SCRIPT.failing, SCRIPT.reads = 5.0, None, 0
    EFFECTS.clear()
    yield
    SCRIPT.value = 0.1


def config(state_dir: Path, monitors: int = 1, **daemon: Any) -> dict[str, Any]:
    """``monitors`` scripted monitors rolling back after 2 breaches; page on alerts."""
    return {
        "daemon": {**daemon_table(state_dir, environment="test"), **daemon},
        "sources": {"script": {"type": "test.scripted"}},
        "monitors": {
            f"m{i}": {
                "interval": "50ms",
                "rollback_after": 2,
                "on_alert": ["page"],
                "on_rollback": ["act"],
                "rules": [payment_error_rate("script", "x", above=1.0)],
            }
            for i in range(monitors)
        },
        "actions": {"act": {"type": "test.effect"}, "page": {"type": "test.effect"}},
    }


def rollbacks(daemon: Daemon) -> list[IncidentRecord]:
    """The rollback incidents, oldest first."""
    found = [i for i in daemon.store.incidents(limit=100) if i.event is Event.ROLLBACK]
    return sorted(found, key=lambda i: i.opened_at)


def ran(incident: str) -> int:
    """How many times the rollback step of ``incident`` ran."""
    return sum(1 for event, _, inc, _ in EFFECTS if event == "rollback" and inc == incident)


def waiting_gauge(daemon: Daemon, reason: str) -> float | None:
    """``rollbackd_plans_waiting{reason}``."""
    return daemon.registry.get_sample_value("rollbackd_plans_waiting", {"reason": reason})


FIVE = {"max_rollbacks": {"count": 3, "per": "1h"}}


async def test_five_breaches_under_three_per_hour_run_three_and_hold_two(tmp_path: Path) -> None:
    """5 monitors breach within a minute: 3 plans run, 2 wait, alerted, shown; approve runs one."""

    async def body(daemon: Daemon) -> None:
        await wait_until(lambda: len(rollbacks(daemon)) == 5, what="five rollback incidents")
        await wait_until(lambda: sum(1 for i in rollbacks(daemon) if i.finished_at) == 3)
        held = [i for i in rollbacks(daemon) if i.waiting]
        assert [i.waiting for i in held] == ["approval", "approval"]
        assert all(i.finished_at is None and i.steps[0].attempts == 0 for i in held)
        assert held[0].details["wait"]["reason"] == "max_rollbacks 3 per 1h reached"
        await wait_until(lambda: sum(1 for e in EFFECTS if e[0] == "alert") == 2, what="alerts")
        alerts = sorted(e[3] for e in EFFECTS if e[0] == "alert")
        assert alerts == sorted(
            f"rollback {i.id} waits for approval: max_rollbacks 3 per 1h reached; "
            f"rollbackd approve {i.id} runs it"
            for i in held
        )
        shown = daemon.status()
        assert {w["id"] for w in shown["waiting"]} == {i.id for i in held}
        assert shown["limits"]["max_rollbacks"] == {
            "count": 3,
            "per_seconds": 3600.0,
            "released": 3,
        }
        assert {i["id"]: i["waiting"] for i in shown["incidents"] if i["waiting"]} == {
            i.id: "approval" for i in held
        }
        assert waiting_gauge(daemon, "approval") == 2
        assert sorted(e[2] for e in EFFECTS if e[0] == "rollback") == sorted(
            i.id for i in rollbacks(daemon) if not i.waiting
        )

        first, second = held
        assert await daemon.approve(first.id) == {
            "incident": first.id,
            "waited": "approval",
            "plan": "started",
        }
        await wait_until(lambda: daemon.store.incident(first.id).finished_at is not None)
        assert ran(first.id) == 1
        assert daemon.store.incident(first.id).approved_at is not None
        with pytest.raises(IncidentNotWaitingError, match="not waiting for approval"):
            await daemon.approve(first.id)
        with pytest.raises(UnknownIncidentError):
            await daemon.approve("no-such-incident")
        assert waiting_gauge(daemon, "approval") == 1

        results = await asyncio.gather(
            *(daemon.approve(second.id) for _ in range(5)), return_exceptions=True
        )
        won = [r for r in results if isinstance(r, dict)]
        refused = [r for r in results if isinstance(r, IncidentNotWaitingError)]
        assert (len(won), len(refused)) == (1, 4), results
        await wait_until(lambda: daemon.store.incident(second.id).finished_at is not None)
        await asyncio.sleep(0.2)  # a second start would run now: not a synchronisation
        assert ran(second.id) == 1
        assert len([e for e in EFFECTS if e[0] == "rollback"]) == 5
        assert waiting_gauge(daemon, "approval") == 0
        assert daemon.status()["waiting"] == []

    with capture_logs() as logs:
        await running(from_dict(config(tmp_path, 5, **FIVE)), body)
    waits = [e for e in logs if e["event"] == "rollback_waiting_approval"]
    assert len(waits) == 2
    assert all(e["reason"] == "max_rollbacks 3 per 1h reached" for e in waits)
    records = [json.loads(p.read_text()) for p in (tmp_path / "incidents").glob("*.json")]
    approved = [r for r in records if r["event"] == "rollback" and r["approved_at"]]
    assert len(approved) == 2
    assert all(r["details"]["wait"]["for"] == "approval" and r["waiting"] is None for r in approved)


async def test_a_waiting_plan_survives_a_restart_and_runs_only_when_approved(
    tmp_path: Path,
) -> None:
    """Stopped and started again, waiting plans still wait (not resumed) until approved."""
    raw = config(tmp_path, 5, **FIVE)

    async def first(daemon: Daemon) -> None:
        await wait_until(lambda: len(rollbacks(daemon)) == 5)
        await wait_until(lambda: sum(1 for i in rollbacks(daemon) if i.finished_at) == 3)

    await running(from_dict(raw), first)
    before = list(EFFECTS)

    async def second(daemon: Daemon) -> None:
        held = [i for i in rollbacks(daemon) if i.waiting]
        assert len(held) == 2
        assert waiting_gauge(daemon, "approval") == 2
        checks = daemon.monitors["m0"].state.checks
        await wait_until(lambda: daemon.monitors["m0"].state.checks >= checks + 5)
        assert [e for e in EFFECTS if e[0] == "rollback"] == [
            e for e in before if e[0] == "rollback"
        ]
        assert all(daemon.store.incident(i.id).waiting == "approval" for i in held)
        await daemon.approve(held[0].id)
        await wait_until(lambda: daemon.store.incident(held[0].id).finished_at is not None)
        assert ran(held[0].id) == 1
        assert ran(held[1].id) == 0

    with capture_logs() as logs:
        await running(from_dict(raw), second)
    assert not any(e["event"] == "plan_resuming" for e in logs)
    assert len([e for e in logs if e["event"] == "rollback_waiting_approval"]) == 2


COOLDOWN = {"rearm_cooldown": "1s"}


async def rolled_back_and_rearmed(daemon: Daemon) -> float:
    """The first rollback runs; the monitor is re-armed while still breaching; the re-arm time."""
    await wait_until(lambda: rollbacks(daemon) and rollbacks(daemon)[0].finished_at)
    rearmed = time.time()
    await daemon.rearm("m0")
    return rearmed


async def test_a_rollback_right_after_a_rearm_waits_for_the_cooldown(tmp_path: Path) -> None:
    """Re-armed and breaching at once: the new rollback waits, then runs once when it ends."""

    async def body(daemon: Daemon) -> None:
        rearmed = await rolled_back_and_rearmed(daemon)
        await wait_until(lambda: len(rollbacks(daemon)) == 2, what="a second rollback")
        second = rollbacks(daemon)[1]
        assert second.waiting == "cooldown"
        assert second.details["wait"]["until"] == pytest.approx(rearmed + 1.0, abs=0.5)
        assert ran(second.id) == 0
        assert waiting_gauge(daemon, "cooldown") == 1
        (shown,) = daemon.status()["waiting"]
        assert shown["waiting"] == "cooldown"
        await wait_until(lambda: daemon.store.incident(second.id).finished_at is not None)
        done = daemon.store.incident(second.id)
        started = done.steps[0].started_at
        assert started is not None
        assert started >= second.details["wait"]["until"]
        assert done.waiting is None
        assert done.approved_at is None
        await asyncio.sleep(0.2)  # a second start would run now: not a synchronisation
        assert ran(second.id) == 1
        assert waiting_gauge(daemon, "cooldown") == 0
        alerts = [e[3] for e in EFFECTS if e[0] == "alert"]
        assert any(f"rollback {second.id} waits for the re-arm cooldown" in a for a in alerts)

    await running(from_dict(config(tmp_path, **COOLDOWN)), body)


async def test_approving_a_cooldown_runs_it_at_once_and_only_once(tmp_path: Path) -> None:
    """An approval during the cooldown runs the plan now; the cooldown's end adds nothing."""

    async def body(daemon: Daemon) -> None:
        await rolled_back_and_rearmed(daemon)
        await wait_until(lambda: len(rollbacks(daemon)) == 2)
        second = rollbacks(daemon)[1]
        assert (await daemon.approve(second.id))["waited"] == "cooldown"
        await wait_until(lambda: daemon.store.incident(second.id).finished_at is not None)
        until = second.details["wait"]["until"]
        await wait_until(lambda: time.time() > until + 0.3, what="the cooldown's end")
        assert ran(second.id) == 1

    await running(from_dict(config(tmp_path, **COOLDOWN)), body)


async def test_a_cooldown_that_ended_while_stopped_runs_at_start(tmp_path: Path) -> None:
    """A plan waiting for a cooldown when the daemon stops runs at once at the next start."""
    raw = config(tmp_path, **COOLDOWN)
    held: list[IncidentRecord] = []

    async def first(daemon: Daemon) -> None:
        await rolled_back_and_rearmed(daemon)
        await wait_until(lambda: len(rollbacks(daemon)) == 2)
        held.append(rollbacks(daemon)[1])

    await running(from_dict(raw), first)
    (second,) = held
    assert ran(second.id) == 0
    until = second.details["wait"]["until"]
    await wait_until(lambda: time.time() > until, what="the cooldown's end")

    async def again(daemon: Daemon) -> None:
        await wait_until(lambda: daemon.store.incident(second.id).finished_at is not None, 3)
        assert ran(second.id) == 1

    await running(from_dict(raw), again)


async def test_rearm_without_listeners_still_records_when_it_happened(tmp_path: Path) -> None:
    """With rearm_cooldown and nobody to tell, the re-arm still opens an incident (its time)."""
    raw = config(tmp_path, **COOLDOWN)
    raw["monitors"]["m0"]["on_alert"] = []

    async def body(daemon: Daemon) -> None:
        await rolled_back_and_rearmed(daemon)
        assert WaitLog(daemon.store).rearmed_at("m0") is not None
        await wait_until(lambda: len(rollbacks(daemon)) == 2)
        assert rollbacks(daemon)[1].waiting == "cooldown"

    await running(from_dict(raw), body)


async def test_a_daemon_without_limits_never_holds(tmp_path: Path) -> None:
    """No max_rollbacks, no cooldown: every rollback plan runs at once, as before."""

    async def body(daemon: Daemon) -> None:
        await wait_until(lambda: sum(1 for i in rollbacks(daemon) if i.finished_at) == 5)
        assert all(i.waiting is None for i in rollbacks(daemon))
        assert daemon.status()["limits"] == {
            "max_rollbacks": None,
            "rearm_cooldown_seconds": None,
        }

    daemon = Daemon(from_dict(config(tmp_path, 5)), registry=CollectorRegistry())
    assert waiting_gauge(daemon, "approval") == 0
    await running(from_dict(config(tmp_path, 5)), body)


# --- the decision and the store ------------------------------------------------------------


def draft(event: Event = Event.ROLLBACK, *, at: float = 10_000.0, mode: str = "armed") -> Any:
    """A draft of monitor m0 opened at ``at``."""
    return IncidentDraft("m0", event, "2 failing checks", mode, at, ("act",), {"trigger": {}})


LIMIT = limits.Limits(DaemonConfig(max_rollbacks={"count": 2, "per": "1h"}).max_rollbacks, 60.0)


def test_hold_waits_for_approval_at_the_limit_and_for_the_cooldown_after_a_rearm() -> None:
    """At ``count`` released the draft waits for approval; within a cooldown, for it."""
    seen: list[tuple[float, str]] = []

    def released(count: int) -> Any:
        def count_since(since: float, mode: str) -> int:
            seen.append((since, mode))
            return count

        return count_since

    never = lambda monitor: None  # noqa: E731 - a one-line stub
    assert limits.hold(draft(), LIMIT, released=released(1), rearmed_at=never).waiting is None
    assert seen == [(10_000.0 - 3600.0, "armed")]
    held = limits.hold(draft(), LIMIT, released=released(2), rearmed_at=never)
    assert held.waiting == "approval"
    assert held.details["wait"] == {
        "for": "approval",
        "reason": "max_rollbacks 2 per 1h reached",
        "released": 2,
    }
    assert held.details["trigger"] == {}
    cooling = limits.hold(draft(), LIMIT, released=released(0), rearmed_at=lambda m: 9_950.0)
    assert cooling.waiting == "cooldown"
    assert cooling.details["wait"]["until"] == 10_010.0
    after = limits.hold(draft(), LIMIT, released=released(0), rearmed_at=lambda m: 9_900.0)
    assert after.waiting is None
    both = limits.hold(draft(), LIMIT, released=released(5), rearmed_at=lambda m: 9_950.0)
    assert both.waiting == "approval", "past the limit an operator decides, cooldown or not"
    for event in (Event.ALERT, Event.BLIND, Event.REARM):
        alert = draft(event)
        assert limits.hold(alert, LIMIT, released=released(9), rearmed_at=never) is alert


@pytest.mark.parametrize(
    ("seconds", "text"), [(3600.0, "1h"), (90.0, "1m30s"), (86400.0, "1d"), (1.5, "1.5s")]
)
def test_duration_text(seconds: float, text: str) -> None:
    """Durations read back as the config writes them."""
    assert limits.duration_text(seconds) == text


def test_store_counts_released_rollbacks_and_approves_once(tmp_path: Path) -> None:
    """Plans let run count (approved ones at approval time); approve is check-and-set."""
    with Store.open(tmp_path) as store:
        ran_id = store.open_incident(draft(at=100.0))
        held_id = store.open_incident(
            IncidentDraft("m1", Event.ROLLBACK, "r", "armed", 200.0, ("act",), {}, "approval")
        )
        cooling = IncidentDraft("m2", Event.ROLLBACK, "r", "armed", 300.0, ("act",), {}, "cooldown")
        cooling_id = store.open_incident(cooling)
        store.open_incident(draft(Event.ALERT, at=400.0))
        store.open_incident(draft(at=500.0, mode="dry-run"))
        assert WaitLog(store).rollbacks_released(0.0, "armed") == 2
        assert WaitLog(store).rollbacks_released(150.0, "armed") == 1
        assert WaitLog(store).rollbacks_released(0.0, "dry-run") == 1
        assert [i.id for i in WaitLog(store).waiting_incidents()] == [held_id, cooling_id]
        assert WaitLog(store).approve(held_id, 1000.0) == "approval"
        assert WaitLog(store).approve(held_id, 1001.0) is None
        assert WaitLog(store).approve(ran_id, 1001.0) is None
        assert store.incident(held_id).approved_at == 1000.0
        assert WaitLog(store).rollbacks_released(900.0, "armed") == 1, "counted when approved"
        assert not WaitLog(store).release(cooling_id, "approval")
        assert WaitLog(store).release(cooling_id, "cooldown")
        assert not WaitLog(store).release(cooling_id, "cooldown")
        assert WaitLog(store).waiting_incidents() == []
        assert WaitLog(store).rearmed_at("m0") is None
        store.open_incident(draft(Event.REARM, at=600.0))
        store.open_incident(draft(Event.REARM, at=700.0))
        assert WaitLog(store).rearmed_at("m0") == 700.0


# --- the config ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("daemon", "key", "reason"),
    [
        ('max_rollbacks = { count = 0, per = "1h" }', "max_rollbacks.count", "greater than"),
        ("max_rollbacks = { count = 3 }", "max_rollbacks.per", "Field required"),
        ('max_rollbacks = { count = 3, per = "5s" }', "max_rollbacks.per", "give 1m to 30d"),
        ('max_rollbacks = { count = 3, per = "1h", x = 1 }', "max_rollbacks.x", "unknown key"),
        ('max_rollbacks = { count = true, per = "1h" }', "max_rollbacks.count", "integer"),
        ('max_rollbacks = "3/h"', "max_rollbacks", "give a table such as { count = 3"),
        ('rearm_cooldown = "0s"', "rearm_cooldown", "give 1s to 7d"),
        ("rearm_cooldown = 5", "rearm_cooldown", "a duration is a string"),
    ],
)
def test_check_config_names_the_bad_limit(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], daemon: str, key: str, reason: str
) -> None:
    """check-config exits 1 with one line naming daemon.KEY and the reason."""
    path = write(tmp_path, MINIMAL.replace('mode = "dry-run"', f'mode = "dry-run"\n{daemon}'))
    (problem,) = problems_of(path)
    assert problem.startswith(f"{path}: daemon.{key}: "), problem
    assert reason in problem
    assert cli.main(["check-config", str(path)]) == 1
    assert f"daemon.{key}:" in capsys.readouterr().err


def test_limits_load_and_the_environment_overrides_them(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The TOML keys load; ROLLBACKD_MAX_ROLLBACKS (JSON) and ROLLBACKD_REARM_COOLDOWN win."""
    text = MINIMAL.replace(
        'mode = "dry-run"',
        'mode = "dry-run"\nmax_rollbacks = { count = 3, per = "1h" }\nrearm_cooldown = "5m"',
    )
    daemon = load(write(tmp_path, text)).daemon
    assert daemon.max_rollbacks is not None
    assert (daemon.max_rollbacks.count, daemon.max_rollbacks.per) == (3, 3600.0)
    assert daemon.rearm_cooldown == 300.0
    assert load(write(tmp_path, MINIMAL)).daemon.max_rollbacks is None
    monkeypatch.setenv("ROLLBACKD_MAX_ROLLBACKS", '{"count": 1, "per": "10m"}')
    monkeypatch.setenv("ROLLBACKD_REARM_COOLDOWN", "30s")
    daemon = load(write(tmp_path, text)).daemon
    assert daemon.max_rollbacks is not None
    assert (daemon.max_rollbacks.count, daemon.max_rollbacks.per) == (1, 600.0)
    assert daemon.rearm_cooldown == 30.0
    monkeypatch.setenv("ROLLBACKD_MAX_ROLLBACKS", "3/h")
    (problem,) = problems_of(write(tmp_path, text))
    assert "daemon.max_rollbacks: give a table" in problem
    assert problem.endswith("(from $ROLLBACKD_MAX_ROLLBACKS)")


async def test_a_rollout_abort_waits_for_a_rollback_being_gated(tmp_path: Path) -> None:
    """An abort's rollback counts in max_rollbacks: it opens only once a gate has committed."""
    raw = rollouts_config(tmp_path, route_percent(tmp_path / "traffic.env"), hold="24h")
    raw["daemon"]["max_rollbacks"] = {"count": 1, "per": "1h"}
    GATES.clear()  # healthy gates: the only rollbacks are the test's and the abort's

    async def body(daemon: Daemon) -> None:
        await wait_until(lambda: rollout(daemon)["hold_remaining_s"] is not None, what="holding")
        due = IncidentDraft(
            "payments", Event.ROLLBACK, "test", "armed", time.time(), ("route-legacy",), {}
        )
        async with daemon.waiting.gate(due) as gated:
            assert gated.waiting is None  # the first of one per hour
            aborting = asyncio.create_task(daemon.rollout("boop", "abort"))
            await asyncio.sleep(0.2)  # not a synchronisation: it must still be waiting
            assert not aborting.done()
            await daemon.state.open_incident(gated)
        assert "incident" in await aborting
        async with daemon.waiting.gate(replace(due, opened_at=time.time())) as late:
            assert late.waiting == "approval"
            assert late.details["wait"]["released"] == 2

    await serve_rollouts(raw, body)
