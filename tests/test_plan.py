"""The plan runner: order, retries, timeouts, dry-run, the incident record, resume, exactly once."""

from __future__ import annotations

import asyncio
import json
import signal
import sys
import time
from collections.abc import AsyncIterator, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs

from rollbackd.actions import ActionContext, ActionType
from rollbackd.assemble import Registries, from_dict
from rollbackd.codec import check_to_json
from rollbackd.config import ActionConfig, RuleConfig
from rollbackd.engine import Check, MonitorState, Outcome
from rollbackd.errors import ActionError
from rollbackd.options import Frozen
from rollbackd.plan import MAX_INTERRUPTIONS, PlanRunner, fire_action
from rollbackd.readings import Reading, ok
from rollbackd.records import IncidentDraft
from rollbackd.state import Store
from rollbackd.verdicts import RuleResult, Verdict
from tests.helpers import daemon_table
from tests.test_actions_web import HookServer

FLAGS = {
    "flags": {
        "boop-payments": {
            "state": "ENABLED",
            "variants": {"on": True, "off": False},
            "defaultVariant": "on",
        }
    }
}


class ScriptedSource:
    """A poll source answering from a script of in-flight values (the last one repeats)."""

    name = "prom"
    push = False

    def __init__(self, values: Sequence[float]) -> None:
        self.values = list(values)
        self.reads = 0

    def watch(self, monitor: str, rule: RuleConfig) -> None:
        """Accept any rule."""

    def add_listener(self, listener: Any) -> None:
        """Polls never call listeners."""

    async def start(self) -> None:
        """Nothing to connect."""

    async def aclose(self) -> None:
        """Nothing to close."""

    async def read(self, rule: RuleConfig, now: float) -> Sequence[Reading]:
        """Return the next scripted value."""
        value = self.values[min(self.reads, len(self.values) - 1)]
        self.reads += 1
        return [ok(value, now)]


class CrashOptions(Frozen):
    """Options of the test-only ``test.crash`` action type."""

    message: str = "plugin bug"


class CrashAction:
    """A third-party action with a bug: raises something that is not an ActionError."""

    def __init__(self, name: str, options: CrashOptions) -> None:
        self.name = name
        self.message = options.message

    async def run(self, ctx: ActionContext) -> str:
        """Fail the way a buggy plugin does."""
        raise KeyError(self.message)

    async def aclose(self) -> None:
        """Nothing to release."""


REGISTRIES = Registries()
REGISTRIES.actions.register("test.crash", ActionType(options=CrashOptions, build=CrashAction))


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    """Open a fresh state store."""
    with Store.open(tmp_path / "state") as opened:
        yield opened


@pytest.fixture
async def hooks() -> AsyncIterator[HookServer]:
    """Run a recording HTTP server on loopback for one test."""
    server = await HookServer().start()
    yield server
    await server.stop()


@pytest.fixture
def work(tmp_path: Path) -> Path:
    """Create the files the rollback plan edits."""
    directory = tmp_path / "work"
    directory.mkdir()
    (directory / "flags.json").write_text(json.dumps(FLAGS))
    (directory / "traffic.env").write_text("# routing\nBOOP_TRAFFIC_PERCENT=25\n")
    return directory


def plan_tables(work: Path, hook_url: str) -> dict[str, dict[str, Any]]:
    """Return the example's five-step rollback plan as ``[actions]`` tables."""
    return {
        "stop-boop-traffic": {
            "type": "flag.file",
            "path": str(work / "flags.json"),
            "flag": "boop-payments",
            "variant": "off",
        },
        "drain": {"type": "wait", "source": "prom", "query": "sum(inflight)", "poll": "20ms"},
        "route-legacy": {
            "type": "route.file",
            "path": str(work / "traffic.env"),
            "key": "BOOP_TRAFFIC_PERCENT",
            "value": "0",
        },
        "notify-business": {"type": "alert.webhook", "url": hook_url, "retries": 2},
        "log": {"type": "alert.log"},
    }


BUILT: list[Any] = []
"""Actions built by ``build`` in the running test; the autouse fixture closes them."""


@pytest.fixture(autouse=True)
async def close_actions() -> AsyncIterator[None]:
    """Close every action a test built (their HTTP sessions)."""
    yield
    while BUILT:
        await BUILT.pop().aclose()


COMMON = ("type", "timeout", "retries", "give_up_after")
"""Keys of [actions.NAME] that every action has (the rest are the type's options)."""


def build(
    store: Store,
    tables: dict[str, dict[str, Any]],
    state_dir: Path,
    mode: str = "armed",
    sources: dict[str, Any] | None = None,
    **kwargs: Any,
) -> PlanRunner:
    """Build a runner with the actions of ``tables`` (type/timeout/retries + options)."""
    actions: dict[str, Any] = {}
    configs = {}
    for name, table in tables.items():
        common = {k: table[k] for k in COMMON if k in table}
        options = {k: v for k, v in table.items() if k not in common}
        kind = REGISTRIES.actions.get(table["type"])
        actions[name] = kind.build(name, kind.options.model_validate(options))
        configs[name] = ActionConfig.model_validate(common)
    BUILT.extend(actions.values())
    return PlanRunner(
        store=store,
        actions=actions,
        action_configs=configs,
        mode=mode,
        state_dir=state_dir,
        sources=sources if sources is not None else {"prom": ScriptedSource([0.0])},
        config_sha256="c0ffee",
        environment="staging",
        backoff_base=0.01,
        **kwargs,
    )


def result(rule: str, value: float, at: float, verdict: Verdict = Verdict.BREACH) -> RuleResult:
    """Build one rule result of monitor payments."""
    return RuleResult(rule, (("region", "eu"),), value, 0.1, "above", "%", verdict, "why", at)


def open_incident(store: Store, actions: Sequence[str], mode: str = "armed") -> str:
    """Commit two checks of monitor payments, then open a rollback incident with ``actions``."""
    checks = [
        Check("payments", at, Outcome.BREACH, (result("error-rate", 3.0, at), result("p95", 1, at)))
        for at in (100.0, 130.0)
    ]
    for check in checks:
        store.commit_check(check, MonitorState(), history=50)
    draft = IncidentDraft(
        monitor="payments",
        event="rollback",
        reason="2 failing checks in a row",
        mode=mode,
        opened_at=130.0,
        actions=tuple(actions),
        details={
            "trigger": check_to_json(checks[-1]),
            "checks": [check_to_json(c) for c in checks],
        },
    )
    return store.open_incident(draft)


async def test_plan_runs_steps_in_order_and_writes_the_record(
    store: Store, work: Path, hooks: HookServer, tmp_path: Path
) -> None:
    """Every step runs once, in order, and the incident record holds trigger, samples and steps."""
    tables = plan_tables(work, hooks.url("/hook"))
    attempts: list[tuple[str, str]] = []
    runner = build(
        store, tables, tmp_path / "state", on_attempt=lambda a, r: attempts.append((a, r))
    )
    incident_id = open_incident(store, list(tables))
    await runner.run(incident_id)

    record = store.incident(incident_id)
    assert record.finished_at is not None
    assert [(s.action, s.status, s.attempts) for s in record.steps] == [
        (name, "ok", 1) for name in tables
    ]
    starts = [s.started_at for s in record.steps]
    assert starts == sorted(starts)
    assert attempts == [(name, "ok") for name in tables]
    assert (
        json.loads((work / "flags.json").read_text())["flags"]["boop-payments"]["defaultVariant"]
        == "off"
    )
    assert (work / "traffic.env").read_text() == "# routing\nBOOP_TRAFFIC_PERCENT=0\n"
    assert len(hooks.at("/hook")) == 1

    document = json.loads((tmp_path / "state" / "incidents" / f"{incident_id}.json").read_text())
    assert document["config_sha256"] == "c0ffee"
    assert document["environment"] == "staging"
    assert document["details"]["trigger"]["outcome"] == "breach"
    assert set(document["recent_samples"]) == {"error-rate", "p95"}
    assert [s["at"] for s in document["recent_samples"]["error-rate"]] == [100.0, 130.0]
    assert [s["status"] for s in document["steps"]] == ["ok"] * 5
    assert document["steps"][1]["detail"].startswith("drained: reads 0 after 1 polls")
    assert all(s["seconds"] is not None and s["attempts"] == 1 for s in document["steps"])


async def test_failed_attempts_are_retried_with_the_same_key(
    store: Store, hooks: HookServer, tmp_path: Path
) -> None:
    """Two 500s then success: three requests with one Idempotency-Key, the step ends ok."""
    hooks.fail["/hook"] = [500, 500]
    tables = {"notify": {"type": "alert.webhook", "url": hooks.url("/hook"), "retries": 2}}
    runner = build(store, tables, tmp_path / "state")
    incident_id = open_incident(store, ["notify"])
    with capture_logs() as logs:
        await runner.run(incident_id)
    [step] = store.incident(incident_id).steps
    assert (step.status, step.attempts) == ("ok", 3)
    keys = {r.headers["Idempotency-Key"] for r in hooks.at("/hook")}
    assert keys == {f"{incident_id}:0"}
    assert len(hooks.at("/hook")) == 3
    retries = [e for e in logs if e["event"] == "action_retry"]
    assert [e["attempt"] for e in retries] == [1, 2]
    assert "HTTP 500" in retries[0]["error"]


async def test_failing_step_is_recorded_and_later_steps_still_run(
    store: Store, hooks: HookServer, work: Path, tmp_path: Path
) -> None:
    """A step failing all its attempts is logged as action_failed; the next steps still run."""
    hooks.fail["/hook"] = [400, 400]  # a lasting failure: it uses up retries
    tables = {
        "notify": {"type": "alert.webhook", "url": hooks.url("/hook"), "retries": 1},
        "route": {
            "type": "route.file",
            "path": str(work / "traffic.env"),
            "key": "BOOP_TRAFFIC_PERCENT",
            "value": "0",
        },
    }
    runner = build(store, tables, tmp_path / "state")
    incident_id = open_incident(store, ["notify", "route"])
    with capture_logs() as logs:
        await runner.run(incident_id)
    notify, route = store.incident(incident_id).steps
    assert (notify.status, notify.attempts) == ("failed", 2)
    assert "HTTP 400" in notify.detail
    assert route.status == "ok"
    [failed] = [e for e in logs if e["event"] == "action_failed"]
    assert (failed["action"], failed["log_level"], failed["attempts"]) == ("notify", "error", 2)
    assert any(e["event"] == "plan_finished" and e["failed"] == ["notify"] for e in logs)


async def test_hanging_step_times_out_and_plan_goes_on(
    store: Store, hooks: HookServer, tmp_path: Path
) -> None:
    """A step whose endpoint hangs fails at its timeout; the plan does not wait for it."""
    hooks.hang.add("/slow")
    tables = {
        "slow": {
            "type": "alert.webhook",
            "url": hooks.url("/slow"),
            "timeout": "300ms",
            "retries": 0,
            "give_up_after": "1s",
        },
        "fast": {"type": "alert.webhook", "url": hooks.url("/fast")},
    }
    runner = build(store, tables, tmp_path / "state")
    incident_id = open_incident(store, ["slow", "fast"])
    started = time.monotonic()
    await runner.run(incident_id)
    assert time.monotonic() - started < 3.0
    slow, fast = store.incident(incident_id).steps
    assert slow.status == "failed"
    assert slow.detail.endswith("over 1s: timed out after 0.3s"), slow.detail
    assert slow.attempts >= 2, "a timeout is transient: retried until give_up_after"
    assert fast.status == "ok"


async def test_plugin_bug_fails_its_step_only(store: Store, tmp_path: Path) -> None:
    """An action raising something other than ActionError fails its step with the exception."""
    tables = {"bug": {"type": "test.crash", "retries": 0}, "log": {"type": "alert.log"}}
    runner = build(store, tables, tmp_path / "state")
    incident_id = open_incident(store, ["bug", "log"])
    await runner.run(incident_id)
    bug, log = store.incident(incident_id).steps
    assert (bug.status, bug.detail) == ("failed", "KeyError: 'plugin bug'")
    assert log.status == "ok"


async def test_action_removed_by_reload_fails_its_step(store: Store, tmp_path: Path) -> None:
    """A step whose action is no longer configured fails with that reason."""
    runner = build(store, {"log": {"type": "alert.log"}}, tmp_path / "state")
    incident_id = open_incident(store, ["gone", "log"])
    await runner.run(incident_id)
    gone, log = store.incident(incident_id).steps
    assert (gone.status, gone.detail) == ("failed", "action 'gone' is not configured")
    assert log.status == "ok"


@pytest.mark.parametrize("modes", [("dry-run", "armed"), ("armed", "dry-run")])
async def test_dry_run_touches_nothing_and_records_would_run(
    store: Store, work: Path, hooks: HookServer, tmp_path: Path, modes: tuple[str, str]
) -> None:
    """Unless both incident and daemon are armed, no action runs; steps are 'would_run'."""
    incident_mode, daemon_mode = modes
    tables = plan_tables(work, hooks.url("/hook"))
    before = {p.name: p.read_bytes() for p in work.iterdir()}
    source = ScriptedSource([5.0])
    runner = build(store, tables, tmp_path / "state", mode=daemon_mode, sources={"prom": source})
    incident_id = open_incident(store, list(tables), mode=incident_mode)
    await runner.run(incident_id)
    record = store.incident(incident_id)
    assert [s.status for s in record.steps] == ["would_run"] * 5
    assert all(s.attempts == 0 for s in record.steps)
    assert {p.name: p.read_bytes() for p in work.iterdir()} == before
    assert hooks.requests == []
    assert source.reads == 0
    assert (tmp_path / "state" / "incidents" / f"{incident_id}.json").exists()


async def test_resume_skips_done_steps_and_repeats_the_interrupted_one(
    store: Store, hooks: HookServer, tmp_path: Path
) -> None:
    """After a crash, done steps are not repeated; the running one is retried with its key."""
    tables = {
        "a": {"type": "alert.webhook", "url": hooks.url("/a")},
        "b": {"type": "alert.webhook", "url": hooks.url("/b")},
        "c": {"type": "alert.webhook", "url": hooks.url("/c")},
    }
    incident_id = open_incident(store, ["a", "b", "c"])
    # The previous process finished step a and crashed while running step b.
    store.step_started(incident_id, 0, 1.0)
    store.step_finished(incident_id, 0, "ok", "done before the crash", 2.0)
    store.step_started(incident_id, 1, 3.0)
    resumed = await build(store, tables, tmp_path / "state").resume()
    assert resumed == [incident_id]
    a, b, c = store.incident(incident_id).steps
    assert (a.status, a.attempts, a.detail) == ("ok", 1, "done before the crash")
    assert (b.status, b.attempts) == ("ok", 2)
    assert c.status == "ok"
    assert hooks.at("/a") == []
    assert [r.headers["Idempotency-Key"] for r in hooks.at("/b")] == [f"{incident_id}:1"]
    assert store.unfinished_incidents() == []


async def test_crash_looping_step_gives_up(store: Store, hooks: HookServer, tmp_path: Path) -> None:
    """A step the daemon died in MAX_INTERRUPTIONS times is failed, not retried forever."""
    tables = {"a": {"type": "alert.webhook", "url": hooks.url("/a"), "retries": 1}}
    incident_id = open_incident(store, ["a"])
    for at in range(1, MAX_INTERRUPTIONS):  # each restart found it running and resumed it
        store.step_started(incident_id, 0, float(at))
        store.step_interrupted(incident_id, 0)
    store.step_started(incident_id, 0, float(MAX_INTERRUPTIONS))
    await build(store, tables, tmp_path / "state").run(incident_id)
    [step] = store.incident(incident_id).steps
    assert step.status == "failed"
    assert step.detail == f"gave up: the daemon died during this step {MAX_INTERRUPTIONS} times"
    assert hooks.requests == []


async def test_interrupted_attempt_does_not_use_up_retries(
    store: Store, hooks: HookServer, tmp_path: Path
) -> None:
    """A step cut short by a crash with retries = 0 runs again at resume instead of giving up."""
    tables = {"a": {"type": "alert.webhook", "url": hooks.url("/a"), "retries": 0}}
    incident_id = open_incident(store, ["a"])
    store.step_started(incident_id, 0, 1.0)  # the daemon died during this attempt
    await build(store, tables, tmp_path / "state").run(incident_id)
    [step] = store.incident(incident_id).steps
    assert (step.status, step.attempts, step.interruptions) == ("ok", 2, 1)
    assert len(hooks.requests) == 1


async def test_transient_failures_retry_past_retries_until_give_up_after(
    store: Store, hooks: HookServer, tmp_path: Path
) -> None:
    """Refused connections keep being retried beyond ``retries`` and succeed once it comes back."""
    hooks.fail["/a"] = [503, 503, 503, 503]
    tables = {
        "a": {"type": "alert.webhook", "url": hooks.url("/a"), "retries": 0},
        "b": {"type": "alert.webhook", "url": "http://127.0.0.1:9/", "retries": 0,
              "give_up_after": "500ms"},
    }  # fmt: skip
    incident_id = open_incident(store, ["a", "b"])
    await build(store, tables, tmp_path / "state").run(incident_id)
    a, b = store.incident(incident_id).steps
    assert (a.status, a.attempts, a.failures) == ("ok", 5, 0), a
    assert b.status == "failed"
    assert b.attempts >= 2
    assert "over 0.5s" in b.detail


async def test_wait_reports_timeout_with_in_flight_count_as_success(
    store: Store, tmp_path: Path
) -> None:
    """A drain that never reaches 0 ends before the step's timeout, ok, saying what was left."""
    tables = {
        "drain": {
            "type": "wait",
            "source": "prom",
            "query": "q",
            "poll": "20ms",
            "timeout": "400ms",
        }
    }
    source = ScriptedSource([7.0, 5.0, 3.0])
    runner = build(store, tables, tmp_path / "state", sources={"prom": source})
    incident_id = open_incident(store, ["drain"])
    await runner.run(incident_id)
    [step] = store.incident(incident_id).steps
    assert step.status == "ok"
    assert step.detail.startswith("timed out with 3 in flight after ")
    assert source.reads >= 3


async def test_wait_stops_when_drained(store: Store, tmp_path: Path) -> None:
    """A drain query reaching 0 ends the wait at once."""
    tables = {
        "drain": {"type": "wait", "source": "prom", "query": "q", "poll": "10ms", "timeout": "5s"}
    }
    source = ScriptedSource([2.0, 1.0, 0.0])
    runner = build(store, tables, tmp_path / "state", sources={"prom": source})
    incident_id = open_incident(store, ["drain"])
    await runner.run(incident_id)
    [step] = store.incident(incident_id).steps
    assert (step.status, source.reads) == ("ok", 3)
    assert step.detail.startswith("drained: reads 0 after 3 polls")


async def test_wait_with_unknown_source_fails(store: Store, tmp_path: Path) -> None:
    """A wait naming a source that is not running fails its step with that reason."""
    tables = {"drain": {"type": "wait", "source": "nope", "query": "q", "retries": 0}}
    runner = build(store, tables, tmp_path / "state")
    incident_id = open_incident(store, ["drain"])
    await runner.run(incident_id)
    [step] = store.incident(incident_id).steps
    assert (step.status, step.detail) == (
        "failed",
        "source 'nope' is not configured or not running",
    )


def _config(tmp_path: Path, actions: dict[str, Any]) -> Any:
    return from_dict(
        {
            "daemon": daemon_table(tmp_path, mode="dry-run", listen=None),
            "actions": actions,
        },
        registries=REGISTRIES,
    )


async def test_fire_action_runs_one_action_once(hooks: HookServer, tmp_path: Path) -> None:
    """test-action fires the action once (event 'test'), even in dry-run, and returns its detail."""
    config = _config(tmp_path, {"notify": {"type": "alert.webhook", "url": hooks.url("/hook")}})
    detail = await fire_action(config, "notify")
    assert detail == f"POST {hooks.url('/hook')}: HTTP 200"
    [got] = hooks.requests
    document = json.loads(got.body)
    assert (document["event"], document["environment"]) == ("test", "staging")


async def test_fire_action_failure_raises_with_the_reason(
    hooks: HookServer, tmp_path: Path
) -> None:
    """A failing test-action raises ActionError with the action's reason (no retries)."""
    hooks.fail["/hook"] = [500]
    config = _config(tmp_path, {"notify": {"type": "alert.webhook", "url": hooks.url("/hook")}})
    with pytest.raises(ActionError, match=r"action notify failed: .*HTTP 500"):
        await fire_action(config, "notify")
    assert len(hooks.requests) == 1


# --- exactly once across SIGKILL -----------------------------------------------------------

CHILD = """
import asyncio, json, os, signal, sys
from pathlib import Path
from rollbackd.actions import action_types
from rollbackd.config import ActionConfig
from rollbackd.plan import PlanRunner
from rollbackd.readings import ok
from rollbackd.state import Store

state_dir, markers, tables_json, kill = Path(sys.argv[1]), *sys.argv[2:5]
kind, _, at = kill.partition(":")
at = int(at or -1)


def die():
    os.kill(os.getpid(), signal.SIGKILL)


class KillingStore(Store):
    def step_started(self, incident_id, step, now):
        if kind == "before" and step == at:
            die()
        return super().step_started(incident_id, step, now)

    def step_finished(self, incident_id, step, status, detail, now):
        if kind == "mid" and step == at:
            die()  # the side effect happened, its result is not recorded
        super().step_finished(incident_id, step, status, detail, now)
        if kind == "after" and step == at:
            die()


class Counted:
    def __init__(self, inner):
        self.inner, self.name = inner, inner.name

    async def run(self, ctx):
        detail = await self.inner.run(ctx)
        with open(markers, "a") as f:
            f.write(f"{self.name} {ctx.idempotency_key} {ctx.attempt}\\n")
            f.flush()
            os.fsync(f.fileno())
        return detail

    async def aclose(self):
        await self.inner.aclose()


class Drained:
    name, push = "prom", False

    async def read(self, rule, now):
        return [ok(0.0, now)]


actions, configs = {}, {}
for name, table in json.loads(tables_json).items():
    common = {k: table.pop(k) for k in COMMON_KEYS if k in table}
    kind_ = action_types().get(common["type"])
    actions[name] = Counted(kind_.build(name, kind_.options.model_validate(table)))
    configs[name] = ActionConfig.model_validate(common)

store = KillingStore.open(state_dir)
runner = PlanRunner(store=store, actions=actions, action_configs=configs, mode="armed",
                    state_dir=state_dir, sources={"prom": Drained()}, backoff_base=0.01)


async def main():
    try:
        await runner.resume()
    finally:
        for action in actions.values():
            await action.aclose()


asyncio.run(main())
"""


async def _child(tmp_path: Path, tables: dict[str, Any], kill: str) -> int:
    """Run the plan in a fresh interpreter that SIGKILLs itself at ``kill``; its return code."""
    script = tmp_path / "child.py"
    script.write_text(CHILD.replace("COMMON_KEYS", repr(COMMON)))
    with (tmp_path / f"child-{kill}.log").open("wb") as out:
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            str(script),
            str(tmp_path / "state"),
            str(tmp_path / "markers"),
            json.dumps(tables),
            kill,
            stdout=out,
            stderr=out,
        )
        async with asyncio.timeout(60):
            return await process.wait()


BOUNDARIES = ["before:0", "after:0", "after:1", "after:2", "after:3", "after:4"]


@pytest.mark.slow
@pytest.mark.parametrize("kill", BOUNDARIES)
async def test_each_step_happens_exactly_once_across_sigkill(
    tmp_path: Path, work: Path, hooks: HookServer, kill: str
) -> None:
    """SIGKILL at a step boundary, then a restart: every step's side effect happened once."""
    tables = plan_tables(work, hooks.url("/hook"))
    with Store.open(tmp_path / "state") as store:
        incident_id = open_incident(store, list(tables))

    assert await _child(tmp_path, tables, kill) == -signal.SIGKILL
    assert await _child(tmp_path, tables, "none") == 0, (tmp_path / "child-none.log").read_text()

    lines = (tmp_path / "markers").read_text().splitlines()
    assert sorted(lines) == sorted(f"{name} {incident_id}:{i} 1" for i, name in enumerate(tables))
    assert len(hooks.at("/hook")) == 1
    assert (work / "traffic.env").read_text() == "# routing\nBOOP_TRAFFIC_PERCENT=0\n"
    with Store.open(tmp_path / "state") as store:
        record = store.incident(incident_id)
    assert record.finished_at is not None
    assert [(s.status, s.attempts) for s in record.steps] == [("ok", 1)] * 5
    assert (tmp_path / "state" / "incidents" / f"{incident_id}.json").exists()


@pytest.mark.slow
async def test_kill_inside_a_step_repeats_it_with_the_same_key(
    tmp_path: Path, work: Path, hooks: HookServer
) -> None:
    """Killed after the webhook was sent but before it was recorded: resent with the same key."""
    tables = plan_tables(work, hooks.url("/hook"))
    with Store.open(tmp_path / "state") as store:
        incident_id = open_incident(store, list(tables))
    assert await _child(tmp_path, tables, "mid:3") == -signal.SIGKILL
    assert await _child(tmp_path, tables, "none") == 0
    keys = [r.headers["Idempotency-Key"] for r in hooks.at("/hook")]
    assert keys == [f"{incident_id}:3", f"{incident_id}:3"]  # a receiver can de-duplicate
    lines = (tmp_path / "markers").read_text().splitlines()
    assert [line for line in lines if line.startswith("notify-business")] == [
        f"notify-business {incident_id}:3 1",
        f"notify-business {incident_id}:3 2",
    ]
    assert sum(line.startswith("route-legacy") for line in lines) == 1
