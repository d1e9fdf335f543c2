"""High availability as operators meet it: two daemons as processes on one real PostgreSQL.

A synthetic source with a fixed ``start`` gives both daemons the same scenario (healthy, then
an outage at a known time); the plan's HTTP steps go to a receiver counting requests per
``Idempotency-Key``, and its ``wait`` step lasts until in-flight work drains (10 s into the
outage), long enough to kill a leader in the middle of it.
"""

from __future__ import annotations

import re
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import (
    Receiver,
    alive,
    killed_after,
    payment_error_rate,
    post_control,
    role_of,
    status_of,
)
from tests.pg import PASSWORD, PASSWORD_ENV, Postgres, ha_node, running
from tests.servers import Rollbackd, http_get, wait_for

pytestmark = pytest.mark.slow


def scenario(start: float, healthy: float, interval: str, hook: str) -> dict[str, Any]:
    """The pair's sources, monitors and actions: healthy for ``healthy`` s from ``start``.

    Then an outage, rolled back by a plan of four steps: the flag off, a ``wait`` until
    in-flight transactions drain, the route to legacy, a page; its HTTP steps go to ``hook``.
    """
    phases = [{"kind": "healthy", "duration": f"{healthy}s"}, {"kind": "outage"}]
    payments = {
        "interval": interval,
        "rollback_after": 3,
        "on_rollback": ["stop-traffic", "drain", "route-legacy", "page"],
        "rules": [payment_error_rate("boop", "payment_error_rate", unit=None)],
    }
    return {
        "sources": {
            "boop": {"type": "synthetic", "seed": 3, "noise": 0, "start": start, "phases": phases}
        },
        "monitors": {"payments": payments},
        "actions": {
            "stop-traffic": {"type": "flag.http", "url": f"{hook}/flag"},
            "drain": {
                "type": "wait",
                "source": "boop",
                "query": "inflight_transactions",
                "poll": "200ms",
                "timeout": "40s",
            },
            "route-legacy": {"type": "route.http", "url": f"{hook}/route"},
            "page": {"type": "alert.webhook", "url": f"{hook}/alert"},
        },
    }


STEPS = {"flag": 0, "route": 2, "alert": 3}
"""The receiver's paths and the plan step each one is."""


@pytest.fixture(scope="module")
def pg() -> Iterator[Postgres]:
    """One PostgreSQL for the module; every statement is logged with its transaction.

    The prefix names the session and virtual transaction (``%c/%v``), so a test can tell which
    transaction a write belongs to and when that transaction checked the generation.
    """
    with running() as server:
        server.sql("ALTER SYSTEM SET log_statement = 'all'")
        server.sql("ALTER SYSTEM SET log_line_prefix = '%m [%a] <%c/%v> '")
        server.sql("SELECT pg_reload_conf()")
        yield server


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    """The HTTP service the plan's steps call."""
    found = Receiver()
    yield found
    found.stop()


@pytest.fixture
def group(
    tmp_path: Path, pg: Postgres, monkeypatch: pytest.MonkeyPatch
) -> Iterator[list[Rollbackd]]:
    """Daemons a test starts; each is killed afterwards if still running."""
    monkeypatch.setenv(PASSWORD_ENV, PASSWORD)
    with killed_after() as started:
        yield started


class Pair:
    """Two daemons, ``a`` and ``b``, on one database and one scenario."""

    def __init__(
        self,
        tmp_path: Path,
        pg: Postgres,
        receiver: Receiver,
        started: list[Rollbackd],
        *,
        healthy: float,
        interval: str = "500ms",
    ) -> None:
        self.pg, self.database = pg, pg.database()
        self.start_at = time.time()
        self.outage_at = self.start_at + healthy
        self.daemons: dict[str, Rollbackd] = {}
        tables = scenario(self.start_at, healthy, interval, receiver.url)
        for node in ("a", "b"):
            daemon = ha_node(tmp_path / node, pg.url(self.database), node, tables)
            started.append(daemon)
            self.daemons[node] = daemon

    def start(self, *nodes: str) -> None:
        """Start these daemons (in order), each waited for until /health answers."""
        for node in nodes:
            self.daemons[node].start()

    def status(self, node: str) -> dict[str, Any] | None:
        """GET /status of ``node`` (None if it does not answer)."""
        return status_of(self.daemons[node])

    def role(self, node: str) -> str | None:
        """``leader`` / ``standby`` of a running daemon."""
        return role_of(self.daemons[node])

    def leader(self, timeout: float = 10.0) -> str:
        """Wait until exactly one running daemon leads; its node."""

        def one() -> str | None:
            roles = {n: self.role(n) for n, d in self.daemons.items() if alive(d)}
            leaders = [n for n, r in roles.items() if r == "leader"]
            return leaders[0] if len(leaders) == 1 else None

        found: str = wait_for(one, timeout, 0.1, what="one leader")
        return found

    def sql(self, statement: str) -> list[tuple[Any, ...]]:
        """A statement on the pair's database."""
        return self.pg.sql(statement, self.database)

    def rollbacks(self) -> list[tuple[Any, ...]]:
        """``(id, finished_at)`` of the rollback incidents."""
        return self.sql("SELECT id, finished_at FROM incidents WHERE event = 'rollback'")

    def finished(self) -> bool:
        """One rollback incident, its plan finished."""
        found = self.rollbacks()
        return len(found) == 1 and found[0][1] is not None


def other(node: str) -> str:
    """The other node of the pair."""
    return "b" if node == "a" else "a"


WRITE = re.compile(r"LOG:  (statement|execute [^:]*): (INSERT|UPDATE|DELETE)\b")


TRANSACTION = re.compile(r"<([0-9a-f.]+/[0-9/]+)>")
"""A log line's session and virtual transaction id (the ``log_line_prefix`` above)."""


def fenced_after(lines: list[str], node: str, moment: int) -> list[str]:
    """``node``'s writes in transactions that checked the generation after line ``moment``.

    ``moment`` is the takeover's COMMIT (``committed``).

    Statements are logged when they start, so a write of the old leader may follow the new
    leader's ``UPDATE leadership`` in the log and still be fenced correctly: its transaction
    read the generation ``FOR SHARE`` before that UPDATE (which then waited for it to commit).
    A transaction whose generation check came after the takeover must write nothing.
    """
    fenced: dict[str, int] = {}
    for i, line in enumerate(lines):
        found = TRANSACTION.search(line)
        if found and "FROM leadership" in line and "FOR SHARE" in line:
            fenced.setdefault(found.group(1), i)
    late = []
    for i, line in enumerate(lines):
        found = TRANSACTION.search(line)
        if i > moment and line in writes([line], node):
            checked = fenced.get(found.group(1)) if found else None
            if checked is None or checked > moment:
                late.append(line)
    return late


def committed(lines: list[str], update: int) -> int:
    """The line of the COMMIT of the transaction whose statement is line ``update``.

    The new generation is in place from there: until then the takeover's UPDATE may still
    wait for the old leader's transactions that read the generation ``FOR SHARE`` (and new
    ones can still take that share lock while it waits), which commit before it.
    """
    found = TRANSACTION.search(lines[update])
    assert found, "each log line names its transaction"
    return next(
        i
        for i in range(update + 1, len(lines))
        if f"<{found.group(1)}>" in lines[i] and "COMMIT" in lines[i]
    )


def writes(lines: list[str], node: str) -> list[str]:
    """The data-changing statements ``node``'s store connections ran (peers beats left out)."""
    return [
        line
        for line in lines
        if f"[rollbackd:{node}]" in line and WRITE.search(line) and "INTO peers" not in line
    ]


def assert_exactly_once(receiver: Receiver, incident: str) -> None:
    """Every HTTP step of ``incident`` reached the receiver once, with its own key."""
    expected = {f"{incident}:{step}": 1 for step in STEPS.values()}
    assert receiver.effects() == expected, receiver.requests
    for path, key, _ in receiver.requests:
        assert key == f"{incident}:{STEPS[path]}"


def test_leader_killed_during_wait_step_standby_finishes_the_plan(
    tmp_path: Path, pg: Postgres, receiver: Receiver, group: list[Rollbackd]
) -> None:
    """SIGKILL the leader in the plan's wait step: the standby finishes it, each effect once."""
    pair = Pair(tmp_path, pg, receiver, group, healthy=6.0)
    pair.start("a")
    assert pair.leader() == "a"
    pair.start("b")
    assert pair.role("b") == "standby"
    wait_for(lambda: receiver.paths() == ["flag"], 20, 0.05, what="the plan's first step")
    time.sleep(1.0)  # in the wait step now: the outage drains for 10 s
    pair.daemons["a"].kill()
    killed = time.time()
    assert pair.leader(5.0) == "b"
    took_over = time.time() - killed
    assert took_over < 3.0, f"takeover took {took_over:.1f}s"
    wait_for(pair.finished, 30, 0.2, what="the plan finished by b")
    ((incident, _),) = pair.rollbacks()
    assert_exactly_once(receiver, incident)
    steps = pair.sql(
        f"SELECT step, status, interruptions FROM steps WHERE incident_id = '{incident}' "
        "ORDER BY step"
    )
    assert steps == [(0, "ok", 0), (1, "ok", 1), (2, "ok", 0), (3, "ok", 0)]
    status = pair.status("b")
    assert status is not None
    assert status["generation"] == 2
    assert status["monitors"]["payments"]["state"] == "rolled_back"
    metrics = http_get(f"http://127.0.0.1:{pair.daemons['b'].port}/metrics")[1].decode()
    assert re.search(r"^rollbackd_leader 1\.0$", metrics, re.MULTILINE)


def test_lock_connection_terminated_old_leader_stops_and_never_writes_again(
    tmp_path: Path, pg: Postgres, receiver: Receiver, group: list[Rollbackd]
) -> None:
    """pg_terminate_backend on the leader's lock: it stands by within one interval.

    The server sees no write of the old leader's after the new generation; the new leader
    rolls back, each effect once.
    """
    pair = Pair(tmp_path, pg, receiver, group, healthy=12.0, interval="1s")
    earlier = len(pg.log_lines())  # the module's server logged the tests before this one
    pair.start("a", "b")
    leader = pair.leader()
    follower = other(leader)
    wait_for(
        lambda: writes(pg.log_lines()[earlier:], leader), 10, 0.1, what="the leader's first commit"
    )
    (pid,) = pair.sql(
        f"SELECT pid FROM pg_stat_activity WHERE application_name = 'rollbackd-lock:{leader}'"
    )[0]
    pg.sql(f"SELECT pg_terminate_backend({pid})")
    terminated = time.time()
    wait_for(lambda: pair.role(leader) == "standby", 1.0, 0.05, what="the old leader standing by")
    assert time.time() - terminated <= 1.0 + 0.2
    assert pair.leader(5.0) == follower
    status = pair.status(leader)
    assert status is not None
    assert status["role"] == "standby"
    assert {p["node"] for p in status["peers"]} == {"a", "b"}
    metrics = http_get(f"http://127.0.0.1:{pair.daemons[leader].port}/metrics")[1].decode()
    assert re.search(r"^rollbackd_leader 0\.0$", metrics, re.MULTILINE)
    code, body = post_control(pair.daemons[leader], "/rearm/payments")
    assert code == 503
    assert "is a standby" in body

    def names_the_leader() -> bool:  # once its next beat has read the new leader's row
        code, body = post_control(pair.daemons[leader], "/rearm/payments")
        assert code == 503
        return f"send this to the leader, {follower} (generation" in body

    wait_for(names_the_leader, 5, 0.2, what="the standby's refusal naming the leader")
    wait_for(pair.finished, 40, 0.2, what="the rollback by the new leader")
    ((incident, _),) = pair.rollbacks()
    assert_exactly_once(receiver, incident)
    time.sleep(1.5)  # a late write of the old leader would be in the log by now
    lines = pg.log_lines()[earlier:]
    takeover = next(
        i
        for i, line in enumerate(lines)
        if f"[rollbackd-lock:{follower}]" in line and "UPDATE leadership SET generation" in line
    )
    assert writes(lines[:takeover], leader), "the log shows the old leader's writes before"
    assert TRANSACTION.search(lines[takeover]), "each log line names its transaction"
    late = fenced_after(lines, leader, committed(lines, takeover))
    assert late == [], late


def test_both_daemons_restarted_together_nothing_fires_twice(
    tmp_path: Path, pg: Postgres, receiver: Receiver, group: list[Rollbackd]
) -> None:
    """Both killed in the middle of the plan and started again together: each effect once."""
    pair = Pair(tmp_path, pg, receiver, group, healthy=6.0)
    pair.start("a", "b")
    pair.leader()
    wait_for(lambda: receiver.paths() == ["flag"], 20, 0.05, what="the plan's first step")
    time.sleep(0.5)
    for daemon in pair.daemons.values():
        daemon.kill()
    starters = [threading.Thread(target=d.start) for d in pair.daemons.values()]
    for thread in starters:
        thread.start()
    for thread in starters:
        thread.join(30)
    pair.leader()
    wait_for(pair.finished, 30, 0.2, what="the plan finished after the restart")
    time.sleep(2.0)  # latched: no second rollback, no second call
    ((incident, _),) = pair.rollbacks()
    assert_exactly_once(receiver, incident)
    for node in ("a", "b"):
        status = pair.status(node)
        assert status is not None
        assert status["monitors"]["payments"]["state"] == "rolled_back"


def test_postgres_restarted_both_reconnect_no_false_rollback(
    tmp_path: Path, pg: Postgres, receiver: Receiver, group: list[Rollbackd]
) -> None:
    """PostgreSQL restarts while all is healthy: both reconnect, no false rollback.

    One of them leads again with a newer generation; the later outage fires once.
    """
    pair = Pair(tmp_path, pg, receiver, group, healthy=16.0)
    pair.start("a", "b")
    pair.leader()
    first = pair.status("a")
    assert first is not None
    pg.restart(down_for=2.0)
    wait_for(
        lambda: all((s := pair.status(n)) and s["generation"] >= 2 for n in ("a", "b")),
        15,
        0.2,
        what="both daemons on a newer generation",
    )
    pair.leader()
    assert pair.rollbacks() == []
    assert receiver.requests == []
    assert time.time() < pair.outage_at, "the restart took too long for this scenario"
    wait_for(pair.finished, 40, 0.2, what="the rollback after the outage")
    time.sleep(1.0)
    ((incident, _),) = pair.rollbacks()
    assert_exactly_once(receiver, incident)


def test_paused_leader_is_evicted_and_never_writes_after(
    tmp_path: Path, pg: Postgres, receiver: Receiver, group: list[Rollbackd]
) -> None:
    """SIGSTOP the leader in the wait step (a paused VM): its session lives on, its lease not.

    The standby evicts it, finishes the plan; resumed, the old leader stands by without a
    write or a call: each effect once.
    """
    pair = Pair(tmp_path, pg, receiver, group, healthy=6.0)
    earlier = len(pg.log_lines())  # the module's server logged the tests before this one
    pair.start("a", "b")
    leader = pair.leader()
    follower = other(leader)
    wait_for(lambda: receiver.paths() == ["flag"], 20, 0.05, what="the plan's first step")
    time.sleep(0.5)  # in the wait step now
    paused = pair.daemons[leader].process
    assert paused is not None
    paused.send_signal(signal.SIGSTOP)
    try:
        wait_for(lambda: pair.role(follower) == "leader", 5.0, 0.1, what="the eviction")
        wait_for(pair.finished, 30, 0.2, what="the plan finished by the new leader")
    finally:
        paused.send_signal(signal.SIGCONT)
    wait_for(lambda: pair.role(leader) == "standby", 5.0, 0.1, what="the old leader standing by")
    time.sleep(2.0)  # anything the old leader still tried is in the log and the receiver now
    ((incident, _),) = pair.rollbacks()
    assert_exactly_once(receiver, incident)
    lines = pg.log_lines()[earlier:]
    takeover = max(
        i
        for i, line in enumerate(lines)
        if f"[rollbackd-lock:{follower}]" in line and "UPDATE leadership SET generation" in line
    )
    assert writes(lines[:takeover], leader)
    assert fenced_after(lines, leader, committed(lines, takeover)) == []
    assert b"leader_evicted" in pair.daemons[follower].log_bytes()


def test_fenced_after_tells_a_late_write_from_a_fenced_one_logged_late() -> None:
    """The log reading of the tests above: what counts as a write after the takeover."""
    fence = "execute <unnamed>: SELECT generation FROM leadership WHERE id = 1 FOR SHARE"
    insert = "execute <unnamed>: INSERT INTO checks (monitor) VALUES ($1)"
    lines = [
        f"t0 [rollbackd:a] <aa.1/3/7> LOG:  {fence}",  # fenced before the takeover
        "t1 [rollbackd-lock:b] <bb.2/4/9> LOG:  statement: UPDATE leadership SET generation = 2",
        f"t2 [rollbackd:a] <aa.1/3/8> LOG:  {fence}",  # shares the row while the UPDATE waits
        "t3 [rollbackd-lock:b] <bb.2/4/9> LOG:  statement: COMMIT",
        f"t4 [rollbackd:a] <aa.1/3/7> LOG:  {insert}",  # logged late, fenced in time: fine
        f"t5 [rollbackd:a] <aa.1/3/8> LOG:  {insert}",  # fine too: it commits before t3's
        f"t6 [rollbackd:a] <aa.1/3/11> LOG:  {fence}",  # fenced after the commit: no write
        f"t7 [rollbackd:a] <aa.1/3/11> LOG:  {insert}",
        f"t8 [rollbackd:a] <aa.1/3/12> LOG:  {insert}",  # never fenced at all
    ]
    assert committed(lines, 1) == 3
    assert fenced_after(lines, "a", committed(lines, 1)) == [lines[7], lines[8]]
