"""max_rollbacks across a leader's SIGKILL: two daemons as processes on one real PostgreSQL.

Five monitors read one synthetic source (``boop``) whose outage starts at a known time, so
they roll back together under ``max_rollbacks`` 2: the leader releases two plans and holds
three. Each plan calls the receiver (``/start``), waits on a second synthetic source
(``gate``) whose in-flight count drops to 0 at a known time, then calls it again
(``/done``). The leader is SIGKILLed in that wait; the standby takes over, finishes the two
plans and keeps the three held. A sixth monitor (``late``, on its own source) breaches only
after the takeover, so the new leader's own gate decides on the count in the store.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import Receiver, alive, killed_after, payment_error_rate, post_control, role_of
from tests.pg import PASSWORD, PASSWORD_ENV, Postgres, ha_node
from tests.servers import Rollbackd, wait_for

pytestmark = pytest.mark.slow

MONITORS = 5
LIMIT = 2
HEALTHY = 6.0
"""Seconds before the outage: both daemons start within it."""
LATE = 4.0
"""Seconds into the outage that the ``late`` monitor's source breaks (after the takeover)."""
RELEASE = 6.0
"""Seconds into the outage that the plans' wait step ends (after the takeover)."""
STEPS = {"start": 0, "done": 2}
"""The receiver's paths and the plan step each one is (step 1 is the wait)."""


def scenario(start: float, hook: str) -> dict[str, Any]:
    """Sources, monitors and actions: ``MONITORS`` monitors on ``boop`` and one ``late``."""

    def outage_after(seconds: float) -> dict[str, Any]:
        phases = [{"kind": "healthy", "duration": f"{seconds}s"}, {"kind": "outage"}]
        return {"type": "synthetic", "seed": 3, "noise": 0, "start": start, "phases": phases}

    def monitor(source: str) -> dict[str, Any]:
        return {
            "interval": "250ms",
            "rollback_after": 2,
            "on_rollback": ["call-start", "hold", "call-done"],
            "rules": [payment_error_rate(source, "payment_error_rate", unit=None)],
        }

    # in-flight work: 40 while healthy, then down to 0 within 100 ms, and 0 from then on
    gate = [
        {"kind": "healthy", "duration": f"{HEALTHY + RELEASE}s"},
        {"kind": "degrading", "duration": "100ms"},
    ]
    monitors = {f"m{i}": monitor("boop") for i in range(MONITORS)}
    return {
        "sources": {
            "boop": outage_after(HEALTHY),
            "later": outage_after(HEALTHY + LATE),
            "gate": {"type": "synthetic", "seed": 3, "noise": 0, "start": start, "phases": gate},
        },
        "monitors": {**monitors, "late": monitor("later")},
        "actions": {
            "call-start": {"type": "alert.webhook", "url": f"{hook}/start"},
            "hold": {
                "type": "wait",
                "source": "gate",
                "query": "inflight_transactions",
                "poll": "100ms",
                "timeout": "40s",
            },
            "call-done": {"type": "alert.webhook", "url": f"{hook}/done"},
        },
    }


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    """The HTTP service the plans call."""
    with Receiver() as found:
        yield found


@pytest.fixture
def group(pg: Postgres, monkeypatch: pytest.MonkeyPatch) -> Iterator[list[Rollbackd]]:
    """Daemons a test starts; each is killed afterwards if still running."""
    monkeypatch.setenv(PASSWORD_ENV, PASSWORD)
    with killed_after() as started:
        yield started


def rollbacks(pg: Postgres, database: str) -> list[tuple[str, str, str | None, float | None]]:
    """``(id, monitor, waiting, finished_at)`` of every rollback incident, oldest first."""
    return [
        (str(i), str(m), w, f)
        for i, m, w, f in pg.sql(
            "SELECT id, monitor, waiting, finished_at FROM incidents WHERE event = 'rollback' "
            "ORDER BY opened_at, id",
            database,
        )
    ]


def released(pg: Postgres, database: str) -> int:
    """Rollback incidents that ``max_rollbacks`` counts: every one not waiting for approval."""
    return sum(1 for _, _, waiting, _ in rollbacks(pg, database) if waiting != "approval")


def assert_once(receiver: Receiver, incidents: list[str]) -> None:
    """Every HTTP step of ``incidents`` reached the receiver once, and nothing else did."""
    expected = {f"{i}:{step}": 1 for i in incidents for step in STEPS.values()}
    assert receiver.effects() == expected, receiver.requests
    for path, key, _ in receiver.requests:
        assert key.endswith(f":{STEPS[path]}"), (path, key)


def test_leader_killed_with_plans_released_and_held_the_new_leader_keeps_the_limit(
    tmp_path: Path, pg: Postgres, receiver: Receiver, group: list[Rollbackd]
) -> None:
    """SIGKILL the leader mid-plan with 2 plans released and 3 held under max_rollbacks 2.

    The new leader finishes the 2 (each effect once), keeps the 3 held, holds the monitor
    that breaches after the takeover, and releases nothing more until an operator approves.
    """
    database = pg.database()
    start = time.time()
    outage = start + HEALTHY
    tables = scenario(start, receiver.url)
    limit = {"max_rollbacks": {"count": LIMIT, "per": "1h"}}
    url = pg.url(database)
    a, b = (ha_node(tmp_path / n, url, n, tables, daemon_keys=limit) for n in ("a", "b"))
    group.extend([a, b])
    a.start()
    wait_for(lambda: role_of(a) == "leader", 10, 0.1, what="a leading")
    b.start()
    assert role_of(b) == "standby"
    assert time.time() < outage, "the daemons took too long to start for this scenario"

    def all_opened() -> bool:
        found = rollbacks(pg, database)
        return len(found) == MONITORS and receiver.paths().count("start") == LIMIT

    wait_for(all_opened, HEALTHY + 10, 0.05, what="the rollbacks opened and 2 plans started")
    time.sleep(0.3)  # in the wait step now; a third start would have come by now
    before = rollbacks(pg, database)
    ran = [i for i, _, waiting, _ in before if waiting is None]
    held = [i for i, _, waiting, _ in before if waiting == "approval"]
    assert (len(ran), len(held)) == (LIMIT, MONITORS - LIMIT), before
    assert sorted(k for k in receiver.calls) == sorted(f"{i}:0" for i in ran)
    a.kill()
    killed = time.time()
    wait_for(lambda: role_of(b) == "leader", 5, 0.05, what="b leading")
    took_over = time.time()
    assert took_over - killed < 3.0, f"takeover took {took_over - killed:.1f}s"
    assert took_over < outage + min(LATE, RELEASE), "the takeover came after the late events"

    # the late monitor breaches under the new leader, whose gate counts the stored releases
    wait_for(lambda: len(rollbacks(pg, database)) == MONITORS + 1, 10, 0.05, what="late opened")
    wait_for(
        lambda: all(f for i, _, _, f in rollbacks(pg, database) if i in ran),
        15,
        0.1,
        what="the released plans finished by b",
    )
    after = rollbacks(pg, database)
    late = [(i, w) for i, m, w, _ in after if m == "late"]
    assert late == [(late[0][0], "approval")], after
    held.append(late[0][0])
    assert_once(receiver, ran)
    killed_at = time.monotonic() - (time.time() - killed)
    assert all(receiver.arrivals(f"{i}:2")[0] > killed_at for i in ran)  # b did the done steps
    steps = pg.sql(
        "SELECT incident_id, step, status, interruptions FROM steps ORDER BY incident_id, step",
        database,
    )
    assert [s for s in steps if s[0] in ran] == [
        (i, s, "ok", int(s == 1)) for i in sorted(ran) for s in range(3)
    ]  # the wait step was interrupted once (by the kill), no other step ran twice
    assert {s[2] for s in steps if s[0] not in ran} == {"pending"}

    deadline = time.monotonic() + 3.0  # checks go on: nothing more is released, nothing runs
    while time.monotonic() < deadline:
        now = rollbacks(pg, database)
        assert len(now) == MONITORS + 1, now
        assert {i for i, _, w, _ in now if w == "approval"} == set(held), now
        assert released(pg, database) == LIMIT
        assert_once(receiver, ran)
        time.sleep(0.2)
    assert alive(b)
    status = b.status()
    assert status["role"] == "leader"
    assert sorted(w["id"] for w in status["waiting"]) == sorted(held)

    # held, not lost: an operator's approval on the new leader runs one, each effect once
    code, body = post_control(b, f"/approve/{held[0]}")
    assert code == 200, body
    wait_for(
        lambda: any(i == held[0] and f for i, _, _, f in rollbacks(pg, database)),
        10,
        0.1,
        what="the approved plan finished",
    )
    assert_once(receiver, [*ran, held[0]])
    assert released(pg, database) == LIMIT + 1
