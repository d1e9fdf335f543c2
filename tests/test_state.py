"""The SQLite store: round-trips, restarts mid-streak and mid-latch, crashes, incidents, schema."""

from __future__ import annotations

import hashlib
import re
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from dataclasses import replace
from pathlib import Path

import pytest

from rollbackd.config import RuleConfig
from rollbackd.engine import Check, Event, MonitorState, Outcome, Phase, Policy, advance, decide
from rollbackd.errors import StateError
from rollbackd.readings import error, labels_of, no_data, ok
from rollbackd.records import IncidentDraft
from rollbackd.schema import SCHEMA_VERSION
from rollbackd.state import TRIM_SLACK, Store
from rollbackd.verdicts import evaluate_rule

POLICY = Policy(
    rollback_after=5,
    alert_after=None,
    blind_after=3,
    on_blind="alert",
    failure_limit=None,
    failure_window=60.0,
)
RULE = RuleConfig(name="err", source="prom", query="q", above=1.0, unit="%")
T0 = 1_764_073_381.0  # 2025-11-25T12:23:01Z


def check(monitor: str, at: float, *values: float) -> Check:
    """Build a check of RULE over one labelled series per value."""
    readings = [ok(v, at, labels_of({"i": str(i)})) for i, v in enumerate(values)]
    return decide(monitor, evaluate_rule(RULE, readings), at)


def draft(monitor: str = "payments", at: float = T0, n: int = 3) -> IncidentDraft:
    """Build an incident draft with ``n`` actions."""
    return IncidentDraft(
        monitor=monitor,
        event="rollback",
        reason="5 consecutive failing checks",
        mode="armed",
        opened_at=at,
        actions=tuple(f"action-{i}" for i in range(n)),
        details={"trigger": {"value": 2.5, "labels": {"region": "eu"}}, "checks": [1, 2]},
    )


def feed(store: Store, monitor: str, state: MonitorState, outcomes: str, at: float) -> MonitorState:
    """Commit one check per letter (b = breach, o = ok), opening an incident on rollback."""
    for i, letter in enumerate(outcomes):
        c = check(monitor, at + i, 2.5 if letter == "b" else 0.5)
        transition = advance(state, c, POLICY)
        incident = draft(monitor, at + i) if Event.ROLLBACK in transition.events else None
        new_id = store.commit_check(c, transition.state, 100, incident)
        state = (
            transition.state if new_id is None else replace(transition.state, incident_id=new_id)
        )
    return state


@pytest.fixture
def store(tmp_path: Path) -> Store:
    """Open a fresh store in a temporary state directory."""
    return Store.open(tmp_path / "state")


def test_checks_round_trip_with_every_kind_of_result(store: Store) -> None:
    """A committed check comes back equal: labels, infinities, no data, errors, reasons."""
    results = [
        *evaluate_rule(RULE, [ok(float("inf"), T0, labels_of({"zone": "é/ü"})), ok(0.5, T0)]),
        *evaluate_rule(RULE, [no_data("stale", T0), error("connection refused", T0)]),
    ]
    c = decide("payments", results, T0)
    store.commit_check(c, MonitorState(checks=1), 10)
    assert store.recent_checks("payments", 5) == [c]
    assert store.recent_checks("other", 5) == []


def test_monitor_state_round_trips_every_field(store: Store) -> None:
    """Every field of MonitorState is saved and read back exactly."""
    state = MonitorState(
        phase=Phase.BLIND,
        consecutive_failures=2,
        consecutive_errors=7,
        alerted=True,
        blind_alerted=True,
        failure_times=(T0, T0 + 0.25),
        incident_id="inc-1",
        checks=42,
        last_check_at=T0 + 0.25,
        last_outcome=Outcome.INCONCLUSIVE,
    )
    assert store.monitor_state("auth") is None
    store.save_state("auth", state)
    store.save_state("payments", MonitorState())
    assert store.monitor_state("auth") == state
    assert store.monitor_names() == ["auth", "payments"]


def test_history_keeps_the_newest_checks_per_monitor(store: Store) -> None:
    """Each monitor keeps only its newest ``history`` checks, oldest first, independently."""
    for i in range(10):
        store.commit_check(check("a", T0 + i, 0.5), MonitorState(checks=i + 1), 3)
        store.commit_check(check("b", T0 + i, 0.5), MonitorState(checks=i + 1), 100)
    assert [c.at for c in store.recent_checks("a", 100)] == [T0 + 7, T0 + 8, T0 + 9]
    assert [c.at for c in store.recent_checks("a", 2)] == [T0 + 8, T0 + 9]
    assert len(store.recent_checks("b", 100)) == 10


def test_reopen_mid_streak_restores_the_counters(tmp_path: Path) -> None:
    """After a restart the failure streak continues where it was: 3 + 2 breaches roll back."""
    with Store.open(tmp_path) as first:
        state = feed(first, "payments", MonitorState(), "obbb", T0)
    with Store.open(tmp_path) as second:
        restored = second.monitor_state("payments")
        assert restored == state
        assert (restored.phase, restored.consecutive_failures, restored.checks) == (
            Phase.FAILING,
            3,
            4,
        )
        latched = feed(second, "payments", restored, "bb", T0 + 10)
    assert latched.phase is Phase.ROLLED_BACK


def test_reopen_mid_latch_restores_latch_and_incident(tmp_path: Path) -> None:
    """A latch and its incident are written together and both survive a restart."""
    with Store.open(tmp_path) as first:
        state = feed(first, "payments", MonitorState(), "bbbbb", T0)
    assert state.incident_id is not None
    with Store.open(tmp_path) as second:
        restored = second.monitor_state("payments")
        assert restored == state
        assert [i.id for i in second.unfinished_incidents()] == [state.incident_id]
        after = feed(second, "payments", restored, "oobo", T0 + 10)
        assert (after.checks, after.last_check_at, after.last_outcome) == (9, T0 + 13, Outcome.OK)
        assert replace(after, checks=5, last_check_at=T0 + 4, last_outcome=Outcome.BREACH) == state
        assert second.monitor_state("payments") == after


def test_commit_check_opens_the_incident_in_the_same_write(store: Store) -> None:
    """commit_check with a draft returns the id, saves it in the state and creates pending steps."""
    incident_id = store.commit_check(check("payments", T0, 2.5), MonitorState(), 10, draft())
    assert incident_id is not None
    saved = store.monitor_state("payments")
    assert saved is not None
    assert saved.incident_id == incident_id
    record = store.incident(incident_id)
    assert [(s.step, s.action, s.status, s.attempts) for s in record.steps] == [
        (0, "action-0", "pending", 0),
        (1, "action-1", "pending", 0),
        (2, "action-2", "pending", 0),
    ]
    assert record.details == draft().details


def test_commit_check_is_all_or_nothing(store: Store) -> None:
    """A commit failing half-way (a step it cannot store) leaves no check, state or incident."""
    before = MonitorState(phase=Phase.FAILING, consecutive_failures=4, checks=4)
    store.commit_check(check("payments", T0, 2.5), before, 10)
    broken = replace(draft(), actions=("stop-traffic", object()))  # type: ignore[arg-type]
    with pytest.raises(StateError, match="committing a check failed"):
        store.commit_check(check("payments", T0 + 1, 2.5), MonitorState(checks=5), 10, broken)
    assert store.monitor_state("payments") == before
    assert [c.at for c in store.recent_checks("payments", 10)] == [T0]
    assert store.incidents() == []


def test_incident_and_step_lifecycle(store: Store) -> None:
    """Steps go pending -> running -> ok/failed/would_run, attempts counted, then finished."""
    incident_id = store.open_incident(draft())
    assert store.step_started(incident_id, 0, T0 + 1) == 1
    assert store.incident(incident_id).steps[0].status == "running"
    store.step_finished(incident_id, 0, "ok", "flag set", T0 + 2)
    assert store.step_started(incident_id, 1, T0 + 3) == 1
    assert store.step_started(incident_id, 1, T0 + 4) == 2
    store.step_finished(incident_id, 1, "failed", "HTTP 503 after 2 attempts", T0 + 5)
    store.step_finished(incident_id, 2, "would_run", "dry-run", T0 + 6)
    assert [i.id for i in store.unfinished_incidents()] == [incident_id]
    store.finish_incident(incident_id, T0 + 7)
    store.finish_incident(incident_id, T0 + 99)
    record = store.incident(incident_id)
    assert (record.monitor, record.event, record.mode, record.finished_at) == (
        "payments",
        "rollback",
        "armed",
        T0 + 7,
    )
    assert [
        (s.status, s.attempts, s.started_at, s.finished_at, s.detail) for s in record.steps
    ] == [
        ("ok", 1, T0 + 1, T0 + 2, "flag set"),
        ("failed", 2, T0 + 4, T0 + 5, "HTTP 503 after 2 attempts"),
        ("would_run", 0, None, T0 + 6, "dry-run"),
    ]
    assert store.unfinished_incidents() == []


def test_incidents_are_listed_newest_first_per_monitor(store: Store) -> None:
    """incidents() lists newest first, filtered by monitor and limited."""
    ids = [store.open_incident(draft("payments" if i % 2 else "auth", T0 + i)) for i in range(6)]
    assert [i.id for i in store.incidents()] == ids[::-1]
    assert [i.id for i in store.incidents("payments", limit=2)] == [ids[5], ids[3]]
    assert [i.id for i in store.unfinished_incidents()] == ids


def test_incident_ids_are_readable_and_unique(store: Store) -> None:
    """Ids read as UTC time, monitor and a random suffix, and never collide in one second."""
    ids = {store.open_incident(draft("payments", T0, n=0)) for _ in range(300)}
    assert len(ids) == 300
    assert all(re.fullmatch(r"20251125T122301Z-payments-[0-9a-f]{4,}", i) for i in ids)
    odd = store.open_incident(draft("eu west/payments", T0, n=0))
    assert odd.startswith("20251125T122301Z-eu-west-payments-")


def test_misuse_raises_state_error(store: Store) -> None:
    """Unknown incidents or steps and non-final statuses are StateErrors that say what is wrong."""
    incident_id = store.open_incident(draft(n=1))
    with pytest.raises(StateError, match="no incident 'nope'"):
        store.incident("nope")
    with pytest.raises(StateError, match="has no step 5"):
        store.step_started(incident_id, 5, T0)
    with pytest.raises(StateError, match="has no step 5"):
        store.step_finished(incident_id, 5, "ok", "", T0)
    with pytest.raises(StateError, match="not final"):
        store.step_finished(incident_id, 0, "running", "", T0)
    with pytest.raises(StateError, match="no incident"):
        store.finish_incident("nope", T0)
    store.close()
    with pytest.raises(StateError, match=r"state\.db"):
        store.monitor_state("payments")


def test_fresh_store_is_wal_at_the_current_schema(tmp_path: Path) -> None:
    """A new state.db is created with the directory, in WAL mode, at the current schema."""
    Store.open(tmp_path / "a" / "b").close()
    db = sqlite3.connect(tmp_path / "a" / "b" / "state.db")
    try:
        assert db.execute("PRAGMA journal_mode").fetchone() == ("wal",)
        assert db.execute("SELECT version FROM schema_version").fetchall() == [(SCHEMA_VERSION,)]
    finally:
        db.close()


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_newer_schema_is_refused_untouched(tmp_path: Path) -> None:
    """A database from a newer rollbackd raises StateError naming the file; it is not modified."""
    Store.open(tmp_path).close()
    db = sqlite3.connect(tmp_path / "state.db")
    db.execute("UPDATE schema_version SET version = ?", (SCHEMA_VERSION + 1,))
    db.commit()
    db.close()
    before = _digest(tmp_path / "state.db")
    with pytest.raises(StateError, match=r"state\.db has schema version \d+, newer"):
        Store.open(tmp_path)
    assert _digest(tmp_path / "state.db") == before


@pytest.mark.parametrize(
    "content",
    [b"this is not a database\n" * 200, b"SQLite format 3\x00" + b"\xff" * 4000],
    ids=["text", "bad-header"],
)
def test_corrupt_file_is_refused_untouched(tmp_path: Path, content: bytes) -> None:
    """A garbage state.db raises StateError with the path and what to do; it is not reset."""
    (tmp_path / "state.db").write_bytes(content)
    with pytest.raises(StateError, match=r"state\.db cannot be read .*move it aside"):
        Store.open(tmp_path)
    assert (tmp_path / "state.db").read_bytes() == content


def test_unusable_paths_say_what_to_check(tmp_path: Path) -> None:
    """A state_dir that is a file, or a state.db that is a directory, gives a StateError hint."""
    (tmp_path / "file").write_text("x")
    with pytest.raises(StateError, match="cannot create state directory"):
        Store.open(tmp_path / "file")
    (tmp_path / "dir" / "state.db").mkdir(parents=True)
    with pytest.raises(StateError, match=r"cannot be opened .*can read and write it"):
        Store.open(tmp_path / "dir")


def test_foreign_sqlite_database_is_refused(tmp_path: Path) -> None:
    """An SQLite file that is not a rollbackd store is refused, not migrated."""
    db = sqlite3.connect(tmp_path / "state.db")
    db.execute("CREATE TABLE users (name TEXT)")
    db.commit()
    db.close()
    with pytest.raises(StateError, match="not a rollbackd state store"):
        Store.open(tmp_path)


CHILD = textwrap.dedent(
    """
    import random, sys, time
    from dataclasses import replace
    from pathlib import Path
    from rollbackd.config import RuleConfig
    from rollbackd.engine import Event, MonitorState, Policy, advance, decide
    from rollbackd.verdicts import evaluate_rule
    from rollbackd.readings import labels_of, ok
    from rollbackd.records import IncidentDraft
    from rollbackd.state import TRIM_SLACK, Store

    store = Store.open(Path(sys.argv[1]))
    rule = RuleConfig(name="err", source="prom", query="q", above=1.0)
    policy = Policy(4, 2, 3, "alert", None, 60.0)
    rng = random.Random(7)
    states = {f"m{i}": MonitorState() for i in range(8)}
    at = 0.0
    while True:
        for name, state in states.items():
            at += 1.0
            if at > 150:  # then slowly: quiet checks reach disk up to 1 s late, and the
                time.sleep(0.01)  # kill must land while monitors are in different phases
            values = [rng.choice([0.5, 0.5, 0.5, 2.5, float("nan")]) for _ in range(2)]
            readings = [ok(v, at, labels_of({"s": str(j)})) for j, v in enumerate(values)]
            check = decide(name, evaluate_rule(rule, readings), at)
            t = advance(state, check, policy)
            draft = None
            if t.events:
                draft = IncidentDraft(name, str(t.events[-1]), t.reason, "armed", at,
                                      ("a", "b"), {"at": at})
            new = store.commit_check(check, t.state, 100000, draft)
            states[name] = t.state if new is None else replace(t.state, incident_id=new)
    """
)


def test_sigkill_mid_commits_leaves_a_consistent_store(tmp_path: Path) -> None:
    """A writer killed with SIGKILL leaves each monitor's state equal to a replay of its checks."""
    child = subprocess.Popen([sys.executable, "-c", CHILD, str(tmp_path)])
    try:
        deadline = time.monotonic() + 60
        while _count_checks(tmp_path) < 150:
            assert child.poll() is None, "the writer died on its own"
            assert time.monotonic() < deadline, "the writer committed too little in time"
            time.sleep(0.05)  # polling interval while waiting for a condition with a deadline
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    policy = Policy(4, 2, 3, "alert", None, 60.0)
    with Store.open(tmp_path) as store:
        incidents = {i.id: i for i in store.incidents(limit=100_000)}
        assert incidents, "the seeded writer opens incidents within its first checks"
        phases = set()
        for name in store.monitor_names():
            saved = store.monitor_state(name)
            assert saved is not None
            replayed = MonitorState()
            opened = []
            for c in store.recent_checks(name, 100_000):
                transition = advance(replayed, c, policy)
                replayed = transition.state
                if transition.events:
                    opened.append(c.at)
            assert replace(saved, incident_id=None) == replace(replayed, incident_id=None)
            phases.add(saved.phase)
            mine = sorted(i.opened_at for i in incidents.values() if i.monitor == name)
            assert mine == opened
            if saved.phase is Phase.ROLLED_BACK:
                assert saved.incident_id is not None
                assert incidents[saved.incident_id].opened_at == opened[-1]
            assert saved.incident_id is None or incidents[saved.incident_id].monitor == name
        assert len(phases) > 1, "the run covers more than one phase"


def _count_checks(state_dir: Path) -> int:
    if not (state_dir / "state.db").exists():
        return 0
    db = sqlite3.connect(state_dir / "state.db", timeout=5)
    try:
        return int(db.execute("SELECT count(*) FROM checks").fetchone()[0])
    except sqlite3.OperationalError:
        return 0  # the schema is not created yet
    finally:
        db.close()


def other_view(tmp_path: Path) -> tuple[int, str | None]:
    """What a second process would read now: (checks stored, last outcome saved)."""
    db = sqlite3.connect(tmp_path / "state.db")
    try:
        stored = db.execute("SELECT count(*) FROM checks").fetchone()[0]
        saved = db.execute("SELECT last_outcome FROM monitors").fetchone()
    finally:
        db.close()
    return stored, None if saved is None else saved[0]


def test_quiet_checks_are_grouped_decisions_are_not(tmp_path: Path) -> None:
    """Healthy-again checks wait for a group commit; a breach is on disk before returning."""
    store = Store.open(tmp_path)
    state = feed(store, "payments", MonitorState(), "oo", T0)
    assert other_view(tmp_path) == (1, "ok")  # the first check is written, the second waits
    assert [c.outcome for c in store.recent_checks("payments", 10)] == [Outcome.OK] * 2
    assert other_view(tmp_path) == (2, "ok")  # reading wrote the waiting check first
    state = feed(store, "payments", state, "o", T0 + 10)
    assert other_view(tmp_path)[0] == 2
    state = feed(store, "payments", state, "b", T0 + 11)
    assert other_view(tmp_path) == (4, "breach")
    assert state.consecutive_failures == 1
    feed(store, "payments", state, "o", T0 + 12)  # counters reset: a change, written now
    assert other_view(tmp_path) == (5, "ok")
    store.close()


def test_quiet_checks_reach_disk_on_flush_and_close(tmp_path: Path) -> None:
    """flush() and close() write every waiting check; a reopened store sees them all."""
    store = Store.open(tmp_path)
    state = feed(store, "payments", MonitorState(), "ooo", T0)
    assert other_view(tmp_path)[0] == 1
    store.flush()
    assert other_view(tmp_path)[0] == 3
    feed(store, "payments", state, "oo", T0 + 10)
    store.close()
    with Store.open(tmp_path) as reopened:
        assert len(reopened.recent_checks("payments", 10)) == 5
        restored = reopened.monitor_state("payments")
        assert restored is not None
        assert restored.checks == 5


def test_a_group_commit_saves_the_same_state_as_a_whole_save(tmp_path: Path) -> None:
    """Quiet checks update only their columns: the row equals a whole save, even if it went."""
    store = Store.open(tmp_path)
    state = feed(store, "payments", MonitorState(), "bo", T0)  # a breach, then a reset: saved
    state = feed(store, "payments", state, "oo", T0 + 10)  # quiet: held
    store.flush()
    assert store.monitor_state("payments") == state
    db = sqlite3.connect(tmp_path / "state.db")
    try:  # a row gone under the store (never by the daemon): the group commit saves it whole
        db.execute("DELETE FROM monitors WHERE name = 'payments'")
        db.commit()
    finally:
        db.close()
    state = feed(store, "payments", state, "o", T0 + 20)
    store.flush()
    assert store.monitor_state("payments") == state
    assert state.checks == 5
    assert state.last_outcome is Outcome.OK
    store.close()


def test_a_schema_1_store_migrates_with_its_latch_and_plan(tmp_path: Path) -> None:
    """A 0.1.0 store (schema 1) opens with its counters and its unfinished plan intact."""
    from rollbackd.schema import MIGRATIONS  # noqa: PLC0415

    path = tmp_path / "state.db"
    conn = sqlite3.connect(path)
    conn.execute("CREATE TABLE schema_version (version INTEGER NOT NULL)")
    conn.execute("INSERT INTO schema_version VALUES (1)")
    for statement in MIGRATIONS[0]:
        conn.execute(statement)
    conn.execute(
        "INSERT INTO monitors VALUES ('payments', 'rolled_back', 5, 0, 1, 0, '[]', 'inc-1', 9, "
        "12.0, 'breach')"
    )
    conn.execute("INSERT INTO incidents VALUES ('inc-1', 'payments', 'rollback', 'r', 'armed', "
                 "10.0, NULL, '{}')")  # fmt: skip
    conn.execute("INSERT INTO steps (incident_id, step, action, status, attempts) "
                 "VALUES ('inc-1', 0, 'route', 'running', 1)")  # fmt: skip
    conn.commit()
    conn.close()
    with Store.open(tmp_path) as store:
        state = store.monitor_state("payments")
        assert state is not None
        assert (state.phase, state.consecutive_failures, state.incident_id) == (
            Phase.ROLLED_BACK,
            5,
            "inc-1",
        )
        (incident,) = store.unfinished_incidents()
        [step] = incident.steps
        assert (step.status, step.attempts, step.interruptions) == ("running", 1, 0)
        assert store.step_interrupted("inc-1", 0) == 1
    assert (tmp_path / "state.marker").exists()


def test_group_commits_trim_history_in_batches(tmp_path: Path) -> None:
    """Quiet checks are trimmed ``TRIM_SLACK`` + 1 at a time; a read of ``history`` is exact.

    Across flushes, a deciding commit in between, a shrunk and a grown history, a reopening:
    the database holds at least the newest ``history`` and at most ``TRIM_SLACK`` more.
    """

    def quiet(store: Store, monitor: str, at: float, n: int, history: int) -> None:
        for i in range(n):
            c = check(monitor, at + i, 0.5)
            store.commit_check(c, advance(state[monitor], c, POLICY).state, history)
            state[monitor] = advance(state[monitor], c, POLICY).state
        store.flush()

    def stored(store: Store, monitor: str) -> list[float]:
        return [c.at for c in store.recent_checks(monitor, 1000)]

    def kept(store: Store, monitor: str, history: int) -> list[float]:
        return [c.at for c in store.recent_checks(monitor, history)]

    state = {"a": MonitorState(), "b": MonitorState()}
    store = Store.open(tmp_path)
    quiet(store, "a", 0, 7, 5)  # the first group: the count is unknown, found, cut exactly
    quiet(store, "b", 0, 2, 5)
    assert stored(store, "a") == [2, 3, 4, 5, 6]
    quiet(store, "a", 100, 3, 5)  # known count, within the slack: nothing goes yet
    assert stored(store, "a") == [2, 3, 4, 5, 6, 100, 101, 102]
    assert kept(store, "a", 5) == [5, 6, 100, 101, 102]
    quiet(store, "a", 110, 5, 5)
    quiet(store, "a", 120, 1, 5)  # 14 stored: 5 + TRIM_SLACK, still kept
    assert len(stored(store, "a")) == 5 + TRIM_SLACK
    quiet(store, "a", 130, 1, 5)  # one past the slack: back to exactly the newest 5
    assert stored(store, "a") == [112, 113, 114, 120, 130]
    c = check("a", 200, 2.5)  # a breach: its own transaction, with the exact trim
    state["a"] = advance(state["a"], c, POLICY).state
    store.commit_check(c, state["a"], 5)
    assert stored(store, "a") == [113, 114, 120, 130, 200]
    state["a"] = MonitorState()  # a reset: saved whole, then quiet again
    quiet(store, "a", 300, 4, 5)
    assert stored(store, "a") == [200, 300, 301, 302, 303]
    quiet(store, "a", 400, 1, 2)  # history shrunk by a reload: reads of 2 are exact
    assert kept(store, "a", 2) == [303, 400]
    for at in (500, 510, 520):  # trimmed once 2 + TRIM_SLACK are exceeded
        quiet(store, "a", at, 2, 2)
    assert stored(store, "a") == [520, 521]
    quiet(store, "a", 600, 2, 4)  # and grown again: nothing more goes until it is full
    assert stored(store, "a") == [520, 521, 600, 601]
    assert stored(store, "b") == [0, 1]
    store.close()
    with Store.open(tmp_path) as reopened:
        state["a"] = reopened.monitor_state("a") or MonitorState()
        quiet(reopened, "a", 700, 1, 3)  # a fresh count after reopening: cut exactly
        assert stored(reopened, "a") == [600, 601, 700]
