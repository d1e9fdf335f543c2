"""Rollouts on PostgreSQL state: one daemon ramps; a pair fails over mid-hold and mid-promotion.

Real processes on a real PostgreSQL (``tests/pg.py``); the set action writes a real route
file shared by both nodes, and ``on_promote`` calls a webhook receiver that records each
idempotency key (``tests.helpers.Receiver``).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from rollbackd.engine import Check, Event, MonitorState, Outcome
from rollbackd.errors import DeposedError
from rollbackd.pgstate import PgState
from rollbackd.records import IncidentDraft
from rollbackd.rollouts import Phase, RolloutState
from rollbackd.stores import SqliteState, StateStore
from tests.helpers import Receiver, killed_after, post_control, role_of, rollout_tables, status_of
from tests.pg import PASSWORD, PASSWORD_ENV, Postgres, daemon_of, ha_node, lead
from tests.servers import Rollbackd, wait_for

pytestmark = pytest.mark.slow


@pytest.fixture
def started(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[Rollbackd]]:
    """Daemons a test starts; each is killed afterwards if still running."""
    monkeypatch.setenv(PASSWORD_ENV, PASSWORD)
    with killed_after() as daemons:
        yield daemons


@pytest.fixture
def hooks() -> Iterator[Receiver]:
    """A webhook answering at once."""
    with Receiver() as server:
        yield server


def node(
    tmp_path: Path,
    name: str,
    url: str,
    hooks: Receiver,
    *,
    holds: list[str],
    started: list[Rollbackd],
) -> Rollbackd:
    """A daemon ``name`` on the shared store: two healthy gates, 5 -> 25 -> 50 %."""
    env = tmp_path / "traffic.env"  # one route file: the nodes steer the same traffic
    steps = [5, 25, 50][: len(holds)]
    daemon = ha_node(tmp_path / name, url, name, rollout_tables(env, f"{hooks.url}/", steps, holds))
    started.append(daemon)
    return daemon


def leading_pair(
    tmp_path: Path, url: str, hooks: Receiver, *, holds: list[str], started: list[Rollbackd]
) -> tuple[Rollbackd, Rollbackd]:
    """Nodes ``a`` and ``b`` on ``url``: ``a`` started and waited for as the leader, then ``b``."""
    a = node(tmp_path, "a", url, hooks, holds=holds, started=started)
    b = node(tmp_path, "b", url, hooks, holds=holds, started=started)
    a.start()
    wait_for(lambda: role_of(a) == "leader", 10, 0.1, what="a leading")
    b.start()
    return a, b


def boop(daemon: Rollbackd) -> dict[str, Any] | None:
    """``rollouts.boop`` of the daemon's /status (None when it does not answer)."""
    status = status_of(daemon)
    return None if status is None else dict(status["rollouts"]["boop"])


def holding(daemon: Rollbackd, percent: int) -> dict[str, Any] | None:
    """The rollout, once it holds at ``percent`` with a hold running."""
    found = boop(daemon)
    ok = found and found["percent"] == percent and found["hold_remaining_s"] is not None
    return found if ok else None


def promotions(pg: Postgres, database: str) -> list[tuple[Any, ...]]:
    """``(step, action, status, attempts, interruptions)`` of every promotion's plan steps."""
    return pg.sql(
        "SELECT (i.details::json->>'step')::int, s.action, s.status, s.attempts, "
        "s.interruptions FROM incidents i JOIN steps s ON s.incident_id = i.id "
        "WHERE i.event = 'promote' ORDER BY 1, s.step",
        database,
    )


def percent_in(tmp_path: Path) -> str:
    """The route file's line."""
    return (tmp_path / "traffic.env").read_text().strip()


def test_a_rollout_ramps_on_postgresql_state(
    tmp_path: Path, pg: Postgres, hooks: Receiver, started: list[Rollbackd]
) -> None:
    """One daemon on PostgreSQL: 5 -> 25 -> 50 %, each promotion once; pause is fenced too."""
    database = pg.database()
    daemon = node(
        tmp_path, "a", pg.url(database), hooks, holds=["300ms", "2s", "300ms"], started=started
    )
    daemon.start()
    wait_for(lambda: holding(daemon, 25), 20, 0.1, what="holding at 25 %")
    assert post_control(daemon, "/rollouts/boop/pause")[0] == 200
    assert pg.sql("SELECT phase FROM rollouts WHERE name = 'boop'", database) == [("paused",)]
    assert post_control(daemon, "/rollouts/boop/resume")[0] == 200
    wait_for(lambda: (b := boop(daemon)) and b["state"] == "complete", 20, 0.1, what="complete")
    assert daemon.stop() == 0
    assert percent_in(tmp_path) == "BOOP_TRAFFIC_PERCENT=50"
    assert hooks.calls == ["boop:0", "boop:1", "boop:2"]
    assert promotions(pg, database) == [
        (step, action, "ok", 1, 0) for step in range(3) for action in ("route-percent", "team")
    ]
    ((phase, step, percent),) = pg.sql(
        "SELECT phase, step, percent FROM rollouts WHERE name = 'boop'", database
    )
    assert (phase, step, percent) == ("complete", 2, 50)


def test_leader_killed_mid_hold_standby_resumes_the_hold_and_promotes_once(
    tmp_path: Path, pg: Postgres, hooks: Receiver, started: list[Rollbackd]
) -> None:
    """SIGKILL the leader 2 s into an 8 s hold: the standby holds what was left, then promotes.

    Before, the standby shows the rollout from the store and refuses operations (503).
    """
    holds = ["300ms", "8s", "300ms"]
    a, b = leading_pair(tmp_path, pg.url(pg.database()), hooks, holds=holds, started=started)
    assert role_of(b) == "standby"
    wait_for(lambda: holding(a, 25), 20, 0.1, what="a holding at 25 %")
    seen = wait_for(lambda: holding(b, 25), 5, 0.1, what="the standby showing the hold")
    assert seen["state"] == "holding"
    assert seen["step"] == 1
    code, body = post_control(b, "/rollouts/boop/promote")
    assert code == 503, body
    assert "standby" in body
    time.sleep(2.0)
    before = holding(a, 25)
    assert before is not None
    a.kill()
    killed = time.monotonic()
    wait_for(lambda: role_of(b) == "leader", 5, 0.05, what="b taking over")
    after = holding(b, 25)
    elapsed = time.monotonic() - killed
    assert after is not None, boop(b)
    assert after["state"] == "holding"
    # Neither restarted nor skipped: what was left, less the time since the kill.
    assert after["hold_remaining_s"] <= before["hold_remaining_s"] - elapsed + 0.3
    assert after["hold_remaining_s"] > 0
    assert percent_in(tmp_path) == "BOOP_TRAFFIC_PERCENT=25"
    wait_for(lambda: (s := boop(b)) and s["state"] == "complete", 20, 0.1, what="complete")
    assert b.stop() == 0
    assert percent_in(tmp_path) == "BOOP_TRAFFIC_PERCENT=50"
    assert hooks.calls == ["boop:0", "boop:1", "boop:2"]


def test_leader_killed_mid_promotion_new_leader_finishes_it(
    tmp_path: Path, pg: Postgres, started: list[Rollbackd]
) -> None:
    """SIGKILL the leader mid-announcement of 50 %: the new leader resumes that promotion.

    With the same key; it sets nothing twice and opens no second promotion.
    """
    with Receiver(hold=lambda key: key == "boop:2", delay=3.0) as hooks:
        database = pg.database()
        holds = ["300ms", "300ms", "300ms"]
        a, b = leading_pair(tmp_path, pg.url(database), hooks, holds=holds, started=started)
        assert hooks.arrived.wait(20), "the 50 % announcement never arrived"
        a.kill()
        wait_for(lambda: role_of(b) == "leader", 5, 0.05, what="b taking over")
        wait_for(lambda: (s := boop(b)) and s["state"] == "complete", 20, 0.1, what="complete")
        assert b.stop() == 0
        calls = list(hooks.calls)
    assert percent_in(tmp_path) == "BOOP_TRAFFIC_PERCENT=50"
    # The interrupted announcement is attempted again with its own key; the rest once.
    assert calls == ["boop:0", "boop:1", "boop:2", "boop:2"]
    assert promotions(pg, database) == [
        (0, "route-percent", "ok", 1, 0),
        (0, "team", "ok", 1, 0),
        (1, "route-percent", "ok", 1, 0),
        (1, "team", "ok", 1, 0),
        (2, "route-percent", "ok", 1, 0),
        (2, "team", "ok", 2, 1),
    ]


# --- the store seam: the same answers from SQLite and PostgreSQL; fenced on PostgreSQL -----

HOLDING = RolloutState(step=1, confirmed=True, percent=25, hold_started_at=100.0, baseline=0)


def promotion() -> IncidentDraft:
    """The incident of a promotion to 50 %."""
    return IncidentDraft(
        monitor="rollout:boop",
        event=Event.PROMOTE,
        reason="rollout boop: 25% -> 50% (step 2)",
        mode="armed",
        opened_at=200.0,
        actions=("route-percent", "team"),
        details={"rollout": "boop", "run": 1, "step": 2, "idempotency_key": "boop:2"},
    )


async def exercise(store: StateStore) -> None:
    """What a ramp asks of its store, with the answers both stores must give."""
    assert await store.rollout("boop") is None
    assert await store.newest_check() == 0
    await store.save_rollout("boop", HOLDING, 150.0)
    assert await store.rollout("boop") == HOLDING
    for at, outcome in ((1.0, Outcome.OK), (2.0, Outcome.BREACH), (3.0, Outcome.OK)):
        checks = 1 + int(at)
        await store.commit_check(
            Check("payments", at, outcome, ()), MonitorState(checks=checks), 10
        )
    await store.flush()
    newest = await store.newest_check()
    assert newest > 0
    found = await store.gate_checks("payments", 0, 10)
    assert (found.ok, found.breaches, found.open_incident) == (2, 1, False)
    newest_two = await store.gate_checks("payments", 0, 2)  # only the newest ``history`` count
    assert (newest_two.ok, newest_two.breaches) == (1, 1)
    assert (await store.gate_checks("payments", newest, 10)).ok == 0
    stale = RolloutState(step=0, percent=5)
    assert await store.replace_rollout("boop", stale, HOLDING, 160.0) is False
    moving = RolloutState(step=2, percent=25, baseline=newest, run=1)
    opened = await store.replace_rollout("boop", HOLDING, moving, 200.0, promotion())
    assert isinstance(opened, str)
    saved = await store.rollout("boop")
    assert saved is not None
    assert (saved.step, saved.promoting, saved.baseline) == (2, opened, newest)
    record = await store.incident(opened)
    assert [s.action for s in record.steps] == ["route-percent", "team"]
    assert record.details["idempotency_key"] == "boop:2"
    paused = RolloutState(step=2, percent=25, phase=Phase.PAUSED, promoting=opened)
    assert await store.replace_rollout("boop", saved, paused, 210.0) is True
    assert await store.rollout("boop") == paused


async def test_the_rollout_store_answers_alike_on_sqlite_and_postgresql(
    tmp_path: Path, pg: Postgres, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Load, save, compare-and-replace with a promotion, gate checks: one behaviour."""
    sqlite = SqliteState.open(tmp_path)
    try:
        await exercise(sqlite)
    finally:
        await sqlite.close()
    monkeypatch.setenv(PASSWORD_ENV, PASSWORD)
    store = await PgState.open(daemon_of(pg.url(pg.database())))
    try:
        await lead(store)
        await exercise(store)
    finally:
        await store.close()


async def test_a_deposed_leader_changes_no_rollout(
    pg: Postgres, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Rollout writes check the generation in their transaction: a deposed leader's fail.

    Neither the state nor a promotion's incident is written; a standby's reads still work.
    """
    monkeypatch.setenv(PASSWORD_ENV, PASSWORD)
    database = pg.database()
    old = await PgState.open(daemon_of(pg.url(database)))
    new = await PgState.open(daemon_of(pg.url(database)))
    try:
        with pytest.raises(DeposedError, match="standby"):
            await old.save_rollout("boop", HOLDING, 1.0)
        await lead(old)
        await old.save_rollout("boop", HOLDING, 1.0)
        second = await lead(new)
        moving = RolloutState(step=2, percent=25)
        with pytest.raises(DeposedError, match=rf"generation {second} leads"):
            await old.replace_rollout("boop", HOLDING, moving, 2.0, promotion())
        assert not old.leading
        with pytest.raises(DeposedError):
            await old.save_rollout("boop", moving, 3.0)
        assert pg.sql("SELECT count(*) FROM incidents", database) == [(0,)]
        assert await old.rollout("boop") == HOLDING  # read-only, as a standby's /status
        assert isinstance(await new.replace_rollout("boop", HOLDING, moving, 4.0, promotion()), str)
    finally:
        await old.close()
        await new.close()
