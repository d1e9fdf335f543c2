"""Pure decisions: rule results -> check outcome -> monitor state and events.

No I/O, no clock, no asyncio: time arrives in the readings and checks, so tests control it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from enum import StrEnum
from typing import Literal, Protocol

from rollbackd.frozen import fast_init
from rollbackd.readings import Reading, format_value
from rollbackd.readings import error as error_reading
from rollbackd.verdicts import RuleResult, RuleSpec, Verdict, evaluate_rule, matching


class Outcome(StrEnum):
    """How one monitor tick was judged, from all its rule results."""

    OK = "ok"
    BREACH = "breach"
    INCONCLUSIVE = "inconclusive"


class Phase(StrEnum):
    """Where a monitor stands (``state`` in ``/status``)."""

    OK = "ok"
    FAILING = "failing"
    BLIND = "blind"
    ROLLED_BACK = "rolled_back"


class Event(StrEnum):
    """Why an incident opens and its actions fire; the first three are the engine's decisions."""

    ALERT = "alert"  # alert_after reached: warn before rolling back
    BLIND = "blind"  # too many inconclusive checks in a row
    ROLLBACK = "rollback"  # rollback_after (or failure_limit) reached: run the plan
    REARM = "rearm"  # an operator re-armed the monitor (alerts resolve)
    TEST = "test"  # fired on purpose by `rollbackd test-action`
    SHADOW = "shadow"  # shadow rules would have rolled back (nothing is rolled back)
    PROMOTE = "promote"  # a rollout sets its next step's percentage (set, then on_promote)


class LimitsSpec(Protocol):
    """What the engine needs of a monitor (``config.MonitorConfig`` is one)."""

    @property
    def rollback_after(self) -> int:
        """Consecutive failing checks that roll back."""

    @property
    def alert_after(self) -> int | None:
        """Consecutive failing checks that alert first."""

    @property
    def blind_after(self) -> int:
        """Consecutive inconclusive checks that make the monitor blind."""

    @property
    def on_blind(self) -> Literal["alert", "rollback"]:
        """What a blind monitor does."""

    @property
    def failure_limit(self) -> int | None:
        """Failing checks within ``failure_window`` that roll back."""

    @property
    def failure_window(self) -> float:
        """Seconds over which ``failure_limit`` counts."""


@fast_init
@dataclass(frozen=True, slots=True)
class Check:
    """One monitor tick: its outcome and every rule result behind it."""

    monitor: str
    at: float
    outcome: Outcome
    results: tuple[RuleResult, ...]
    shadow_outcome: Outcome | None = None
    """The outcome of the shadow rules alone (None: no shadow rule); ``outcome`` ignores them."""


# --- one check ---------------------------------------------------------------------------


def decide(
    monitor: str,
    results: Sequence[RuleResult],
    at: float,
    shadow: frozenset[str] = frozenset(),
) -> Check:
    """Any breach -> BREACH; else any no data / error / insufficient -> INCONCLUSIVE; else OK.

    Results of the rules named in ``shadow`` make the check's ``shadow_outcome`` instead.
    """
    if not shadow:
        return Check(monitor, at, _outcome(results), tuple(results))
    real = [r for r in results if r.rule not in shadow]
    spied = [r for r in results if r.rule in shadow]
    return Check(monitor, at, _outcome(real), tuple(results), _outcome(spied))


def _outcome(results: Sequence[RuleResult]) -> Outcome:
    outcome = Outcome.OK
    for result in results:
        verdict = result.verdict
        if verdict is Verdict.BREACH:
            return Outcome.BREACH
        if verdict is not Verdict.OK:
            outcome = Outcome.INCONCLUSIVE
    return outcome


def judge_rules(
    monitor: str,
    rules: Sequence[RuleSpec],
    readings: Mapping[str, Sequence[Reading]],
    at: float,
    *,
    volumes: Mapping[str, Sequence[Reading]] | None = None,
    shadow: frozenset[str] = frozenset(),
) -> Check:
    """One check of a monitor from its rules' readings (rules without readings are skipped).

    The daemon and the backtest both judge through here. ``volumes`` holds the volume
    readings of rules with a volume guard; ``shadow`` names the rules in shadow. A rule that
    cannot be judged (a bug on odd input) is that rule's inconclusive result with the
    reason, never a lost check.
    """
    results: list[RuleResult] = []
    for rule in rules:
        series = readings.get(rule.name)
        if series is None:
            continue
        by_labels = None
        if volumes is not None and rule.name in volumes:
            by_labels = {matching(v.labels): v for v in volumes[rule.name]}
        try:
            results.extend(evaluate_rule(rule, series, at, by_labels))
        except Exception as exc:  # noqa: BLE001 - one odd reading is that rule's result
            why = f"judging failed: {type(exc).__name__}: {str(exc)[:200]}"
            results.extend(evaluate_rule(rule, [error_reading(why, at)], at=at))
    return decide(monitor, results, at, shadow)


# --- the monitor state machine -----------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Policy:
    """The limits of one monitor, as the state machine needs them."""

    rollback_after: int
    alert_after: int | None
    blind_after: int
    on_blind: Literal["alert", "rollback"]
    failure_limit: int | None
    failure_window: float

    @classmethod
    def of(cls, monitor: LimitsSpec) -> Policy:
        """Return the policy of a configured monitor."""
        m = monitor
        return cls(
            m.rollback_after, m.alert_after, m.blind_after, m.on_blind, m.failure_limit,
            m.failure_window,
        )  # fmt: skip


@fast_init
@dataclass(frozen=True, slots=True)
class MonitorState:
    """Counters and latch of one monitor; ``advance`` makes the next one."""

    phase: Phase = Phase.OK
    consecutive_failures: int = 0
    consecutive_errors: int = 0
    alerted: bool = False
    """The alert was already sent for the current failing streak."""
    blind_alerted: bool = False
    """The blind alert was already sent for the current inconclusive streak."""
    failure_times: tuple[float, ...] = ()
    """Times of recent failing checks, for ``failure_limit`` (only those inside the window)."""
    incident_id: str | None = None
    """The incident of the current streak (the store sets it); kept while latched."""
    checks: int = 0
    last_check_at: float | None = None
    last_outcome: Outcome | None = None
    shadow_failures: int = 0
    """Consecutive checks where a shadow rule breached (they never count toward a rollback)."""
    shadow_alerted: bool = False
    """The shadow incident was already raised for the current shadow streak."""
    held_alerted: bool = False
    """The rollback is held by a failing dependency (``held_by``) and that was alerted."""


@fast_init
@dataclass(frozen=True, slots=True)
class Transition:
    """The next state, what to do about it, and why (short text for the log and incident)."""

    state: MonitorState
    events: tuple[Event, ...]
    reason: str


def advance(
    state: MonitorState, check: Check, policy: Policy, held: str | None = None
) -> Transition:
    """Return the monitor's next state after ``check`` (PRODUCT.md, "Check outcome").

    ``held`` (``held_by``: e.g. ``"infrastructure (failing)"``) holds a rollback that is due:
    counting goes on, one alert says so, and the rollback runs at the first check after the
    hold lifts while the monitor is still at its limit. Shadow rules keep their own streak.
    """
    if check.outcome is Outcome.OK and state.phase is not Phase.ROLLED_BACK:
        fresh = MonitorState(
            failure_times=_window(state.failure_times, check.at, policy),
            checks=state.checks + 1,
            last_check_at=check.at,
            last_outcome=Outcome.OK,
            shadow_failures=state.shadow_failures,
            shadow_alerted=state.shadow_alerted,
        )
        real = Transition(fresh, (), "all rules within their thresholds")
    else:
        seen = replace(
            state, checks=state.checks + 1, last_check_at=check.at, last_outcome=check.outcome
        )
        if state.phase is Phase.ROLLED_BACK:
            real = Transition(seen, (), _latched_reason(state))
        elif check.outcome is Outcome.BREACH:
            real = _breach(seen, check, policy, held)
        else:
            real = _inconclusive(seen, check, policy, held)
    return real if check.shadow_outcome is None else _shadow(real, check, policy)


def _shadow(real: Transition, check: Check, policy: Policy) -> Transition:
    """Count the shadow rules' own streak; raise SHADOW once where a rollback would be."""
    failures, alerted = real.state.shadow_failures, real.state.shadow_alerted
    events, reason = real.events, real.reason
    if check.shadow_outcome is Outcome.BREACH:
        failures += 1
        if failures >= policy.rollback_after and not alerted and not events:
            # One incident per check: beside a real event, the shadow one waits a check.
            events, alerted = (Event.SHADOW,), True
            reason = (
                f"shadow rules would have rolled back: {failures} consecutive failing checks "
                f"(rollback_after {policy.rollback_after}): {_evidence(check, Verdict.BREACH)}"
            )
    elif check.shadow_outcome is Outcome.OK:
        failures, alerted = 0, False
    nxt = replace(real.state, shadow_failures=failures, shadow_alerted=alerted)
    return Transition(nxt, events, reason)


def _breach(state: MonitorState, check: Check, policy: Policy, held: str | None) -> Transition:
    failures = state.consecutive_failures + 1
    times = _window((*state.failure_times, check.at), check.at, policy)
    events: list[Event] = []
    alerted = state.alerted
    if policy.alert_after is not None and failures >= policy.alert_after and not alerted:
        events.append(Event.ALERT)
        alerted = True
    why = _evidence(check, Verdict.BREACH)
    reason = f"{failures} consecutive failing checks (rollback_after {policy.rollback_after})"
    if failures >= policy.rollback_after:
        events.append(Event.ROLLBACK)
    elif policy.failure_limit is not None and len(times) >= policy.failure_limit:
        events.append(Event.ROLLBACK)
        reason = (
            f"{len(times)} failing checks within {format_value(policy.failure_window)} s "
            f"(failure_limit {policy.failure_limit})"
        )
    held_alerted = state.held_alerted
    if held and Event.ROLLBACK in events:
        events.remove(Event.ROLLBACK)
        reason = f"rollback held by {held}: {reason}"
        if not held_alerted and Event.ALERT not in events:
            events.append(Event.ALERT)
        held_alerted = True
    latched = Event.ROLLBACK in events
    nxt = replace(
        state,
        phase=Phase.ROLLED_BACK if latched else Phase.FAILING,
        consecutive_failures=failures,
        consecutive_errors=0,
        alerted=alerted,
        blind_alerted=False,
        failure_times=times,
        held_alerted=held_alerted,
    )
    return Transition(nxt, tuple(events), f"{reason}: {why}")


def _inconclusive(
    state: MonitorState, check: Check, policy: Policy, held: str | None
) -> Transition:
    errors = state.consecutive_errors + 1
    why = _evidence(check, Verdict.NO_DATA, Verdict.ERROR, Verdict.INSUFFICIENT)
    due = state.consecutive_failures >= policy.rollback_after
    if state.held_alerted and due and not held:  # the hold lifted; the limit still stands
        reason = (
            f"hold lifted, rolling back: {state.consecutive_failures} consecutive failing "
            f"checks (rollback_after {policy.rollback_after})"
        )
        nxt = replace(state, phase=Phase.ROLLED_BACK, consecutive_errors=errors)
        return Transition(nxt, (Event.ROLLBACK,), f"{reason}: {why}")
    reason = f"{errors} consecutive inconclusive checks (blind_after {policy.blind_after})"
    events: tuple[Event, ...] = ()
    blind_alerted, held_alerted = state.blind_alerted, state.held_alerted
    phase = Phase.FAILING if state.consecutive_failures > 0 else Phase.OK
    if errors >= policy.blind_after:
        phase = Phase.BLIND
        if not blind_alerted:  # once per inconclusive streak
            events, phase, blind_alerted, held_alerted, reason = _blind(
                policy, held, held_alerted, reason
            )
    nxt = replace(
        state,
        phase=phase,
        consecutive_errors=errors,
        blind_alerted=blind_alerted,
        held_alerted=held_alerted,
    )
    return Transition(nxt, events, f"{reason}: {why}")


def _blind(
    policy: Policy, held: str | None, held_alerted: bool, reason: str
) -> tuple[tuple[Event, ...], Phase, bool, bool, str]:
    """What a blind monitor does before its blind alert went out.

    Returns (events, phase, blind_alerted, held_alerted, reason); a blind rollback that is
    held is said once and runs later.
    """
    if policy.on_blind == "rollback" and held:
        if held_alerted:
            return (), Phase.BLIND, False, True, reason
        return (Event.BLIND,), Phase.BLIND, False, True, f"blind, rollback held by {held}: {reason}"
    if policy.on_blind == "rollback":
        why = f"blind, rolling back (on_blind = rollback): {reason}"
        return (Event.ROLLBACK,), Phase.ROLLED_BACK, True, held_alerted, why
    return (Event.BLIND,), Phase.BLIND, True, held_alerted, f"blind: {reason}"


def _window(times: tuple[float, ...], now: float, policy: Policy) -> tuple[float, ...]:
    """Keep the failure times inside the window ending at ``now`` (none without a limit).

    A time after ``now`` means the clock was set back since (a restart on a stepped clock):
    it counts as ``now``, so it leaves the window one window later, not a step later.
    """
    if policy.failure_limit is None:
        return ()
    start = now - policy.failure_window
    return tuple(min(t, now) for t in times if t > start)[-policy.failure_limit :]


_EVIDENCE = 3


def _evidence(check: Check, *verdicts: Verdict) -> str:
    """Describe the first few results with one of ``verdicts`` and count the rest."""
    hits = [r for r in check.results if r.verdict in verdicts]
    text = "; ".join(r.describe() for r in hits[:_EVIDENCE])
    if len(hits) > _EVIDENCE:
        text += f"; and {len(hits) - _EVIDENCE} more"
    return text or "no results"


def _latched_reason(state: MonitorState) -> str:
    incident = f" (incident {state.incident_id})" if state.incident_id else ""
    return f"rolled back{incident}: check recorded, nothing happens until re-armed"


def rearm(state: MonitorState) -> MonitorState:
    """Return a fresh state; keeps the check count, the last check, the shadow streak."""
    kept = ("checks", "last_check_at", "last_outcome", "shadow_failures", "shadow_alerted")
    return MonitorState(**{name: getattr(state, name) for name in kept})
