"""Rollouts, pure: windows across daylight saving changes, freezes, decide() on a given clock."""

from __future__ import annotations

import datetime as dt
from dataclasses import replace
from typing import Any

import pytest

from rollbackd import rollouts
from rollbackd.config import cross_check, from_dict
from rollbackd.errors import ConfigError
from rollbackd.rollouts import Gate, Phase, RolloutState, Spec, decide
from rollbackd.windows import Freeze, blocked, parse_window

DAY = 86_400.0


def utc(text: str) -> float:
    """Unix seconds of an ISO instant written in UTC."""
    return dt.datetime.fromisoformat(text).replace(tzinfo=dt.UTC).timestamp()


# --- windows ----------------------------------------------------------------------------------


def edges(window: str, start: str, end: str, step: float = 60.0) -> list[str]:
    """Every UTC minute at which the window opens or closes between ``start`` and ``end``."""
    parsed = parse_window(window)
    found, now, was = [], utc(start), None
    while now <= utc(end):
        is_open = parsed.open_at(now)
        if was is not None and is_open != was:
            moment = dt.datetime.fromtimestamp(now, dt.UTC).strftime("%Y-%m-%d %H:%M")
            found.append(("opens " if is_open else "closes ") + moment)
        was, now = is_open, now + step
    return found


def test_window_follows_the_autumn_change_in_berlin() -> None:
    """On 2026-10-25 Berlin goes from UTC+2 to UTC+1: 09:00-16:00 local moves an hour in UTC."""
    assert edges("Sat-Sun 09:00-16:00 Europe/Berlin", "2026-10-24T00:00", "2026-10-26T00:00") == [
        "opens 2026-10-24 07:00",
        "closes 2026-10-24 14:00",
        "opens 2026-10-25 08:00",
        "closes 2026-10-25 15:00",
    ]


def test_window_across_the_spring_change_spans_one_hour_less() -> None:
    """On 2027-03-28 02:00 local does not exist: 01:00-05:00 is open 3 real hours, not 4."""
    assert edges("Sun 01:00-05:00 Europe/Berlin", "2027-03-27T12:00", "2027-03-28T12:00") == [
        "opens 2027-03-28 00:00",
        "closes 2027-03-28 03:00",
    ]


def test_window_across_the_autumn_change_spans_one_hour_more() -> None:
    """On 2026-10-25 02:00-03:00 local happens twice: 01:00-05:00 is open 5 real hours."""
    assert edges("Sun 01:00-05:00 Europe/Berlin", "2026-10-24T12:00", "2026-10-25T12:00") == [
        "opens 2026-10-24 23:00",
        "closes 2026-10-25 04:00",
    ]


def test_window_opening_in_the_skipped_hour_opens_when_it_ends() -> None:
    """02:30 local does not exist on 2027-03-28: the window opens at 03:00 CEST (01:00 UTC)."""
    assert edges("Sun 02:30-04:00 Europe/Berlin", "2027-03-27T12:00", "2027-03-28T12:00") == [
        "opens 2027-03-28 01:00",
        "closes 2027-03-28 02:00",
    ]


def test_window_spanning_midnight_belongs_to_the_day_it_opens() -> None:
    """Fri 22:00-02:00 UTC is open Friday night into Saturday, not Thursday night."""
    assert edges("Fri 22:00-02:00", "2026-11-26T12:00", "2026-11-29T12:00") == [
        "opens 2026-11-27 22:00",
        "closes 2026-11-28 02:00",
    ]


def test_window_day_lists_ranges_and_wraps() -> None:
    """Mon,Wed and Fri-Mon (wrapping) name the days they say; * is every day."""
    assert parse_window("Mon,Wed 09:00-10:00").days == {0, 2}
    assert parse_window("Fri-Mon 09:00-10:00 UTC").days == {4, 5, 6, 0}
    assert parse_window("Mon-Wed,Sat 00:00-24:00").days == {0, 1, 2, 5}
    assert parse_window("* 09:00-10:00").days == set(range(7))


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("Mon-Thu 9-16", "is not a window"),
        ("Mox 09:00-16:00", "'Mox' is not a day"),
        ("Mon 09:00-09:00", "opens and closes at the same time"),
        ("Mon 25:00-26:00", "is not a time of day"),
        ("Mon 09:00-16:00 Mars/Olympus", "unknown time zone 'Mars/Olympus'"),
    ],
)
def test_bad_window_says_why(text: str, reason: str) -> None:
    """A window that cannot be read is refused with the reason."""
    with pytest.raises(ValueError, match=reason):
        parse_window(text)


def test_freeze_and_windows_block_with_a_reason() -> None:
    """A freeze blocks from its start to (not including) its end; outside windows blocks."""
    freeze = Freeze(utc("2026-12-19T23:00"), utc("2027-01-03T23:00"))
    assert blocked((), (freeze,), utc("2026-12-19T22:59")) is None
    assert "frozen until 2027-01-03T23:00:00+00:00" in str(
        blocked((), (freeze,), utc("2026-12-19T23:00"))
    )
    assert blocked((), (freeze,), utc("2027-01-03T23:00")) is None
    window = parse_window("Mon-Thu 09:00-16:00 Europe/Berlin")
    assert "outside the promotion windows" in str(
        blocked((window,), (), utc("2026-11-27T10:00"))  # a Friday
    )
    assert blocked((window,), (), utc("2026-11-26T10:00")) is None  # Thursday


# --- decide -----------------------------------------------------------------------------------

SPEC = Spec(steps=(5, 25, 50, 100), holds=(DAY,) * 4, min_checks=3, on_gate_failure="restart")
T0 = utc("2026-11-23T10:00")  # a Monday


def green(name: str = "payments", ok: int = 3) -> Gate:
    """A healthy gate with ``ok`` ok checks since the hold began."""
    return Gate(name, "ok", ok_checks=ok)


def holding(step: int, started: float = T0, **changes: Any) -> RolloutState:
    """A rollout whose ``step`` is set and held since ``started``."""
    percent = SPEC.steps[step]
    state = RolloutState(step=step, confirmed=True, percent=percent, hold_started_at=started)
    return replace(state, **changes)


def test_first_run_sets_the_first_step() -> None:
    """A new rollout sets its first step's percentage at once."""
    decision = decide(SPEC, RolloutState(), [green(ok=0)], T0)
    assert decision.set_step == 0
    assert decision.event == "promoting"


def test_the_hold_passes_with_green_gates_and_promotes_once() -> None:
    """Just before the hold ends nothing moves; at its end the next step is set."""
    assert decide(SPEC, holding(0), [green()], T0 + DAY - 1).set_step is None
    decision = decide(SPEC, holding(0), [green()], T0 + DAY)
    assert decision.set_step == 1
    assert decision.state.confirmed is False
    # While its incident runs, nothing else is decided; when it ends ok, the hold starts.
    running = replace(decision.state, promoting="inc-1")
    assert decide(SPEC, running, [green()], T0 + DAY + 5, promotion="running").set_step is None
    done = decide(SPEC, running, [green()], T0 + DAY + 5, promotion="ok", newest_check=42)
    assert done.event == "promoted"
    assert (done.state.percent, done.state.hold_started_at, done.state.baseline) == (
        25,
        T0 + DAY + 5,
        42,
    )


def test_too_few_checks_hold_back_a_promotion() -> None:
    """A gate with fewer than min_checks ok checks in the hold keeps the rollout where it is."""
    decision = decide(SPEC, holding(1), [green(ok=2)], T0 + 2 * DAY)
    assert decision.set_step is None
    assert "payments has 2 of 3 ok checks" in decision.state.reason


def test_a_breach_during_the_hold_restarts_it_when_the_gate_recovers() -> None:
    """restart: a breach interrupts the hold; once the gate is ok it starts again from then."""
    failing = Gate("payments", "failing", breaches=1)
    interrupted = decide(SPEC, holding(1), [failing], T0 + DAY / 2)
    assert interrupted.event == "hold_interrupted"
    assert interrupted.state.hold_started_at is None
    assert decide(SPEC, interrupted.state, [failing], T0 + DAY).state.hold_started_at is None
    back = decide(SPEC, interrupted.state, [green(ok=0)], T0 + DAY, newest_check=7)
    assert (back.state.hold_started_at, back.state.baseline) == (T0 + DAY, 7)


def test_a_blip_between_ticks_still_restarts_the_hold() -> None:
    """A breach the gate has already recovered from (seen in its checks) restarts the hold."""
    blipped = Gate("payments", "ok", ok_checks=10, breaches=1)
    decision = decide(SPEC, holding(1), [blipped], T0 + DAY + 1, newest_check=9)
    assert decision.set_step is None
    assert decision.state.hold_started_at == T0 + DAY + 1


def test_pause_on_gate_failure_waits_for_an_operator() -> None:
    """pause: a failing gate pauses the rollout; resume holds afresh."""
    spec = replace(SPEC, on_gate_failure="pause")
    paused = decide(spec, holding(1), [Gate("payments", "failing", breaches=1)], T0 + 10).state
    assert (paused.phase, paused.paused_by) == (Phase.PAUSED, "gate")
    assert decide(spec, paused, [green()], T0 + 3 * DAY).set_step is None
    resumed = rollouts.resume(paused)
    assert resumed.hold_started_at is None
    assert decide(spec, resumed, [green()], T0 + 3 * DAY).state.hold_started_at == T0 + 3 * DAY


def test_a_gate_rollback_wins_over_everything() -> None:
    """A gate rolled back in this run: rolled_back at 0 %, even when paused or promoting."""
    gate = Gate("payments", "rolled_back", rolled_back_in_run=True)
    for state in (holding(2), replace(holding(2), phase=Phase.PAUSED), holding(2, promoting="x")):
        decision = decide(SPEC, state, [gate], T0 + DAY)
        assert (decision.state.phase, decision.state.percent) == (Phase.ROLLED_BACK, 0)
        assert decision.state.promoting is None  # restart is not held up by it
        assert decide(SPEC, decision.state, [green()], T0 + 9 * DAY).set_step is None


def test_a_freeze_blocks_a_promotion_but_not_a_rollback() -> None:
    """During a freeze a passed hold waits; a gate's rollback still puts the rollout at 0 %."""
    frozen = replace(SPEC, freezes=(Freeze(T0, T0 + 30 * DAY),))
    waiting = decide(frozen, holding(1), [green()], T0 + DAY + 1)
    assert waiting.set_step is None
    assert "frozen until" in waiting.state.reason
    rolled = decide(
        frozen,
        waiting.state,
        [Gate("payments", "rolled_back", rolled_back_in_run=True)],
        T0 + DAY + 2,
    )
    assert rolled.state.phase is Phase.ROLLED_BACK
    assert decide(frozen, holding(1), [green()], T0 + 30 * DAY).set_step == 2


def test_the_first_step_waits_for_a_window() -> None:
    """Outside its windows even the first step waits; inside, it is set."""
    spec = replace(SPEC, windows=(parse_window("Mon-Thu 09:00-16:00 Europe/Berlin"),))
    saturday = utc("2026-11-28T10:00")
    assert decide(spec, RolloutState(), [green()], saturday).set_step is None
    assert decide(spec, RolloutState(), [green()], utc("2026-11-30T08:00")).set_step == 0


def test_last_step_completes_after_its_hold() -> None:
    """At 100 % the rollout holds once more, then is complete; windows do not matter there."""
    spec = replace(SPEC, freezes=(Freeze(T0, T0 + 30 * DAY),))
    done = decide(spec, holding(3), [green()], T0 + DAY)
    assert (done.state.phase, done.event, done.set_step) == (Phase.COMPLETE, "complete", None)


def test_a_clock_set_back_never_promotes_early_nor_waits_forever() -> None:
    """A hold starting in the future (clock set back) restarts now: one hold, not the jump."""
    state = holding(0, started=T0 + 365 * DAY)
    restarted = decide(SPEC, state, [green()], T0)
    assert restarted.state.hold_started_at == T0
    assert decide(SPEC, restarted.state, [green()], T0 + DAY).set_step == 1
    assert rollouts.remaining(SPEC, state, T0) == DAY  # never more than one hold left


def test_operator_requests_apply_to_their_states_only() -> None:
    """pause/resume/promote/abort/restart refuse what does not apply, saying why."""
    state = holding(1)
    with pytest.raises(rollouts.RefusedError, match="not paused"):
        rollouts.resume(state)
    assert rollouts.promote(state).hold_done is True
    assert decide(SPEC, rollouts.promote(state), [green()], T0 + 1).set_step == 2
    with pytest.raises(rollouts.RefusedError, match="no hold is running"):
        rollouts.promote(replace(state, confirmed=False))
    with pytest.raises(rollouts.RefusedError, match="not rolled_back"):
        rollouts.restart(state, [green()])
    aborted = rollouts.aborted(state)
    with pytest.raises(rollouts.RefusedError, match="rearm payments first"):
        rollouts.restart(aborted, [Gate("payments", "rolled_back")])
    again = rollouts.restart(aborted, [green()])
    assert (again.run, again.step, again.phase) == (2, 0, Phase.HOLDING)


def test_idempotency_keys() -> None:
    """<rollout>:<step>, and a restarted rollout's steps carry their run."""
    assert rollouts.idempotency_key("boop", 2) == "boop:2"
    assert rollouts.idempotency_key("boop", 0, run=2) == "boop:0:run2"


# --- config -----------------------------------------------------------------------------------


def document(**rollout: Any) -> dict[str, Any]:
    """A config with a payments monitor, a route.file set action and rollout boop."""
    return {
        "monitors": {
            "payments": {
                "on_rollback": ["route-legacy"],
                "rules": [{"name": "r", "source": "s", "query": "q", "above": 1.0}],
            }
        },
        "actions": {
            "route-percent": {"type": "route.file", "path": "/x", "key": "K", "value": "{percent}"},
            "route-legacy": {"type": "route.file", "path": "/x", "key": "K", "value": "0"},
            "team": {"type": "alert.log"},
        },
        "rollouts": {
            "boop": {"steps": [5, 25, 50, 100], "hold": "24h", "gates": ["payments"],
                     "set": "route-percent", **rollout}
        },
    }  # fmt: skip


def problems(raw: dict[str, Any]) -> list[str]:
    """Every problem the config has, shape and references."""
    try:
        return list(cross_check(from_dict(raw)))
    except ConfigError as exc:
        return exc.problems


def test_a_good_rollout_config_has_no_problem() -> None:
    """The issue's example is valid."""
    raw = document(
        windows=["Mon-Thu 09:00-16:00 Europe/Berlin"],
        freeze=[{"from": "2026-12-20T00:00:00+01:00", "to": "2027-01-04T00:00:00+01:00"}],
        on_promote=["team"],
        min_checks=3,
    )
    assert problems(raw) == []
    spec = from_dict(raw).rollouts["boop"].spec()
    assert spec.holds == (DAY,) * 4
    assert spec.freezes[0].start == utc("2026-12-19T23:00")


@pytest.mark.parametrize(
    ("changes", "problem"),
    [
        ({"steps": [5, 5, 50]}, "rollouts.boop.steps: steps[1] = 5: steps must strictly increase"),
        ({"steps": [0, 50]}, "steps[0] = 0: a percentage is 1 to 100"),
        ({"steps": [5, 101]}, "steps[1] = 101: a percentage is 1 to 100"),
        ({"steps": [5, True]}, "rollouts.boop.steps[1]: Input should be a valid integer"),
        ({"steps": [5, 25.5]}, "rollouts.boop.steps[1]: Input should be a valid integer"),
        ({"holds": ["1h"]}, "rollouts.boop: give exactly one of hold / holds"),
        ({"gates": ["payments", "nope"]}, "rollouts.boop.gates[1]: no monitor named 'nope'"),
        ({"set": "team"},
         "rollouts.boop.set: 'team' is alert.log; use route.file, route.http, exec"),
        ({"set": "route-legacy"}, "rollouts.boop.set: 'route-legacy' must use {percent}"),
        ({"set": "nothing"}, "rollouts.boop.set: no action named 'nothing'"),
        ({"on_promote": ["nothing"]}, "rollouts.boop.on_promote[0]: no action named 'nothing'"),
        ({"windows": ["Mon-Thu 09:00-16:00", "Sun 10:00"]},
         "rollouts.boop.windows[1]: 'Sun 10:00' is not a window"),
        ({"freeze": [{"from": "2027-01-04T00:00:00+01:00", "to": "2026-12-20T00:00:00+01:00"}]},
         "rollouts.boop.freeze[0]: from must be before to"),
        ({"freeze": [{"from": "2026-12-20T00:00:00", "to": "2027-01-04T00:00:00+01:00"}]},
         "rollouts.boop.freeze[0].from: 2026-12-20T00:00:00 has no offset"),
        ({"freeze": [{"from": "next week", "to": "2027-01-04T00:00:00+01:00"}]},
         "is not an RFC 3339 date-time"),
        ({"min_checks": 51}, "rollouts.boop.min_checks: 51 is more than daemon.history (50)"),
        ({"on_gate_failure": "ignore"}, "rollouts.boop.on_gate_failure"),
        ({"hold": "1ms"}, "rollouts.boop.hold"),
    ],
)  # fmt: skip
def test_config_errors_name_the_key(changes: dict[str, Any], problem: str) -> None:
    """Each bad rollout key is one problem naming rollouts.NAME.key and the reason."""
    raw = document(**changes)
    if "holds" in changes:
        raw["rollouts"]["boop"]["hold"] = "1h"
    found = problems(raw)
    assert any(problem in line for line in found), found


def test_percent_only_in_a_rollout_set() -> None:
    """A monitor's plan may not use an action with {percent}: it would have no value there."""
    raw = document()
    raw["monitors"]["payments"]["on_rollback"] = ["route-percent"]
    assert "monitors.payments.on_rollback[0]: 'route-percent' uses {percent}" in " ".join(
        problems(raw)
    )


def test_bad_rollout_name_is_refused() -> None:
    """Rollout names follow the rule of every other name."""
    raw = document()
    raw["rollouts"] = {"bo op": raw["rollouts"]["boop"]}
    assert any('rollouts."bo op": invalid name' in p for p in problems(raw))
