"""Pure decisions: readings -> rule results -> check outcome -> monitor state and decisions.

No I/O, no clock, no asyncio: time arrives in the readings and checks, so tests control it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from enum import StrEnum
from typing import Any, Literal

from rollbackd.config import MonitorConfig, RuleConfig
from rollbackd.readings import Labels, Reading, ReadingStatus, labels_of


class Verdict(StrEnum):
    """How one series of one rule was judged."""

    OK = "ok"
    BREACH = "breach"
    NO_DATA = "no_data"
    ERROR = "error"


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


class Decision(StrEnum):
    """What a transition asks the daemon to do."""

    ALERT = "alert"
    BLIND = "blind"
    ROLLBACK = "rollback"


# --- JSON helpers: strict JSON has no Inf/NaN, so they travel as Prometheus spells them ---

_NONFINITE_OUT = {math.inf: "+Inf", -math.inf: "-Inf"}
_NONFINITE_IN = {"+Inf": math.inf, "-Inf": -math.inf, "Inf": math.inf, "NaN": math.nan}


def _float_out(value: float | None) -> float | str | None:
    if value is None or math.isfinite(value):
        return value
    return _NONFINITE_OUT.get(value, "NaN")


def _float_in(value: object) -> float | None:
    if value is None:
        return None
    if isinstance(value, str):
        return _NONFINITE_IN[value]
    assert isinstance(value, int | float)
    return float(value)


def number(value: float) -> str:
    """Format a value as people read it: ``1.0``, ``2.5``, ``0.3``, ``+Inf``."""
    if not math.isfinite(value):
        return str(_float_out(value))
    if value.is_integer() and abs(value) < 1e15:  # beyond this, exponents read better
        return f"{value:.1f}"
    return f"{value:.6g}"


def labels_text(labels: Labels) -> str:
    """``{region="eu",service="pay"}``, or ``""`` for a series without labels."""
    if not labels:
        return ""
    return "{" + ",".join(f'{k}="{v}"' for k, v in labels) + "}"


@dataclass(frozen=True, slots=True)
class RuleResult:
    """One series of one rule, judged and explained."""

    rule: str
    labels: Labels
    value: float | None
    threshold: float
    direction: Literal["above", "below"]
    unit: str
    verdict: Verdict
    reason: str
    at: float

    def to_json(self) -> dict[str, Any]:
        """Return a strict-JSON-able dict (labels as an object, non-finite values as strings)."""
        return {
            "rule": self.rule,
            "labels": dict(self.labels),
            "value": _float_out(self.value),
            "threshold": _float_out(self.threshold),
            "direction": self.direction,
            "unit": self.unit,
            "verdict": self.verdict.value,
            "reason": self.reason,
            "at": self.at,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> RuleResult:
        """Rebuild from the output of ``to_json``."""
        threshold = _float_in(data["threshold"])
        assert threshold is not None
        return cls(
            rule=data["rule"],
            labels=labels_of(data["labels"]),
            value=_float_in(data["value"]),
            threshold=threshold,
            direction="above" if data["direction"] == "above" else "below",
            unit=data["unit"],
            verdict=Verdict(data["verdict"]),
            reason=data["reason"],
            at=float(data["at"]),
        )

    def describe(self) -> str:
        """``rule{labels}: reason``, for logs and incident reasons."""
        return f"{self.rule}{labels_text(self.labels)}: {self.reason}"


def _result_factory() -> Callable[..., RuleResult]:
    """Build RuleResults by setting their slots directly, in field order.

    Why: the generated frozen ``__init__`` costs ~1 us, half of the per-series budget
    (200,000 evaluations/s); the objects are identical (``==``, hash, still frozen).
    """
    names = tuple(RuleResult.__dataclass_fields__)
    s0, s1, s2, s3, s4, s5, s6, s7, s8 = (getattr(RuleResult, n).__set__ for n in names)
    new = object.__new__

    def make(  # noqa: PLR0917 - positional on purpose, as in RuleResult(...)
        a: Any, b: Any, c: Any, d: Any, e: Any, f: Any, g: Any, h: Any, i: Any
    ) -> RuleResult:
        obj: RuleResult = new(RuleResult)
        s0(obj, a)
        s1(obj, b)
        s2(obj, c)
        s3(obj, d)
        s4(obj, e)
        s5(obj, f)
        s6(obj, g)
        s7(obj, h)
        s8(obj, i)
        return obj

    return make


_result = _result_factory()


@dataclass(frozen=True, slots=True)
class Check:
    """One monitor tick: its outcome and every rule result behind it."""

    monitor: str
    at: float
    outcome: Outcome
    results: tuple[RuleResult, ...]

    def to_json(self) -> dict[str, Any]:
        """Return a strict-JSON-able dict."""
        return {
            "monitor": self.monitor,
            "at": self.at,
            "outcome": self.outcome.value,
            "results": [r.to_json() for r in self.results],
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Check:
        """Rebuild from the output of ``to_json``."""
        return cls(
            monitor=data["monitor"],
            at=float(data["at"]),
            outcome=Outcome(data["outcome"]),
            results=tuple(RuleResult.from_json(r) for r in data["results"]),
        )


# --- rule evaluation ------------------------------------------------------------------

_POLICY_VERDICT = {"inconclusive": Verdict.NO_DATA, "breach": Verdict.BREACH, "ok": Verdict.OK}


def evaluate_rule(
    rule: RuleConfig, readings: Sequence[Reading], at: float = 0.0
) -> list[RuleResult]:
    """Judge each series on its own; ``at`` dates the single result of an empty reading list.

    A value strictly beyond the threshold breaches (equal is ok); +Inf breaches ``above``
    and -Inf breaches ``below``. Missing values follow ``rule.no_data``; source errors are
    always ERROR (inconclusive), never a breach and never ok.
    """
    name, unit, threshold = rule.name, rule.unit, rule.threshold
    direction = rule.direction
    above = direction == "above"
    direction_word: str = direction
    not_word = "not " + direction
    sfx = f" {unit}" if unit else ""
    limit = f"threshold {number(threshold)}{sfx}"
    if not readings:
        return [_no_data(rule, (), "the source returned no series", at)]
    results: list[RuleResult] = []
    append = results.append
    for reading in readings:
        value = reading.value
        if reading.status is ReadingStatus.OK and value is not None and not math.isnan(value):
            if (value > threshold) if above else (value < threshold):
                verdict, word = Verdict.BREACH, direction_word
            else:
                verdict, word = Verdict.OK, not_word
            reason = f"value {number(value)}{sfx} {word} {limit}"
            append(
                _result(
                    name, reading.labels, value, threshold, direction, unit, verdict, reason,
                    reading.at,
                )
            )  # fmt: skip
        elif reading.status is ReadingStatus.ERROR:
            reason = f"source error: {reading.reason or 'unknown'}"
            append(
                _result(
                    name, reading.labels, None, threshold, direction, unit, Verdict.ERROR, reason,
                    reading.at,
                )
            )  # fmt: skip
        else:
            why = reading.reason or ("value is NaN" if value is not None else "no value")
            append(_no_data(rule, reading.labels, why, reading.at))
    return results


def _no_data(rule: RuleConfig, labels: Labels, why: str, at: float) -> RuleResult:
    verdict = _POLICY_VERDICT[rule.no_data]
    if verdict is Verdict.NO_DATA:
        reason = f"no data: {why}"
    else:
        reason = f'no data: {why} (counted as {verdict.value}: no_data = "{rule.no_data}")'
    return RuleResult(
        rule.name, labels, None, rule.threshold, rule.direction, rule.unit, verdict, reason, at
    )


def decide(monitor: str, results: Sequence[RuleResult], at: float) -> Check:
    """Any breach -> BREACH; else any no data / error -> INCONCLUSIVE; else OK."""
    outcome = Outcome.OK
    for result in results:
        verdict = result.verdict
        if verdict is Verdict.BREACH:
            outcome = Outcome.BREACH
            break
        if verdict is not Verdict.OK:
            outcome = Outcome.INCONCLUSIVE
    return Check(monitor, at, outcome, tuple(results))


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
    def of(cls, monitor: MonitorConfig) -> Policy:
        """Return the policy of a configured monitor."""
        return cls(
            rollback_after=monitor.rollback_after,
            alert_after=monitor.alert_after,
            blind_after=monitor.blind_after,
            on_blind=monitor.on_blind,
            failure_limit=monitor.failure_limit,
            failure_window=monitor.failure_window,
        )


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


@dataclass(frozen=True, slots=True)
class Transition:
    """The next state, what to do about it, and why (short text for the log and incident)."""

    state: MonitorState
    decisions: tuple[Decision, ...]
    reason: str


def advance(state: MonitorState, check: Check, policy: Policy) -> Transition:
    """Return the monitor's next state after ``check`` (PRODUCT.md, "Check outcome")."""
    seen = replace(
        state, checks=state.checks + 1, last_check_at=check.at, last_outcome=check.outcome
    )
    if state.phase is Phase.ROLLED_BACK:
        return Transition(seen, (), _latched_reason(state))
    if check.outcome is Outcome.OK:
        fresh = MonitorState(
            failure_times=_window(state.failure_times, check.at, policy),
            checks=seen.checks,
            last_check_at=check.at,
            last_outcome=check.outcome,
        )
        return Transition(fresh, (), "all rules within their thresholds")
    if check.outcome is Outcome.BREACH:
        return _breach(seen, check, policy)
    return _inconclusive(seen, check, policy)


def _breach(state: MonitorState, check: Check, policy: Policy) -> Transition:
    failures = state.consecutive_failures + 1
    times = _window((*state.failure_times, check.at), check.at, policy)
    decisions: list[Decision] = []
    alerted = state.alerted
    if policy.alert_after is not None and failures >= policy.alert_after and not alerted:
        decisions.append(Decision.ALERT)
        alerted = True
    why = _evidence(check, Verdict.BREACH)
    reason = f"{failures} consecutive failing checks (rollback_after {policy.rollback_after})"
    if failures >= policy.rollback_after:
        decisions.append(Decision.ROLLBACK)
    elif policy.failure_limit is not None and len(times) >= policy.failure_limit:
        decisions.append(Decision.ROLLBACK)
        reason = (
            f"{len(times)} failing checks within {number(policy.failure_window)} s "
            f"(failure_limit {policy.failure_limit})"
        )
    latched = Decision.ROLLBACK in decisions
    nxt = replace(
        state,
        phase=Phase.ROLLED_BACK if latched else Phase.FAILING,
        consecutive_failures=failures,
        consecutive_errors=0,
        alerted=alerted,
        blind_alerted=False,
        failure_times=times,
    )
    return Transition(nxt, tuple(decisions), f"{reason}: {why}")


def _inconclusive(state: MonitorState, check: Check, policy: Policy) -> Transition:
    errors = state.consecutive_errors + 1
    why = _evidence(check, Verdict.NO_DATA, Verdict.ERROR)
    reason = f"{errors} consecutive inconclusive checks (blind_after {policy.blind_after})"
    decisions: tuple[Decision, ...] = ()
    blind_alerted = state.blind_alerted
    phase = Phase.FAILING if state.consecutive_failures > 0 else Phase.OK
    if errors >= policy.blind_after:
        phase = Phase.BLIND
        if not blind_alerted:
            blind_alerted = True
            if policy.on_blind == "rollback":
                decisions, phase = (Decision.ROLLBACK,), Phase.ROLLED_BACK
                reason = f"blind, rolling back (on_blind = rollback): {reason}"
            else:
                decisions = (Decision.BLIND,)
                reason = f"blind: {reason}"
    nxt = replace(state, phase=phase, consecutive_errors=errors, blind_alerted=blind_alerted)
    return Transition(nxt, decisions, f"{reason}: {why}")


def _window(times: tuple[float, ...], now: float, policy: Policy) -> tuple[float, ...]:
    """Keep the failure times inside the window ending at ``now`` (none without a limit)."""
    if policy.failure_limit is None:
        return ()
    start = now - policy.failure_window
    return tuple(t for t in times if t > start)[-policy.failure_limit :]


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
    """Return a fresh state; keeps the check count and the last check's time and outcome."""
    return MonitorState(
        checks=state.checks, last_check_at=state.last_check_at, last_outcome=state.last_outcome
    )
