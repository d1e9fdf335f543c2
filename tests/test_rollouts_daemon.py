"""Rollouts in an in-process daemon: a real route file, a real HTTP routing endpoint, gates."""

from __future__ import annotations

import asyncio
import datetime as dt
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from aiohttp import web

from rollbackd import assemble, readings
from rollbackd.actions.envfile import unquote
from rollbackd.assemble import Assembly, Registries
from rollbackd.config import RuleConfig
from rollbackd.daemon import Daemon
from rollbackd.errors import RolloutRefusedError
from rollbackd.options import Frozen
from rollbackd.readings import Reading
from rollbackd.rolloutlog import RolloutLog
from rollbackd.sources import SourceType
from rollbackd.state import Store
from tests import helpers
from tests.helpers import config_file, daemon_table, route_legacy, serving, wait_until
from tests.test_daemon import ScriptedSource


class GateOptions(Frozen):
    """No options: the test sets each gate's value in ``VALUES``."""


VALUES: dict[str, float] = {}
"""What each rule's query reads now (0 is healthy, above 1 breaches)."""


class GateSource(ScriptedSource):
    """A poll source answering ``VALUES[query]``: one value per gate monitor."""

    async def read(self, rule: RuleConfig, now: float) -> Sequence[Reading]:
        """The scripted value of the rule's query."""
        return [readings.ok(VALUES.get(rule.query or "", 0.0), now)]


REGISTRIES = Registries()
REGISTRIES.sources.register(
    "test.gate", SourceType(GateOptions, frozenset({"query"}), lambda n, o: GateSource(n))
)


@pytest.fixture(autouse=True)
def healthy() -> None:
    """Every gate starts healthy."""
    VALUES.clear()


def config(state_dir: Path, set_action: dict[str, Any], **rollout: Any) -> dict[str, Any]:
    """Two gate monitors checked every 50 ms, a rollout 5 -> 25 -> 50 -> 100 held 0.3 s."""
    monitors = {
        name: {
            "interval": "50ms",
            "rollback_after": 3,
            "on_rollback": ["route-legacy"],
            "rules": [{"name": f"{name}-errors", "source": "gate", "query": name, "above": 1.0}],
        }
        for name in ("authentication", "payments")
    }
    return {
        "daemon": daemon_table(state_dir, environment="test"),
        "sources": {"gate": {"type": "test.gate"}},
        "monitors": monitors,
        "actions": {
            "route-legacy": route_legacy(state_dir / "traffic.env"),
            "route-percent": set_action,
        },
        "rollouts": {
            "boop": {
                "steps": [5, 25, 50, 100],
                **({} if "holds" in rollout else {"hold": "300ms"}),
                "gates": ["authentication", "payments"],
                "min_checks": 2,
                "set": "route-percent",
                **rollout,
            }
        },
    }


def route_percent(env_file: Path) -> dict[str, Any]:
    """``route.file`` writing ``BOOP_TRAFFIC_PERCENT={percent}``."""
    return {**route_legacy(env_file), "value": "{percent}"}


def traffic(env_file: Path) -> str | None:
    """``BOOP_TRAFFIC_PERCENT`` as a reader of the env file gets it."""
    for line in env_file.read_text().splitlines():
        key, _, value = line.partition("=")
        if key == "BOOP_TRAFFIC_PERCENT":
            return unquote(value)
    return None


async def serve(daemon_config: dict[str, Any], body: Any) -> None:
    """Run ``body(daemon)`` against an in-process daemon on ``daemon_config``."""
    assembly: Assembly = assemble.from_dict(daemon_config, registries=REGISTRIES)
    await helpers.running(assembly, body, REGISTRIES)


def rollout(daemon: Daemon) -> dict[str, Any]:
    """``rollouts.boop`` of the daemon's /status."""
    found: dict[str, Any] = daemon.status()["rollouts"]["boop"]
    return found


def promotions(daemon: Daemon) -> list[tuple[int, str]]:
    """(step, idempotency key) of every promotion incident, oldest first."""
    found = [i for i in daemon.store.incidents(limit=100) if i.event == "promote"]
    return sorted((i.details["step"], i.details["idempotency_key"]) for i in found)


class Router:
    """A routing service's HTTP API on 127.0.0.1: it records every percentage it is sent."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, str, str]] = []
        """(path, body, Idempotency-Key) of each request."""
        self.hooks: list[dict[str, Any]] = []
        self.unavailable: set[str] = set()
        """Keys answered 503 (a transient failure: the set step keeps retrying)."""
        self.runner: web.AppRunner | None = None
        self.port = 0

    async def __aenter__(self) -> Router:
        app = web.Application()
        app.router.add_put("/routes/boop", self._route)
        app.router.add_post("/hooks", self._hook)
        self.runner = web.AppRunner(app)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.runner is not None
        await self.runner.cleanup()

    async def _route(self, request: web.Request) -> web.Response:
        key = request.headers.get("Idempotency-Key", "")
        self.calls.append((request.path, await request.text(), key))
        if key in self.unavailable:
            return web.json_response({"ok": False}, status=503)
        return web.json_response({"ok": True})

    async def _hook(self, request: web.Request) -> web.Response:
        self.hooks.append(await request.json())
        return web.json_response({"ok": True})


async def test_full_ramp_to_100_through_a_real_http_routing_api(tmp_path: Path) -> None:
    """Each step is sent once to the routing API with key <rollout>:<step>, then announced."""
    async with Router() as router:
        set_action = {
            "type": "route.http",
            "url": f"http://127.0.0.1:{router.port}/routes/boop",
            "method": "PUT",
            "body": "{percent}",
        }
        raw = config(tmp_path, set_action, on_promote=["team"])
        raw["actions"]["team"] = {
            "type": "alert.webhook",
            "url": f"http://127.0.0.1:{router.port}/hooks",
        }

        async def body(daemon: Daemon) -> None:
            await wait_until(lambda: rollout(daemon)["state"] == "complete", 15, "complete")
            status = rollout(daemon)
            assert (status["percent"], status["step"]) == (100, 3)
            assert status["hold_remaining_s"] is None
            assert promotions(daemon) == [
                (0, "boop:0"),
                (1, "boop:1"),
                (2, "boop:2"),
                (3, "boop:3"),
            ]
            metrics = daemon.registry.get_sample_value
            assert metrics("rollbackd_rollout_percent", {"rollout": "boop"}) == 100
            assert metrics("rollbackd_rollout_step", {"rollout": "boop"}) == 3

        await serve(raw, body)
    assert router.calls == [
        ("/routes/boop", str(p), f"boop:{i}") for i, p in enumerate((5, 25, 50, 100))
    ]
    assert [h["event"] for h in router.hooks] == ["promote"] * 4
    assert [h["details"]["percent"] for h in router.hooks] == [5, 25, 50, 100]
    assert router.hooks[1]["monitor"] == "rollout:boop"


async def test_breach_at_50_rolls_back_once_and_stops_promotion(tmp_path: Path) -> None:
    """A gate's rollback at 50 %: its plan runs once, traffic is 0, nothing is promoted after."""
    env = tmp_path / "traffic.env"
    raw = config(tmp_path, route_percent(env), holds=["200ms", "200ms", "30s", "200ms"])

    async def body(daemon: Daemon) -> None:
        await wait_until(lambda: rollout(daemon)["percent"] == 50, 15, "at 50 %")
        assert traffic(env) == "50"
        VALUES["payments"] = 5.0  # payments breaches: 3 checks later it rolls back
        await wait_until(lambda: rollout(daemon)["state"] == "rolled_back", 10, "rolled back")
        await wait_until(lambda: all(i.finished_at for i in daemon.store.incidents()), 10)
        VALUES["payments"] = 0.0
        await asyncio.sleep(1.0)  # healthy again, well past a hold: still no promotion
        status = rollout(daemon)
        assert (status["state"], status["percent"], status["step"]) == ("rolled_back", 0, 2)
        assert "payments rolled back" in status["reason"]
        rollbacks = [i for i in daemon.store.incidents(limit=100) if i.event == "rollback"]
        assert len(rollbacks) == 1
        assert rollbacks[0].monitor == "payments"
        assert [s.status for s in rollbacks[0].steps] == ["ok"]
        assert promotions(daemon) == [(0, "boop:0"), (1, "boop:1"), (2, "boop:2")]
        with pytest.raises(RolloutRefusedError, match="rearm payments first"):
            await daemon.rollout("boop", "restart")

    await serve(raw, body)
    assert traffic(env) == "0"


async def test_a_failing_gate_restarts_the_hold_and_pause_waits_for_an_operator(
    tmp_path: Path,
) -> None:
    """on_gate_failure = "pause": a breach during the hold pauses; resume holds afresh."""
    env = tmp_path / "traffic.env"
    raw = config(tmp_path, route_percent(env), holds=["1s", "1s", "1s", "1s"])
    raw["rollouts"]["boop"]["on_gate_failure"] = "pause"
    raw["monitors"]["authentication"]["rollback_after"] = 100

    async def body(daemon: Daemon) -> None:
        await wait_until(lambda: rollout(daemon)["hold_remaining_s"] is not None, 10, "holding")
        VALUES["authentication"] = 5.0
        await wait_until(lambda: rollout(daemon)["state"] == "paused", 10, "paused")
        VALUES["authentication"] = 0.0
        await asyncio.sleep(1.5)  # a hold's worth: paused means no promotion
        assert (rollout(daemon)["state"], rollout(daemon)["percent"]) == ("paused", 5)
        assert rollout(daemon)["paused_by"] == "gate"
        await daemon.rollout("boop", "resume")
        await wait_until(lambda: rollout(daemon)["percent"] == 25, 10, "promoted after resume")

    await serve(raw, body)


async def test_operator_pause_promote_and_abort(tmp_path: Path) -> None:
    """Pause stops promotion, promote ends a day-long hold, abort runs the gates' plan once."""
    env = tmp_path / "traffic.env"
    raw = config(tmp_path, route_percent(env), hold="24h")

    async def body(daemon: Daemon) -> None:
        await wait_until(lambda: rollout(daemon)["hold_remaining_s"] is not None, 10, "holding")
        assert rollout(daemon)["hold_remaining_s"] > 86000
        await daemon.rollout("boop", "pause")
        with pytest.raises(RolloutRefusedError, match="paused, not holding"):
            await daemon.rollout("boop", "promote")
        await daemon.rollout("boop", "resume")
        await daemon.rollout("boop", "promote")
        await wait_until(lambda: rollout(daemon)["percent"] == 25, 10, "promoted by operator")
        assert traffic(env) == "25"
        result = await daemon.rollout("boop", "abort")
        await wait_until(lambda: daemon.store.incident(result["incident"]).finished_at, 10)
        assert rollout(daemon)["state"] == "rolled_back"
        assert [s.action for s in daemon.store.incident(result["incident"]).steps] == [
            "route-legacy"
        ]
        with pytest.raises(RolloutRefusedError, match="already rolled_back"):
            await daemon.rollout("boop", "abort")
        await daemon.rollout("boop", "restart")
        await wait_until(lambda: rollout(daemon)["percent"] == 5, 10, "restarted at 5 %")
        assert rollout(daemon)["run"] == 2
        assert ("0", "boop:0:run2") in [(str(s), k) for s, k in promotions(daemon)]

    await serve(raw, body)
    assert traffic(env) == "5"


async def test_a_day_long_hold_passes_on_an_injected_clock(tmp_path: Path) -> None:
    """The ramp's clock is injectable: a 24 h hold passes when the clock says so, not before."""
    env = tmp_path / "traffic.env"
    raw = config(tmp_path, route_percent(env), hold="24h")
    offset = [0.0]

    async def body(daemon: Daemon) -> None:
        real = daemon.ramp.clock
        daemon.ramp.clock = lambda: real() + offset[0]
        await wait_until(lambda: rollout(daemon)["hold_remaining_s"] is not None, 10, "holding")
        offset[0] = 86_400 - 60
        await asyncio.sleep(0.5)
        assert rollout(daemon)["percent"] == 5
        assert 0 < rollout(daemon)["hold_remaining_s"] <= 60
        offset[0] = 86_401
        await wait_until(lambda: rollout(daemon)["percent"] == 25, 10, "promoted after 24 h")

    await serve(raw, body)


async def test_a_freeze_blocks_a_promotion_but_not_a_rollback(tmp_path: Path) -> None:
    """In a freeze a passed hold waits; a gate's rollback still routes to 0 and stops the ramp."""
    env = tmp_path / "traffic.env"
    now = time.time()
    freeze = {"from": iso(now + 3600), "to": iso(now + 7200)}
    raw = config(tmp_path, route_percent(env), holds=["200ms", "1h", "200ms", "200ms"])
    raw["rollouts"]["boop"]["freeze"] = [freeze]
    offset = [0.0]

    async def body(daemon: Daemon) -> None:
        real = daemon.ramp.clock
        daemon.ramp.clock = lambda: real() + offset[0]
        await wait_until(lambda: rollout(daemon)["percent"] == 25, 10, "at 25 %")
        offset[0] = 5400.0  # the hour's hold has passed, inside the freeze
        await wait_until(lambda: "frozen until" in rollout(daemon)["reason"], 5, "frozen")
        await asyncio.sleep(0.5)
        assert (rollout(daemon)["percent"], rollout(daemon)["step"]) == (25, 1)
        VALUES["payments"] = 5.0
        await wait_until(lambda: rollout(daemon)["state"] == "rolled_back", 10, "rolled back")
        await wait_until(lambda: traffic(env) == "0", 10, "routed to 0")
        offset[0] = 9000.0  # after the freeze: still nothing is promoted
        VALUES["payments"] = 0.0
        await asyncio.sleep(0.5)
        assert (rollout(daemon)["state"], rollout(daemon)["percent"]) == ("rolled_back", 0)

    await serve(raw, body)
    assert traffic(env) == "0"


def iso(seconds: float) -> str:
    """RFC 3339 in Berlin's offset of the day, as an operator would write it."""
    return dt.datetime.fromtimestamp(seconds, ZoneInfo("Europe/Berlin")).isoformat()


async def test_a_reload_keeps_the_hold(tmp_path: Path) -> None:
    """SIGHUP's reload re-reads the file; the running hold keeps its start and its step."""
    env = tmp_path / "traffic.env"
    path = config_file(tmp_path, config(tmp_path, route_percent(env), hold="24h"))
    async with serving(assemble.load(path, registries=REGISTRIES), path, REGISTRIES) as daemon:
        await wait_until(lambda: rollout(daemon)["hold_remaining_s"] is not None, 10, "holding")
        saved = daemon.ramp.status()["boop"]
        started = RolloutLog(daemon.store).load("boop")
        assert started is not None
        path.write_text(path.read_text().replace("min_checks = 2", "min_checks = 3"))
        assert await daemon.reload()
        await asyncio.sleep(0.3)
        again = RolloutLog(daemon.store).load("boop")
        assert again is not None
        assert again.hold_started_at == started.hold_started_at
        assert (rollout(daemon)["step"], rollout(daemon)["percent"]) == (saved["step"], 5)
        assert rollout(daemon)["gates"]["payments"]["min_checks"] == 3
    assert promotions_in(tmp_path) == 1


async def test_a_reload_that_adds_a_rollout_starts_it(tmp_path: Path) -> None:
    """A daemon with no rollout idles its ramp; the reload that adds one starts it at once."""
    env = tmp_path / "traffic.env"
    full = config(tmp_path, route_percent(env), hold="24h")
    for monitor in full["monitors"].values():  # no gate check after the first pokes the ramp
        monitor["interval"] = "1h"
    bare = {key: value for key, value in full.items() if key != "rollouts"}
    path = config_file(tmp_path, bare)
    async with serving(assemble.load(path, registries=REGISTRIES), path, REGISTRIES) as daemon:
        await asyncio.sleep(1.5)  # longer than a tick: nothing to ramp, nothing happens
        assert daemon.status()["rollouts"] == {}
        config_file(tmp_path, full)
        assert await daemon.reload()
        await wait_until(lambda: env.exists() and traffic(env) == "5", 5, "the first step set")
        await wait_until(lambda: rollout(daemon)["hold_remaining_s"] is not None, 5, "holding")


def promotions_in(state_dir: Path) -> int:
    """Promotion incidents in the state store of ``state_dir``."""
    with Store.open(state_dir) as store:
        return sum(1 for i in store.incidents(limit=100) if i.event == "promote")


async def test_a_set_still_retrying_when_a_gate_rolls_back_is_refused(tmp_path: Path) -> None:
    """A set retried after a gate's rollback is refused: it never lands after the rollback.

    The routing API is down while 50 % is being set and the gate rolls back meanwhile.
    """
    async with Router() as router:
        router.unavailable.add("boop:2")
        set_action = {
            "type": "route.http",
            "url": f"http://127.0.0.1:{router.port}/routes/boop",
            "method": "PUT",
            "body": "{percent}",
        }
        raw = config(tmp_path, set_action, hold="200ms")

        async def body(daemon: Daemon) -> None:
            await wait_until(lambda: any(c[2] == "boop:2" for c in router.calls), 15, "setting 50")
            VALUES["payments"] = 5.0
            await wait_until(lambda: rollout(daemon)["state"] == "rolled_back", 10, "rolled back")
            router.unavailable.clear()  # the API is back: the next attempt would succeed
            tried = len(router.calls)
            setting = [i for i in daemon.store.incidents(limit=100) if i.details.get("step") == 2]
            await wait_until(lambda: daemon.store.incident(setting[0].id).finished_at, 15)
            step = daemon.store.incident(setting[0].id).steps[0]
            assert step.status == "failed"
            assert "not set: rollout boop" in step.detail
            assert rollout(daemon)["percent"] == 0
            assert len(router.calls) == tried  # refused before sending anything

        await serve(raw, body)
    assert (tmp_path / "traffic.env").read_text().strip().endswith("BOOP_TRAFFIC_PERCENT=0")
