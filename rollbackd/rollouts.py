"""Progressive rollouts, pure: ``decide`` (what a rollout does next) and operator requests.

No I/O and no clock: times are passed in. ``ramp`` runs the decisions in the daemon and
the state store keeps the rollouts' state (``rolloutlog`` on SQLite, ``pgstate`` on PostgreSQL).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from enum import StrEnum
from typing import Literal

from rollbackd.windows import Freeze, Window, blocked

# --- the decision ---------------------------------------------------------------------------


class Phase(StrEnum):
    """Where a rollout stands (``state`` in ``/status``)."""

    HOLDING = "holding"
    PAUSED = "paused"
    COMPLETE = "complete"
    ROLLED_BACK = "rolled_back"


PAUSED_BY_OPERATOR = "operator"
PAUSED_BY_GATE = "gate"
PAUSED_BY_SET = "set_failed"


@dataclass(frozen=True, slots=True)
class Spec:
    """What ``decide`` needs of a rollout's config (``config.RolloutConfig.spec()`` gives it)."""

    steps: tuple[int, ...]
    holds: tuple[float, ...]
    min_checks: int
    on_gate_failure: Literal["restart", "pause"]
    windows: tuple[Window, ...] = ()
    freezes: tuple[Freeze, ...] = ()


@dataclass(frozen=True, slots=True)
class RolloutState:
    """A rollout's state as the store keeps it.

    ``step`` is the index in ``steps`` the rollout is at or being moved to; ``confirmed``
    says its percentage was set (the promotion's set step ended ok). ``hold_started_at`` is
    None while the step is not set or a gate interrupted the hold. ``baseline`` is the
    newest check id when the hold started: gates are judged on the checks after it.
    """

    run: int = 1
    step: int = 0
    confirmed: bool = False
    percent: int = 0
    phase: Phase = Phase.HOLDING
    hold_started_at: float | None = None
    baseline: int = 0
    hold_done: bool = False
    """An operator ended the hold (``rollbackd rollout promote``)."""
    promoting: str | None = None
    """The incident setting ``step``'s percentage, while it runs."""
    paused_by: str | None = None
    latched: tuple[str, ...] = ()
    """Incidents gates were latched on when this run started: only later rollbacks count."""
    reason: str = ""
    """Why it does not move on now (shown in status)."""


@dataclass(frozen=True, slots=True)
class Gate:
    """A gate monitor as ``decide`` sees it."""

    name: str
    state: str
    """The monitor's phase: ok, failing, blind, rolled_back."""
    open_incident: bool = False
    ok_checks: int = 0
    """Ok checks since the hold's baseline."""
    breaches: int = 0
    """Breaching checks since the hold's baseline."""
    rolled_back_in_run: bool = False
    """It rolled back after this run of the rollout started."""

    @property
    def healthy(self) -> bool:
        """Green right now: state ok and no incident of it still running."""
        return self.state == "ok" and not self.open_incident

    def why(self, min_checks: int) -> str | None:
        """Why this gate does not let a hold pass, or None."""
        if self.state != "ok":
            return f"{self.name} is {self.state}"
        if self.open_incident:
            return f"{self.name} has an incident still running"
        if self.ok_checks < min_checks:
            return f"{self.name} has {self.ok_checks} of {min_checks} ok checks in this hold"
        return None


Promotion = Literal["running", "ok", "failed"]
"""Where the incident setting the current step stands (None: there is none in flight)."""


@dataclass(frozen=True, slots=True)
class Decision:
    """The rollout's next state, and the step whose percentage to set now (if any)."""

    state: RolloutState
    set_step: int | None = None
    event: str | None = None
    """What happened, for the log: started, promoting, promoted, hold_restarted, paused..."""


def hold_of(spec: Spec, step: int) -> float:
    """The hold of ``step`` (the last one's if the config now has fewer steps)."""
    return spec.holds[min(step, len(spec.holds) - 1)]


def remaining(spec: Spec, state: RolloutState, now: float) -> float | None:
    """Seconds left in the current hold (0 once passed), or None when no hold runs."""
    if state.phase is not Phase.HOLDING or state.hold_started_at is None:
        return None
    if state.hold_done:
        return 0.0
    hold = hold_of(spec, state.step)
    return max(0.0, min(hold, hold - (now - state.hold_started_at)))


def decide(
    spec: Spec,
    state: RolloutState,
    gates: Sequence[Gate],
    now: float,
    *,
    promotion: Promotion | None = None,
    newest_check: int = 0,
) -> Decision:
    """What the rollout does at ``now``, given its gates and the promotion in flight.

    A gate's rollback always wins. Windows and freezes only ever hold back a percentage set
    (the first one included), never a rollback. A hold whose start lies in the future (the
    clock went back across a restart) starts again now: it never passes early, and it never
    waits longer than one more hold.
    """
    if state.phase in (Phase.COMPLETE, Phase.ROLLED_BACK):
        return Decision(state)
    if rolled := [g.name for g in gates if g.rolled_back_in_run]:
        why = f"{', '.join(rolled)} rolled back"
        return Decision(_rolled_back(state, why), event="rolled_back")
    if state.promoting is not None:
        return _promotion(spec, state, promotion, now, newest_check)
    if state.phase is Phase.PAUSED:
        return Decision(state)
    if not state.confirmed:
        return _set(spec, state, gates, now, state.step)
    return _hold(spec, state, gates, now, newest_check)


def _promotion(
    spec: Spec, state: RolloutState, promotion: Promotion | None, now: float, newest_check: int
) -> Decision:
    if promotion is None or promotion == "running":
        return Decision(_why(state, "setting the percentage"))
    if promotion == "failed":
        paused = replace(
            state,
            promoting=None,
            phase=Phase.PAUSED,
            paused_by=PAUSED_BY_SET,
            reason="setting the percentage failed (see the incident); resume to try again",
        )
        return Decision(paused, event="set_failed")
    holding = replace(
        state,
        promoting=None,
        confirmed=True,
        percent=spec.steps[min(state.step, len(spec.steps) - 1)],
        hold_started_at=now,
        baseline=newest_check,
        hold_done=False,
        reason="",
    )
    return Decision(holding, event="promoted")


def _set(spec: Spec, state: RolloutState, gates: Sequence[Gate], now: float, step: int) -> Decision:
    """Set ``step``'s percentage when no gate is unhealthy and no window or freeze forbids."""
    if unhealthy := [g.name for g in gates if not g.healthy]:
        return Decision(_why(state, f"waiting for {', '.join(unhealthy)} to be ok"))
    if why := blocked(spec.windows, spec.freezes, now):
        return Decision(_why(state, why))
    moved = replace(
        state, step=step, confirmed=False, hold_started_at=None, hold_done=False, reason=""
    )
    return Decision(moved, set_step=step, event="promoting")


def _hold(
    spec: Spec, state: RolloutState, gates: Sequence[Gate], now: float, newest_check: int
) -> Decision:
    failing = [g for g in gates if not g.healthy or g.breaches]
    if failing and state.hold_started_at is not None:
        names = ", ".join(g.why(0) or f"{g.name} breached" for g in failing)
        if spec.on_gate_failure == "pause":
            paused = replace(
                state,
                phase=Phase.PAUSED,
                paused_by=PAUSED_BY_GATE,
                hold_started_at=None,
                reason=f"paused: {names} during the hold; resume to hold again",
            )
            return Decision(paused, event="paused")
        state = replace(state, hold_started_at=None, reason=f"hold interrupted: {names}")
        event: str | None = "hold_interrupted"
    else:
        event = None
    if state.hold_started_at is None or state.hold_started_at > now:
        if unhealthy := [g.why(0) for g in gates if not g.healthy]:
            return Decision(
                _why(state, "hold waits: " + ", ".join(map(str, unhealthy))), event=event
            )
        reason = state.reason if event else ""  # keep what interrupted it, for the log
        restarted = replace(state, hold_started_at=now, baseline=newest_check, reason=reason)
        return Decision(restarted, event=event or "hold_started")
    return _passed(spec, state, gates, now)


def _passed(spec: Spec, state: RolloutState, gates: Sequence[Gate], now: float) -> Decision:
    """A running hold: promote (or complete) once it passed with every gate green."""
    left = remaining(spec, state, now)
    if left is not None and left > 0:
        return Decision(_why(state, f"holding, {left:.0f}s left"))
    if waits := [w for g in gates if (w := g.why(spec.min_checks)) is not None]:
        return Decision(_why(state, "hold passed, waiting: " + "; ".join(waits)))
    if state.step >= len(spec.steps) - 1:
        done = replace(state, phase=Phase.COMPLETE, hold_started_at=None, reason="")
        return Decision(done, event="complete")
    if why := blocked(spec.windows, spec.freezes, now):
        return Decision(_why(state, f"hold passed; {why}"))
    return _set(spec, state, gates, now, state.step + 1)


def _why(state: RolloutState, reason: str) -> RolloutState:
    return state if state.reason == reason else replace(state, reason=reason)


# --- operator requests ----------------------------------------------------------------------


class RefusedError(ValueError):
    """An operator request that does not apply to the rollout's state (HTTP 409)."""


def pause(state: RolloutState) -> RolloutState:
    """Stop promoting until resumed; the hold's start is kept."""
    if state.phase is not Phase.HOLDING:
        raise RefusedError(f"it is {state.phase}, not holding")
    return replace(state, phase=Phase.PAUSED, paused_by=PAUSED_BY_OPERATOR, reason="paused")


def resume(state: RolloutState) -> RolloutState:
    """Hold again; after a gate failure the hold starts afresh, after a failed set it retries."""
    if state.phase is not Phase.PAUSED:
        raise RefusedError(f"it is {state.phase}, not paused")
    fresh = state.paused_by != PAUSED_BY_OPERATOR
    return replace(
        state,
        phase=Phase.HOLDING,
        paused_by=None,
        reason="",
        hold_started_at=None if fresh else state.hold_started_at,
    )


def promote(state: RolloutState) -> RolloutState:
    """End the current hold now (gates, windows and freezes still decide the promotion)."""
    if state.phase is not Phase.HOLDING:
        raise RefusedError(f"it is {state.phase}, not holding")
    if not state.confirmed or state.hold_started_at is None:
        raise RefusedError("no hold is running (its percentage is being set or a gate failed)")
    return replace(state, hold_done=True)


def restart(state: RolloutState, gates: Sequence[Gate]) -> RolloutState:
    """A new run from the first step, after a rollback; refused while a gate is latched."""
    if state.phase is not Phase.ROLLED_BACK:
        raise RefusedError(f"it is {state.phase}, not rolled_back (pause it, or abort it first)")
    if latched := [g.name for g in gates if g.state == "rolled_back"]:
        names = ", ".join(latched)
        raise RefusedError(f"{names} still rolled back: rollbackd rearm {latched[0]} first")
    if state.promoting is not None:
        raise RefusedError("a percentage is being set; try again when it is done")
    return RolloutState(run=state.run + 1)


def aborted(state: RolloutState) -> RolloutState:
    """The rollout after an operator's abort: rolled back, at 0 %."""
    if state.phase is Phase.ROLLED_BACK:
        raise RefusedError("it is already rolled_back")
    return _rolled_back(state, "aborted by an operator")


def _rolled_back(state: RolloutState, why: str) -> RolloutState:
    """At 0 %, promoting nothing more (a set still retrying is refused by its guard)."""
    return replace(
        state,
        phase=Phase.ROLLED_BACK,
        percent=0,
        hold_started_at=None,
        promoting=None,
        paused_by=None,
        reason=why,
    )


def idempotency_key(rollout: str, step: int, run: int = 1) -> str:
    """``<rollout>:<step>``; a rollout restarted after a rollback adds ``:run<N>``."""
    return f"{rollout}:{step}" if run == 1 else f"{rollout}:{step}:run{run}"
