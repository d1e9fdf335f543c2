"""Rollouts at run time: tick each ramp, open its promotions, answer the operator.

``rollouts.decide`` decides; the state store (``stores.StateStore``: SQLite or PostgreSQL)
keeps the state; a promotion is an incident that ``inflight.PlanTasks`` runs (set, then
``on_promote``) exactly once, resumed after a crash or by a new leader. Only the leader
(``StateStore.leading``) decides and writes; a standby reads the rollouts for /status.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable, Mapping
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, replace
from typing import Any

import structlog

from rollbackd import rollouts
from rollbackd.actions import Action, ActionContext
from rollbackd.clock import steady
from rollbackd.config import Config, RolloutConfig
from rollbackd.engine import Event, MonitorState, Phase
from rollbackd.errors import (
    ActionError,
    DeposedError,
    RollbackdError,
    RolloutRefusedError,
    UnknownRolloutError,
)
from rollbackd.inflight import PlanTasks
from rollbackd.records import IncidentDraft
from rollbackd.rolloutlog import GateChecks, owner, promotion_of
from rollbackd.rollouts import Gate, RolloutState
from rollbackd.stores import StateStore

log = structlog.get_logger("rollbackd.rollouts")

TICK_SECONDS = 1.0
"""Rollouts are looked at this often, and after every check of a gate monitor."""
PROMOTING_TICK_SECONDS = 0.1
OPERATIONS = ("pause", "resume", "promote", "abort", "restart")


class Ramp:
    """The daemon's rollouts; ``run()`` ticks them until cancelled."""

    def __init__(
        self,
        plans: PlanTasks,
        *,
        store: Callable[[], StateStore],
        config: Callable[[], Config],
        monitors: Callable[[], Mapping[str, MonitorState]],
        on_change: Callable[[str, RolloutState], None] | None = None,
        clock: Callable[[], float] | None = None,
        counted: Callable[[], AbstractAsyncContextManager[object]] = contextlib.nullcontext,
    ) -> None:
        """``store``, ``config`` and ``monitors`` (live gate states) are asked each time.

        ``counted()`` is held while an abort opens its rollback (``waiting.Waiting.counted``).
        """
        self._plans = plans
        self._store = store
        self._config = config
        self._gated: tuple[object, frozenset[str]] = (None, frozenset())
        self._monitors = monitors
        self._on_change = on_change
        self._counted = counted
        self.clock = clock or steady()
        """Settable: tests step it to pass day-long holds at once."""
        self._poked = asyncio.Event()
        self._lock = asyncio.Lock()
        self._promoting = False
        """Some rollout's percentage is being set (the last tick saw it)."""
        self._seen: dict[str, tuple[RolloutState, dict[str, GateChecks]]] = {}
        """Each rollout's state and its gates' checks as last read or written (/status)."""

    # --- ticking --------------------------------------------------------------------------

    async def run(self) -> None:
        """Tick every rollout every second and when poked, until cancelled."""
        while True:
            await self.tick()
            self._poked.clear()
            # While a percentage is being set, look often: its hold starts when it is done.
            # With no rollout configured, sleep until poked (a reload that adds one pokes).
            wait = PROMOTING_TICK_SECONDS if self._promoting else TICK_SECONDS
            idle = not self._config().rollouts and not self._seen
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(None if idle else wait):
                    await self._poked.wait()

    def poke(self, monitor: str | None = None) -> None:
        """Tick soon: after an operator's request, or after a check of ``monitor`` if a gate."""
        if monitor is None or monitor in self._gating():
            self._poked.set()

    def _gating(self) -> frozenset[str]:
        """The monitors some rollout gates on (worked out once per configuration)."""
        rollouts = self._config().rollouts
        if rollouts is not self._gated[0]:
            self._gated = (rollouts, frozenset(g for r in rollouts.values() for g in r.gates))
        return self._gated[1]

    async def tick(self) -> None:
        """Decide and act for every configured rollout once (read them only as a standby)."""
        async with self._lock:
            promoting = False
            configured = self._config().rollouts
            for name in set(self._seen) - set(configured):
                del self._seen[name]
            for name, config in configured.items():
                try:
                    if self._store().leading:
                        promoting = await self._advance(name, config) or promoting
                    else:
                        await self._read(name, config)
                except DeposedError as exc:  # the new leader goes on from the stored state
                    log.warning("rollout_tick_deposed", rollout=name, reason=str(exc))
                except Exception:  # one broken rollout must not stop the others, nor the daemon
                    log.exception("rollout_tick_failed", rollout=name)
            self._promoting = promoting

    async def read(self) -> None:
        """Read every rollout for /status without deciding (at start, before /status serves)."""
        async with self._lock:
            for name, config in self._config().rollouts.items():
                await self._read(name, config)

    async def _read(self, name: str, config: RolloutConfig) -> RolloutState:
        """A standby's look at one rollout: what the leader stored, for /status."""
        state = await self._store().rollout(name) or RolloutState()
        await self._gates(name, config, state)
        if self._on_change is not None:
            self._on_change(name, state)
        return state

    async def _advance(self, name: str, config: RolloutConfig) -> bool:
        """Decide and act for one rollout; whether a percentage of it is being set."""
        store = self._store()
        saved = await store.rollout(name)
        state = saved or RolloutState(latched=self._latched(config))
        now = self.clock()
        promotion = None
        if state.promoting is not None:
            promotion = promotion_of(await store.incident(state.promoting))
        decision = rollouts.decide(
            config.spec(),
            state,
            await self._gates(name, config, state),
            now,
            promotion=promotion,
            newest_check=await store.newest_check(),
        )
        new = decision.state
        if decision.set_step is not None:
            draft = self._promotion(name, config, new, now)
            opened = await store.replace_rollout(name, state, new, now, draft)
            if isinstance(opened, str):
                self._plans.start(opened)
                new = replace(new, promoting=opened)
            elif opened is False:  # changed meanwhile: the next tick decides again
                new = state
        elif saved is None or new != state:
            await store.save_rollout(name, new, now)
        self._remember(name, new)
        if decision.event is not None:
            self._tell(name, config, decision.event, new)
        if self._on_change is not None:
            self._on_change(name, new)
        return new.promoting is not None

    def _tell(self, name: str, config: RolloutConfig, event: str, state: RolloutState) -> None:
        fields = {
            "rollout": name,
            "run": state.run,
            "step": state.step,
            "percent": config.steps[min(state.step, len(config.steps) - 1)],
            "state": str(state.phase),
        }
        if event == "rolled_back":
            log.error("rollout_rolled_back", **fields, reason=state.reason)
        elif event in ("hold_interrupted", "paused", "set_failed"):
            log.warning(f"rollout_{event}", **fields, reason=state.reason)
        else:
            log.info(f"rollout_{event}", **fields, incident=state.promoting)

    def _promotion(
        self, name: str, config: RolloutConfig, state: RolloutState, now: float
    ) -> IncidentDraft:
        """The incident that sets ``state.step``'s percentage and then runs ``on_promote``."""
        percent = config.steps[state.step]
        key = rollouts.idempotency_key(name, state.step, state.run)
        return IncidentDraft(
            monitor=owner(name),
            event=Event.PROMOTE,
            reason=f"rollout {name}: {state.percent}% -> {percent}% (step {state.step})",
            mode=self._config().daemon.mode,
            opened_at=now,
            actions=(config.set, *config.on_promote),
            details={
                "rollout": name,
                "run": state.run,
                "step": state.step,
                "percent": percent,
                "previous_percent": state.percent,
                "idempotency_key": key,
            },
        )

    async def _gates(self, name: str, config: RolloutConfig, state: RolloutState) -> list[Gate]:
        """The gates of rollout ``name`` in ``state``, their checks read from the store now.

        Remembered with ``state`` for /status.
        """
        checks = await self._checks(config, state)
        self._seen[name] = (state, checks)
        return self._gates_of(config, state, checks)

    async def _checks(self, config: RolloutConfig, state: RolloutState) -> dict[str, GateChecks]:
        store, history = self._store(), self._config().daemon.history
        return {
            gate: await store.gate_checks(gate, state.baseline, history) for gate in config.gates
        }

    def _remember(self, name: str, state: RolloutState) -> None:
        """``state`` is the rollout's now (its gates' checks as last read)."""
        self._seen[name] = (state, self._seen.get(name, (state, {}))[1])

    def _gates_of(
        self, config: RolloutConfig, state: RolloutState, found: Mapping[str, GateChecks]
    ) -> list[Gate]:
        """The gates of ``state`` from the live monitors and their checks in ``found``."""
        monitors = self._monitors()
        gates = []
        for name in config.gates:
            monitor = monitors.get(name)
            if monitor is None:
                gates.append(Gate(name, "unknown"))
                continue
            checks = found.get(name, GateChecks(0, 0, open_incident=False))
            latched = monitor.phase is Phase.ROLLED_BACK
            gates.append(
                Gate(
                    name,
                    str(monitor.phase),
                    open_incident=checks.open_incident,
                    ok_checks=checks.ok,
                    breaches=checks.breaches,
                    rolled_back_in_run=latched and monitor.incident_id not in state.latched,
                )
            )
        return gates

    def _latched(self, config: RolloutConfig) -> tuple[str, ...]:
        """Incidents the gates are latched on now: a new run does not count them."""
        monitors = self._monitors()
        return tuple(
            m.incident_id
            for name in config.gates
            if (m := monitors.get(name)) is not None
            and m.phase is Phase.ROLLED_BACK
            and m.incident_id is not None
        )

    # --- the set action's guard -------------------------------------------------------------

    def guarded(self, actions: Mapping[str, Action]) -> dict[str, Action]:
        """``actions`` with every rollout's ``set`` refusing to run for a rollout that moved on.

        A promotion's set step may still be retrying when a gate rolls back: it must not
        put traffic back up after the rollback's routing step.
        """
        out = dict(actions)
        for config in self._config().rollouts.values():
            inner = actions.get(config.set)
            if inner is not None and not isinstance(inner, _Guard):
                out[config.set] = _Guard(inner.name, inner, self._moved_on)
        return out

    async def _moved_on(self, name: str, run: int, step: int) -> str | None:
        """Why rollout ``name`` must not set ``step`` of ``run`` now, or None."""
        config = self._config().rollouts.get(name)
        state = await self._store().rollout(name)
        if config is None or state is None:
            return f"rollout {name} is no longer configured"
        if (state.run, state.step) != (run, step) or state.phase is rollouts.Phase.ROLLED_BACK:
            return f"rollout {name} moved on (run {state.run}, step {state.step}, {state.phase})"
        gates = self._gates_of(config, state, await self._checks(config, state))
        if rolled := [g.name for g in gates if g.rolled_back_in_run]:
            return f"rollout {name}: {', '.join(rolled)} rolled back"
        return None

    # --- the operator -----------------------------------------------------------------------

    async def operate(self, name: str, operation: str) -> dict[str, Any]:
        """``pause``, ``resume``, ``promote``, ``abort`` or ``restart`` rollout ``name``.

        UnknownRolloutError; RolloutRefusedError when it does not apply to its state.
        """
        config = self._config().rollouts.get(name)
        if config is None:
            raise UnknownRolloutError(name)
        if operation not in OPERATIONS:
            raise RolloutRefusedError(name, operation, f"no operation {operation!r}")
        store = self._store()
        if not store.leading:
            raise RollbackdError(
                f"rollout {name}: cannot {operation}: this daemon is a standby: send this to "
                "the leader (see /status peers)"
            )
        async with self._lock:
            state = await store.rollout(name) or RolloutState(latched=self._latched(config))
            draft = None
            try:
                if operation == "abort":
                    new, draft = rollouts.aborted(state), self._abort(name, config, state)
                elif operation == "restart":
                    new = rollouts.restart(state, await self._gates(name, config, state))
                else:
                    new = getattr(rollouts, operation)(state)
            except rollouts.RefusedError as exc:
                raise RolloutRefusedError(name, operation, str(exc)) from exc
            counted = self._counted() if draft is not None else contextlib.nullcontext()
            async with counted:  # an abort's rollback counts in max_rollbacks
                opened = await store.replace_rollout(name, state, new, self.clock(), draft)
            if opened is False:
                raise RolloutRefusedError(name, operation, "it changed meanwhile; try again")
            self._remember(name, new)  # an abort's rollback is no promotion: no ``promoting``
        log.warning(f"rollout_{operation}", rollout=name, state=str(new.phase), step=new.step)
        result: dict[str, Any] = {"rollout": name, "operation": operation}
        if isinstance(opened, str):
            self._plans.start(opened)
            result["incident"] = opened
        self.poke()
        return {**result, **self.status_of(name, config)}

    def _abort(self, name: str, config: RolloutConfig, state: RolloutState) -> IncidentDraft:
        """The rollback an operator's abort runs: every gate's ``on_rollback``, each once."""
        monitors = self._config().monitors
        actions = dict.fromkeys(
            action for gate in config.gates for action in monitors[gate].on_rollback
        )
        return IncidentDraft(
            monitor=owner(name),
            event=Event.ROLLBACK,
            reason=f"rollout {name} aborted by an operator at {state.percent}%",
            mode=self._config().daemon.mode,
            opened_at=self.clock(),
            actions=tuple(actions),
            details={"rollout": name, "run": state.run, "step": state.step, "aborted": True},
        )

    # --- status ----------------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        """``rollouts`` of ``/status``: every configured rollout, by name.

        Without waiting: each rollout as the last tick (at most a second ago) or operator's
        request read or wrote it; the hold's remaining time as of now.
        """
        return {name: self.status_of(name, c) for name, c in self._config().rollouts.items()}

    def status_of(self, name: str, config: RolloutConfig) -> dict[str, Any]:
        """One rollout's part of ``/status``."""
        state, checks = self._seen.get(name, (RolloutState(), {}))
        spec = config.spec()
        left = rollouts.remaining(spec, state, self.clock())
        return {
            "percent": state.percent,
            "step": state.step,
            "state": str(state.phase),
            "hold_remaining_s": None if left is None else round(left, 3),
            "steps": list(config.steps),
            "hold_s": rollouts.hold_of(spec, state.step),
            "run": state.run,
            "next_percent": config.steps[state.step + 1]
            if state.confirmed and state.step + 1 < len(config.steps)
            else None,
            "promoting": state.promoting,
            "paused_by": state.paused_by,
            "reason": state.reason,
            "gates": {
                gate.name: {
                    "state": gate.state,
                    "ok_checks": gate.ok_checks,
                    "min_checks": config.min_checks,
                    "breaches": gate.breaches,
                    "why": gate.why(config.min_checks),
                }
                for gate in self._gates_of(config, state, checks)
            },
        }


@dataclass(slots=True)
class _Guard:
    """A rollout's ``set`` action, refusing to run for a rollout that moved on."""

    name: str
    inner: Action
    moved_on: Callable[[str, int, int], Awaitable[str | None]]

    async def run(self, ctx: ActionContext) -> str:
        """Run the set action, unless its rollout was rolled back or moved on meanwhile."""
        details = ctx.incident.details
        rollout = details.get("rollout")
        if ctx.incident.event is Event.PROMOTE and isinstance(rollout, str):
            why = await self.moved_on(
                rollout, int(details.get("run", 1)), int(details.get("step", 0))
            )
            if why is not None:
                raise ActionError(f"not set: {why}", transient=False)
        return await self.inner.run(ctx)

    async def aclose(self) -> None:
        """Nothing: the daemon closes the inner action with the others."""
