"""The pure decision logic: rule evaluation per series, check outcomes, the state machine."""

from __future__ import annotations

import math
from dataclasses import FrozenInstanceError, dataclass, field
from typing import Literal

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rollbackd.config import MonitorConfig, RuleConfig
from rollbackd.engine import (
    Check,
    Event,
    MonitorState,
    Outcome,
    Phase,
    Policy,
    advance,
    decide,
    judge_rules,
    rearm,
)
from rollbackd.readings import Reading, ReadingStatus, error, labels_of, no_data, ok
from rollbackd.verdicts import RuleResult, Verdict, evaluate_rule
from tests.helpers import loaded_by_import

INF = math.inf
AT = 1_000.0


def rule(
    direction: Literal["above", "below"] = "above",
    threshold: float = 1.0,
    unit: str = "%",
    no_data: Literal["inconclusive", "breach", "ok"] = "inconclusive",
) -> RuleConfig:
    """Build a one-series rule on a prometheus-like source."""
    return RuleConfig.model_validate(
        {
            "name": "r",
            "source": "prom",
            "query": "q",
            direction: threshold,
            "unit": unit,
            "no_data": no_data,
        }
    )


def verdicts(cfg: RuleConfig, readings: list[Reading]) -> list[Verdict]:
    """Verdicts of ``cfg`` on ``readings``."""
    return [r.verdict for r in evaluate_rule(cfg, readings)]


# --- rule evaluation ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("direction", "value", "expected"),
    [
        ("above", 1.5, Verdict.BREACH),
        ("above", 1.0, Verdict.OK),
        ("above", 0.5, Verdict.OK),
        ("above", INF, Verdict.BREACH),
        ("above", -INF, Verdict.OK),
        ("below", 0.5, Verdict.BREACH),
        ("below", 1.0, Verdict.OK),
        ("below", 1.5, Verdict.OK),
        ("below", -INF, Verdict.BREACH),
        ("below", INF, Verdict.OK),
        ("above", math.nextafter(1.0, 2.0), Verdict.BREACH),
        ("below", math.nextafter(1.0, 0.0), Verdict.BREACH),
    ],
)
def test_thresholds_are_strict_and_infinities_explicit(
    direction: Literal["above", "below"], value: float, expected: Verdict
) -> None:
    """A value strictly beyond the threshold breaches, equal is ok, infinities follow the side."""
    assert verdicts(rule(direction), [ok(value, AT)]) == [expected]


@pytest.mark.parametrize(
    ("policy", "expected"),
    [("inconclusive", Verdict.NO_DATA), ("breach", Verdict.BREACH), ("ok", Verdict.OK)],
)
@pytest.mark.parametrize(
    "reading",
    [
        no_data("query returned nothing", AT),
        ok(math.nan, AT),
        Reading(ReadingStatus.OK, AT, math.nan),
        Reading(ReadingStatus.OK, AT, None),
    ],
    ids=["no_data", "nan_via_ok", "nan_raw", "ok_without_value"],
)
def test_missing_values_follow_the_no_data_policy(
    policy: Literal["inconclusive", "breach", "ok"], expected: Verdict, reading: Reading
) -> None:
    """No data, NaN (however it arrives) and a valueless OK reading all follow rule.no_data."""
    [result] = evaluate_rule(rule(no_data=policy), [reading])
    assert result.verdict is expected
    assert result.value is None
    assert result.reason.startswith("no data: ")


@pytest.mark.parametrize(
    ("policy", "expected"),
    [("inconclusive", Verdict.NO_DATA), ("breach", Verdict.BREACH), ("ok", Verdict.OK)],
)
def test_empty_readings_are_one_no_data_result(
    policy: Literal["inconclusive", "breach", "ok"], expected: Verdict
) -> None:
    """A source that returns no series gives one unlabelled result judged by rule.no_data."""
    results = evaluate_rule(rule(no_data=policy), [], at=AT)
    assert [(r.verdict, r.labels, r.at) for r in results] == [(expected, (), AT)]
    assert "no series" in results[0].reason


@pytest.mark.parametrize("policy", ["inconclusive", "breach", "ok"])
def test_source_errors_are_always_inconclusive(
    policy: Literal["inconclusive", "breach", "ok"],
) -> None:
    """An error reading is ERROR whatever the no_data policy: never a breach, never ok."""
    [result] = evaluate_rule(rule(no_data=policy), [error("connection refused", AT)])
    assert result.verdict is Verdict.ERROR
    assert result.reason == "source error: connection refused"
    assert decide("m", [result], AT).outcome is Outcome.INCONCLUSIVE


def test_each_series_is_judged_on_its_own_labels() -> None:
    """One breaching series among healthy ones breaches the check and is named in the results."""
    readings = [
        ok(0.2, AT, labels_of({"region": "eu"})),
        ok(2.5, AT, labels_of({"region": "us"})),
        no_data("stale", AT, labels_of({"region": "ap"})),
    ]
    results = evaluate_rule(rule(), readings)
    assert [(dict(r.labels)["region"], r.verdict) for r in results] == [
        ("eu", Verdict.OK),
        ("us", Verdict.BREACH),
        ("ap", Verdict.NO_DATA),
    ]
    assert decide("m", results, AT).outcome is Outcome.BREACH


@pytest.mark.parametrize(
    ("cfg", "value", "reason"),
    [
        (rule("above", 1.0, "%"), 2.5, "value 2.5 % above threshold 1.0 %"),
        (rule("above", 1.0, "%"), 1.0, "value 1.0 % not above threshold 1.0 %"),
        (rule("below", 99.0, ""), 98.25, "value 98.25 below threshold 99.0"),
        (rule("above", 0.3, "s"), INF, "value +Inf s above threshold 0.3 s"),
    ],
)
def test_every_result_explains_itself(cfg: RuleConfig, value: float, reason: str) -> None:
    """A result carries rule, labels, value, threshold, direction, unit and a readable reason."""
    labels = labels_of({"service": "pay"})
    [result] = evaluate_rule(cfg, [ok(value, AT, labels)])
    assert result.reason == reason
    assert (result.rule, result.labels, result.value, result.at) == ("r", labels, value, AT)
    assert (result.threshold, result.direction, result.unit) == (
        cfg.threshold,
        cfg.direction,
        cfg.unit,
    )
    assert result.describe() == f'r{{service="pay"}}: {reason}'
    same = RuleResult(*(getattr(result, name) for name in RuleResult.__dataclass_fields__))
    assert (result, hash(result)) == (same, hash(same))
    with pytest.raises(FrozenInstanceError):
        result.value = 0.0  # type: ignore[misc]


@pytest.mark.parametrize(
    ("found", "expected"),
    [
        ([], Outcome.OK),
        ([Verdict.OK, Verdict.OK], Outcome.OK),
        ([Verdict.OK, Verdict.NO_DATA], Outcome.INCONCLUSIVE),
        ([Verdict.ERROR, Verdict.OK], Outcome.INCONCLUSIVE),
        ([Verdict.ERROR, Verdict.BREACH, Verdict.NO_DATA], Outcome.BREACH),
        ([Verdict.OK, Verdict.BREACH], Outcome.BREACH),
    ],
)
def test_decide_combines_rule_results(found: list[Verdict], expected: Outcome) -> None:
    """Any breach wins; else any no data or error is inconclusive; else the check is ok."""
    results = [RuleResult("r", (), None, 1.0, "above", "", verdict, "", AT) for verdict in found]
    check = decide("m", results, AT)
    assert (check.monitor, check.at, check.outcome) == ("m", AT, expected)
    assert check.results == tuple(results)


# --- the monitor state machine -----------------------------------------------------------

B, O, I = Outcome.BREACH, Outcome.OK, Outcome.INCONCLUSIVE  # noqa: E741


def policy(**overrides: object) -> Policy:
    """Build a policy: rollback after 5, blind after 3, no alert, no failure limit."""
    values: dict[str, object] = {
        "rollback_after": 5,
        "alert_after": None,
        "blind_after": 3,
        "on_blind": "alert",
        "failure_limit": None,
        "failure_window": 60.0,
    }
    values.update(overrides)
    return Policy(**values)  # type: ignore[arg-type]


def run(
    pol: Policy, outcomes: list[Outcome], state: MonitorState | None = None, start: float = AT
) -> tuple[MonitorState, list[tuple[Event, ...]]]:
    """Advance through outcomes one second apart; return the final state and every decision."""
    state = state or MonitorState()
    decisions = []
    for i, outcome in enumerate(outcomes):
        transition = advance(state, Check("m", start + i, outcome, ()), pol)
        state = transition.state
        decisions.append(transition.events)
    return state, decisions


def test_rollback_after_consecutive_failures_latches() -> None:
    """The N-th consecutive failing check rolls back once and latches the monitor."""
    state, decisions = run(policy(rollback_after=3), [B, B, B])
    assert decisions == [(), (), (Event.ROLLBACK,)]
    assert (state.phase, state.consecutive_failures) == (Phase.ROLLED_BACK, 3)


def test_ok_check_resets_the_streak() -> None:
    """An ok check sets both counters to zero, so failures must be consecutive again."""
    state, decisions = run(policy(rollback_after=3), [B, B, O, B, B])
    assert all(d == () for d in decisions)
    assert (state.phase, state.consecutive_failures, state.consecutive_errors) == (
        Phase.FAILING,
        2,
        0,
    )


def test_alert_once_per_streak_and_again_after_a_reset() -> None:
    """alert_after alerts once per failing streak, inconclusive checks do not end the streak."""
    _, decisions = run(policy(alert_after=2, rollback_after=9), [B, B, B, I, B, O, B, B])
    assert decisions == [(), (Event.ALERT,), (), (), (), (), (), (Event.ALERT,)]


def test_alert_and_rollback_on_the_same_check() -> None:
    """With alert_after == rollback_after the check that rolls back also alerts, alert first."""
    _, decisions = run(policy(alert_after=2, rollback_after=2), [B, B])
    assert decisions[-1] == (Event.ALERT, Event.ROLLBACK)


def test_inconclusive_checks_keep_failures_and_count_errors() -> None:
    """Inconclusive checks leave the failure counter alone; a breach resets the error counter."""
    state, _ = run(policy(blind_after=9), [B, B, I, I])
    assert (state.consecutive_failures, state.consecutive_errors, state.phase) == (
        2,
        2,
        Phase.FAILING,
    )
    state, _ = run(policy(blind_after=9), [B], state)
    assert (state.consecutive_failures, state.consecutive_errors) == (3, 0)
    state, _ = run(policy(blind_after=9), [I, I])
    assert state.phase is Phase.OK


def test_blind_alerts_once_per_inconclusive_streak() -> None:
    """After blind_after inconclusive checks the monitor is blind, with one BLIND decision."""
    state, decisions = run(policy(blind_after=3), [I, I, I, I, I])
    assert decisions == [(), (), (Event.BLIND,), (), ()]
    assert (state.phase, state.consecutive_errors, state.blind_alerted) == (Phase.BLIND, 5, True)
    state, decisions = run(policy(blind_after=3), [B, I, I, I], state)
    assert decisions == [(), (), (), (Event.BLIND,)]
    state, decisions = run(policy(blind_after=3), [O, I, I, I], state)
    assert decisions == [(), (), (), (Event.BLIND,)]


def test_blind_rolls_back_when_configured() -> None:
    """on_blind = "rollback" turns the blind decision into a rollback that latches."""
    state, decisions = run(policy(blind_after=2, on_blind="rollback"), [I, I])
    assert decisions == [(), (Event.ROLLBACK,)]
    assert state.phase is Phase.ROLLED_BACK
    assert "blind" in advance(MonitorState(consecutive_errors=1), Check("m", AT, I, ()),
                              policy(blind_after=2, on_blind="rollback")).reason  # fmt: skip


def test_latch_records_checks_but_moves_nothing() -> None:
    """A rolled-back monitor counts checks and remembers the last one, but decides nothing."""
    latched, _ = run(policy(rollback_after=1), [B])
    latched = MonitorState(**{**_fields(latched), "incident_id": "inc-1"})
    state, decisions = run(policy(rollback_after=1), [O, B, I, B], latched, start=AT + 10)
    assert decisions == [(), (), (), ()]
    assert _fields(state) == {
        **_fields(latched),
        "checks": 5,
        "last_check_at": AT + 13,
        "last_outcome": B,
    }


def test_rearm_gives_a_fresh_state_keeping_the_check_count() -> None:
    """Re-arming clears latch, counters, flags and window, and keeps the check count."""
    latched, _ = run(policy(rollback_after=2, alert_after=1, failure_limit=5), [B, B])
    fresh = rearm(MonitorState(**{**_fields(latched), "incident_id": "inc-1"}))
    assert fresh == MonitorState(checks=2, last_check_at=AT + 1, last_outcome=B)
    _, decisions = run(policy(rollback_after=2), [B, B], fresh, start=AT + 5)
    assert decisions == [(), (Event.ROLLBACK,)]


def test_failure_limit_counts_failing_checks_within_the_window() -> None:
    """failure_limit rolls back on N failing checks inside the window, even with oks between."""
    pol = policy(rollback_after=99, failure_limit=3, failure_window=10.0)
    state = MonitorState()
    decided = []
    for at, outcome in [(0, B), (1, O), (2, B), (3, O), (4, B)]:
        transition = advance(state, Check("m", at, outcome, ()), pol)
        state = transition.state
        decided.append(transition.events)
    assert decided[-1] == (Event.ROLLBACK,)
    assert "3 failing checks within 10.0 s (failure_limit 3)" in transition.reason


def test_failure_limit_forgets_failures_outside_the_window() -> None:
    """Failures older than the window no longer count, and failure_times stays bounded."""
    pol = policy(rollback_after=99, failure_limit=3, failure_window=10.0)
    state = MonitorState()
    for at, outcome in [(0, B), (5, O), (6, B), (7, O), (10, B), (11, O)]:
        transition = advance(state, Check("m", at, outcome, ()), pol)
        assert transition.events == ()
        state = transition.state
    assert state.failure_times == (6, 10)
    assert advance(state, Check("m", 16, B, ()), pol).events == (), "6 is exactly 10 s old"
    assert advance(state, Check("m", 15.5, B, ()), pol).events == (Event.ROLLBACK,)
    wide, narrow = (policy(rollback_after=99, failure_limit=n) for n in (50, 5))
    state = MonitorState()
    for at in range(20, 40):
        state = advance(state, Check("m", at, B, ()), wide).state
    assert state.failure_times == tuple(range(20, 40))
    state = advance(state, Check("m", 40, B, ()), narrow).state
    assert (state.failure_times, state.phase) == ((36, 37, 38, 39, 40), Phase.ROLLED_BACK)
    unlimited = MonitorState(failure_times=(1.0, 2.0))
    assert advance(unlimited, Check("m", 3, B, ()), policy()).state.failure_times == ()


def test_incident_id_kept_while_latched_and_cleared_by_an_ok_check() -> None:
    """The streak's incident id survives failing checks and ends with the streak."""
    state = MonitorState(phase=Phase.FAILING, consecutive_failures=1, incident_id="alert-1")
    state, _ = run(policy(), [B, I], state)
    assert state.incident_id == "alert-1"
    state, _ = run(policy(), [O], state)
    assert state.incident_id is None


def test_rollback_reason_names_the_evidence() -> None:
    """The transition's reason says why, with the breaching series' own explanation."""
    cfg = rule()
    readings = [ok(2.5, AT, labels_of({"region": f"r{i}"})) for i in range(5)]
    check = decide("m", evaluate_rule(cfg, readings), AT)
    transition = advance(MonitorState(consecutive_failures=1), check, policy(rollback_after=2))
    assert transition.reason.startswith("2 consecutive failing checks (rollback_after 2): ")
    assert 'r{region="r0"}: value 2.5 % above threshold 1.0 %' in transition.reason
    assert transition.reason.endswith("and 2 more")


def test_policy_of_a_monitor_config() -> None:
    """Policy.of copies every limit the state machine needs from the monitor's config."""
    cfg = MonitorConfig.model_validate(
        {
            "rollback_after": 4,
            "alert_after": 2,
            "blind_after": 7,
            "on_blind": "rollback",
            "failure_limit": 6,
            "failure_window": "10m",
            "rules": [{"name": "r", "source": "s", "query": "q", "above": 1}],
        }
    )
    assert Policy.of(cfg) == Policy(4, 2, 7, "rollback", 6, 600.0)


def test_engine_imports_no_io() -> None:
    """Importing the engine in a fresh interpreter loads no database, network or async module."""
    io = ("sqlite3", "socket", "ssl", "asyncio", "subprocess", "pydantic", "pydantic_settings")
    assert loaded_by_import("rollbackd.engine", io) == []


def _fields(state: MonitorState) -> dict[str, object]:
    return {name: getattr(state, name) for name in MonitorState.__dataclass_fields__}


# --- property: advance agrees with a tiny reference model ------------------------------


@dataclass
class Reference:
    """The spec, written as plainly as possible, with an unbounded list of failure times."""

    pol: Policy
    failures: int = 0
    errors: int = 0
    alerted: bool = False
    blind_alerted: bool = False
    latched: bool = False
    times: list[float] = field(default_factory=list)
    checks: int = 0
    held_alerted: bool = False
    shadow_failures: int = 0
    shadow_alerted: bool = False

    def step(
        self, outcome: Outcome, at: float, held: bool = False, shadow: Outcome | None = None
    ) -> tuple[Event, ...]:
        """Judge one check; return the decisions in order."""
        out = list(self._real(outcome, at, held))
        if shadow is B:
            self.shadow_failures += 1
            due = self.shadow_failures >= self.pol.rollback_after
            if due and not self.shadow_alerted and not out:
                self.shadow_alerted = True
                out.append(Event.SHADOW)
        elif shadow is O:
            self.shadow_failures, self.shadow_alerted = 0, False
        return tuple(out)

    def _real(self, outcome: Outcome, at: float, held: bool) -> tuple[Event, ...]:  # noqa: PLR0912 - the spec, written plainly
        self.checks += 1
        if self.latched:
            return ()
        out: list[Event] = []
        if outcome is O:
            self.failures = self.errors = 0
            self.alerted = self.blind_alerted = self.held_alerted = False
        elif outcome is B:
            self.failures += 1
            self.errors = 0
            self.blind_alerted = False
            self.times.append(at)
            recent = [t for t in self.times if at - t < self.pol.failure_window]
            alert_after = self.pol.alert_after
            if alert_after is not None and self.failures >= alert_after and not self.alerted:
                self.alerted = True
                out.append(Event.ALERT)
            limit = self.pol.failure_limit
            if self.failures >= self.pol.rollback_after or (
                limit is not None and len(recent) >= limit
            ):
                if not held:
                    self.latched = True
                    out.append(Event.ROLLBACK)
                else:  # held: one alert says so, the counting goes on
                    if not self.held_alerted and Event.ALERT not in out:
                        out.append(Event.ALERT)
                    self.held_alerted = True
        else:
            self.errors += 1
            if self.held_alerted and not held and self.failures >= self.pol.rollback_after:
                self.latched = True  # the hold lifted while still at the limit
                return (Event.ROLLBACK,)
            if self.errors >= self.pol.blind_after and not self.blind_alerted:
                if self.pol.on_blind == "rollback" and held:  # held: said once, runs later
                    if not self.held_alerted:
                        self.held_alerted = True
                        out.append(Event.BLIND)
                elif self.pol.on_blind == "rollback":
                    self.blind_alerted = self.latched = True
                    out.append(Event.ROLLBACK)
                else:
                    self.blind_alerted = True
                    out.append(Event.BLIND)
        return tuple(out)

    def rearm(self) -> None:
        """Start over, keeping the check count and the shadow rules' streak."""
        checks, shadow = self.checks, (self.shadow_failures, self.shadow_alerted)
        self.__init__(self.pol)  # type: ignore[misc]
        self.checks = checks
        self.shadow_failures, self.shadow_alerted = shadow

    @property
    def phase(self) -> Phase:
        """Derive the phase from the counters."""
        if self.latched:
            return Phase.ROLLED_BACK
        if self.errors >= self.pol.blind_after:
            return Phase.BLIND
        return Phase.FAILING if self.failures > 0 else Phase.OK


policies = st.builds(
    Policy,
    rollback_after=st.integers(1, 6),
    alert_after=st.none() | st.integers(1, 6),
    blind_after=st.integers(1, 6),
    on_blind=st.sampled_from(["alert", "rollback"]),
    failure_limit=st.none() | st.integers(1, 6),
    failure_window=st.integers(1, 100).map(float),  # whole seconds hit the boundary
)
events = st.lists(
    st.tuples(
        st.sampled_from([O, B, I, "rearm"]),
        st.integers(0, 40).map(float),
        st.booleans(),  # held by a dependency at this check
        st.sampled_from([None, O, B, I]),  # the shadow rules' outcome (None: there are none)
    ),
    max_size=60,
)


@settings(max_examples=300, deadline=None)
@given(pol=policies, steps=events)
def test_advance_matches_the_reference_model(
    pol: Policy, steps: list[tuple[Outcome | str, float, bool, Outcome | None]]
) -> None:
    """Any policy, outcomes, re-arms, holds and shadow outcomes: advance agrees with the model."""
    ref, state, at = Reference(pol), MonitorState(), 0.0
    for event, gap, held, shadow in steps:
        at += gap
        if event == "rearm":
            ref.rearm()
            state = rearm(state)
            continue
        assert isinstance(event, Outcome)
        expected = ref.step(event, at, held, shadow)
        why = "infrastructure (failing)" if held else None
        transition = advance(state, Check("m", at, event, (), shadow), pol, why)
        state = transition.state
        assert transition.events == expected
        assert transition.reason
        assert (state.phase, state.consecutive_failures, state.consecutive_errors) == (
            ref.phase,
            ref.failures,
            ref.errors,
        )
        assert (state.alerted, state.blind_alerted) == (ref.alerted, ref.blind_alerted)
        assert state.held_alerted == ref.held_alerted
        assert (state.shadow_failures, state.shadow_alerted) == (
            ref.shadow_failures,
            ref.shadow_alerted,
        )
        assert (state.checks, state.last_check_at, state.last_outcome) == (ref.checks, at, event)
        assert len(state.failure_times) <= (pol.failure_limit or 0)


def test_volume_guard_makes_thin_series_insufficient() -> None:
    """A series with too few events, or none, is insufficient (inconclusive), whatever it reads."""
    guarded = RuleConfig(
        name="err", source="prom", query="q", volume="v", min_volume=100, above=1.0
    )
    eu, us, ap = (labels_of({"region": r}) for r in ("eu", "us", "ap"))
    readings = [ok(33.0, AT, eu), ok(2.0, AT, us), ok(0.5, AT, ap)]
    volumes = {"err": [ok(3.0, AT, eu), ok(600.0, AT, us)]}  # no volume for ap
    check = judge_rules("m", [guarded], {"err": readings}, AT, volumes=volumes)
    verdicts = {dict(r.labels)["region"]: r.verdict for r in check.results}
    assert verdicts == {"eu": "insufficient", "us": "breach", "ap": "insufficient"}
    assert check.outcome is Outcome.BREACH  # us has the volume: its breach counts
    thin = [r for r in check.results if r.verdict == "insufficient"]
    assert "3.0 events, min_volume 100.0" in thin[0].reason
    assert "no volume series" in thin[1].reason


def test_volume_is_matched_without_the_metric_name() -> None:
    """A raw gauge and its volume gauge differ in __name__ only: they still match."""
    guarded = RuleConfig(name="err", source="p", query="q", volume="v", min_volume=10, above=1.0)
    rate = labels_of({"__name__": "rate", "job": "boop"})
    volume = labels_of({"__name__": "requests", "job": "boop"})
    check = judge_rules("m", [guarded], {"err": [ok(5.0, AT, rate)]}, AT,
                        volumes={"err": [ok(50.0, AT, volume)]})  # fmt: skip
    assert [r.verdict for r in check.results] == ["breach"]


def test_shadow_results_make_their_own_outcome() -> None:
    """A shadow rule's breach is the check's shadow outcome; the real outcome ignores it."""
    real = RuleConfig(name="old", source="p", query="a", above=1.0)
    spied = RuleConfig(name="new", source="p", query="b", above=1.0, shadow=True)
    readings = {"old": [ok(0.5, AT)], "new": [ok(9.0, AT)]}
    check = judge_rules("m", [real, spied], readings, AT, shadow=frozenset({"new"}))
    assert (check.outcome, check.shadow_outcome) == (Outcome.OK, Outcome.BREACH)
    assert len(check.results) == 2, "both are recorded and shown"


def test_a_held_blind_rollback_runs_once_the_hold_lifts() -> None:
    """on_blind = rollback while held: one blind alert saying so, then the rollback."""
    pol = Policy(rollback_after=5, alert_after=None, blind_after=2, on_blind="rollback",
                 failure_limit=None, failure_window=60.0)  # fmt: skip
    state, seen = MonitorState(), []
    for at, held in enumerate(["infra (failing)", "infra (failing)", "infra (failing)", None]):
        transition = advance(state, Check("m", float(at), Outcome.INCONCLUSIVE, ()), pol, held)
        state = transition.state
        seen.append((transition.events, state.phase))
    assert seen == [
        ((), Phase.OK),
        ((Event.BLIND,), Phase.BLIND),
        ((), Phase.BLIND),
        ((Event.ROLLBACK,), Phase.ROLLED_BACK),
    ]


def test_failures_from_a_clock_set_back_leave_the_window_one_window_later() -> None:
    """Failure times after ``now`` (the clock was set back an hour) count as now, not an hour.

    Two failures dated an hour ahead, then the clock reads an hour less: they count once
    (as now) and are gone one window later, so a third failure 11 s on does not roll back.
    """
    pol = policy(rollback_after=99, failure_limit=3, failure_window=10.0)
    state = MonitorState(failure_times=(3600.0, 3601.0))
    transition = advance(state, Check("m", 0.0, O, ()), pol)
    assert transition.state.failure_times == (0.0, 0.0)
    transition = advance(transition.state, Check("m", 11.0, B, ()), pol)
    assert transition.events == ()
    assert transition.state.failure_times == (11.0,)
