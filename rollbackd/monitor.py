"""One monitor at run time: read its rules, let the engine decide, commit, hand incidents on.

The decision itself is ``engine.advance``; this module only does the I/O around it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field, replace
from typing import Any

import structlog

from rollbackd import engine, incidents, verdicts
from rollbackd.codec import result_to_json
from rollbackd.config import VOLUME, MonitorConfig, RuleConfig
from rollbackd.engine import Check, Event, MonitorState, Outcome, Phase, Policy, Transition
from rollbackd.errors import DeposedError, MonitorNotLatchedError, StateError
from rollbackd.readings import Reading, ReadingStatus
from rollbackd.readings import error as error_reading
from rollbackd.records import IncidentDraft, IncidentRecord
from rollbackd.redact import Redactor
from rollbackd.sources import Arrival, Source
from rollbackd.state import Store
from rollbackd.stores import StateStore, as_state

log = structlog.get_logger("rollbackd.monitor")


CheckObserver = Callable[[Check, Transition, float], None]
"""Told of every committed check with its transition and evaluation time (metrics)."""


@dataclass(slots=True)
class MonitorRunner:
    """Runs the checks of one monitor; never two at once."""

    name: str
    config: MonitorConfig
    sources: Mapping[str, Source]
    store: StateStore | Store
    """Where checks are committed; a bare SQLite ``Store`` is read at once, others at ``load``."""
    history: int
    mode: str
    on_incident: Callable[[str], Awaitable[None] | None]
    clock: Callable[[], float] = time.time
    observer: CheckObserver | None = None
    redactor: Redactor = field(default_factory=Redactor)
    """Secrets out of the reasons sources give (they reach the store, /status and logs)."""
    plan_gate: Callable[[IncidentDraft], AbstractAsyncContextManager[IncidentDraft]] | None = None
    """Gives the draft as it must open (a rollback whose plan waits: ``limits.hold``), held
    until the check's commit ends (``waiting.Waiting.gate``)."""
    state: MonitorState = field(init=False)
    last_check: Check | None = field(init=False, default=None)
    policy: Policy = field(init=False)
    """The engine's view of this monitor's limits."""
    push: bool = field(init=False)
    """True when every rule reads a push source: checks happen on arrival."""
    failed_runs: int = field(init=False, default=0)
    """Checks in a row that crashed or could not be committed (0 while all is well)."""
    trouble: str = field(init=False, default="")
    """Why the last of those failed."""
    held: Callable[[], str | None] | None = None
    """What holds this monitor's rollback now (``held_by``), e.g. ``infrastructure (failing)``."""
    _reads: list[tuple[str, RuleConfig]] = field(init=False, default_factory=list)
    _shadow: frozenset[str] = field(init=False, default=frozenset())
    _local: bool = field(init=False, default=False)
    _volumes: bool = field(init=False, default=False)
    _debug: bool = field(init=False, default=False)
    _lock: asyncio.Lock = field(init=False, default_factory=asyncio.Lock)
    _store: StateStore = field(init=False)
    _loaded: bool = field(init=False, default=False)
    """The state is the committed one, read while leading: only then may a check commit."""

    def __post_init__(self) -> None:
        self.policy = Policy.of(self.config)
        self.push = all(
            getattr(self.sources.get(rule.source), "push", False) for rule in self.config.rules
        )
        self._local = all(
            getattr(self.sources.get(rule.source), "local", False) for rule in self.config.rules
        )
        self._debug = log.is_enabled_for(logging.DEBUG)  # asked per check, it costs a bind
        rules = self.config.rules
        self._reads = [(rule.name, rule) for rule in rules] + [
            (read.name, read) for rule in rules if (read := rule.volume_read()) is not None
        ]
        self._volumes = len(self._reads) > len(rules)
        shadowed = self.config.shadow
        self._shadow = frozenset(rule.name for rule in rules if shadowed or rule.shadow)
        self.state = MonitorState()
        if isinstance(self.store, Store):  # tests and tools: read it now
            self._loaded = True
            self.state = self.store.monitor_state(self.name) or MonitorState()
            recent = self.store.recent_checks(self.name, 1)
            self.last_check = recent[-1] if recent else None
        self._store = as_state(self.store)

    async def load(self) -> None:
        """Take the committed state and last check from the store (at start, at a takeover)."""
        async with self._lock:
            leading = self._store.leading
            self.state = await self._store.monitor_state(self.name) or MonitorState()
            recent = await self._store.recent_checks(self.name, 1)
            self.last_check = recent[-1] if recent else None
            self._loaded = leading and self._store.leading  # leading throughout the read

    def standby(self) -> None:
        """Deposed: commit nothing until ``load`` reads the committed state while leading.

        A takeover leads before it reloads; a check in between must not commit this
        standby's own copy (latched without an incident, it would lose the rollback).
        """
        self._loaded = False

    async def tick(self) -> Check | None:
        """Run the interval's check; push monitors only look for staleness.

        Fresh values of a push monitor were already counted when they arrived, so its tick
        judges only the series that are stale or failing (each by its rule's ``no_data``):
        nothing to judge means no check at all.
        """
        async with self._lock:
            return await self._checked(self._tick)

    async def arrival(self, arrival: Arrival) -> Check | None:
        """Judge one value a push source received: one check, on that value.

        The caller hands arrivals over one at a time in arrival order (``Schedule``), so a
        burst of samples is as many checks, each judging its own sample.
        """
        async with self._lock:
            return await self._checked(lambda now, started: self._arrival(arrival, now, started))

    async def _tick(self, now: float, started: float) -> Check | None:
        readings = await self._read_all(now)
        if self.push:
            readings = {
                rule: unusable
                for rule, series in readings.items()
                if (unusable := [r for r in series if r.status is not ReadingStatus.OK])
            }
            if not readings:
                return None
        return await self._commit(readings, now, started)

    async def _arrival(self, arrival: Arrival, now: float, started: float) -> Check | None:
        return await self._commit(await self._read_arrived(arrival, now), now, started)

    async def _read_arrived(self, arrival: Arrival, now: float) -> dict[str, Sequence[Reading]]:
        """The readings as of ``arrival``: the arrived series from its value, the rest latest.

        A rule the arrival answers with a series of its own (a plain topic) is not read at
        all; a wildcard's other series, and the monitor's other rules, read as they are now.
        """
        arrived = {
            name: replace(r, reason=self.redactor.text(r.reason)) if r.reason else r
            for name, r in arrival.readings.items()
        }
        rules = [r for _, r in self._reads if r.name not in arrived or arrived[r.name].labels]
        readings: dict[str, Sequence[Reading]] = {}
        for rule, series in zip(rules, await self._read_rules(rules, now), strict=True):
            readings[rule.name] = series
        for name, reading in arrived.items():
            readings[name] = _with_series(readings.get(name, ()), reading)
        return readings

    async def _read_rules(self, rules: Sequence[RuleConfig], now: float) -> list[Sequence[Reading]]:
        if len(rules) <= 1:  # no task needed for zero or one read
            return [await self._read(rule, now) for rule in rules]
        async with asyncio.TaskGroup() as group:
            tasks = [group.create_task(self._read(rule, now)) for rule in rules]
        return [task.result() for task in tasks]

    async def _checked(
        self, body: Callable[[float, float], Awaitable[Check | None]]
    ) -> Check | None:
        """Run one check; a crash is recorded as an inconclusive check with the reason.

        So a monitor whose checks keep crashing goes blind and alerts like any other that
        cannot judge; ``failed_runs`` counts checks in a row that crashed or could not be
        committed (the daemon's health reports them).
        """
        started, now = time.perf_counter(), self.clock()
        try:
            check = await body(now, started)
        except StateError as exc:  # nothing can be recorded: only health can tell
            self._trouble(f"not committed: {exc}")
            raise
        except Exception as exc:  # a bug in one check must not silence the monitor
            log.exception("check_crashed", monitor=self.name)
            why = f"check failed to run: {type(exc).__name__}: {str(exc)[:200]}"
            self._trouble(why)
            results = tuple(
                result
                for rule in self.config.rules
                for result in verdicts.evaluate_rule(rule, [error_reading(why, now)], at=now)
            )
            check = Check(self.name, now, Outcome.INCONCLUSIVE, results)
            await self._record(check, now, started)
            return None
        self.failed_runs, self.trouble = 0, ""
        return check

    def _trouble(self, why: str) -> None:
        self.failed_runs += 1
        self.trouble = why

    async def idle(self) -> None:
        """Return once no check of this monitor is in flight."""
        async with self._lock:
            return

    async def rearm(
        self, announce: Callable[[IncidentRecord | None], IncidentDraft | None]
    ) -> tuple[str | None, str | None]:
        """Clear the latch and the counters (the operator's explicit choice), between checks.

        One operation per latch: of concurrent re-arms one wins, the others find the monitor
        no longer rolled back (MonitorNotLatchedError). ``announce(previous_incident_record)`` gives
        the re-arm incident, committed with the fresh state in one transaction. Returns
        ``(previous incident, re-arm incident)``.
        """
        async with self._lock:
            if self.state.phase is not Phase.ROLLED_BACK:
                raise MonitorNotLatchedError(self.name, str(self.state.phase))
            previous = self.state.incident_id
            fresh = engine.rearm(self.state)
            record = await self._store.incident(previous) if previous else None
            draft = announce(record)
            opened = await self._store.save_state(self.name, fresh, draft)
            self.state = fresh
        log.info("monitor_rearmed", monitor=self.name, resolved=previous, incident=opened)
        return previous, opened

    def status(self) -> dict[str, Any]:
        """Return the monitor's part of ``/status``."""
        state = self.state
        values: dict[str, list[dict[str, Any]]] = {r.name: [] for r in self.config.rules}
        if self.last_check is not None:
            for result in self.last_check.results:
                values.setdefault(result.rule, []).append(
                    {
                        "labels": dict(result.labels),
                        "value": result.value,
                        "verdict": str(result.verdict),
                        "threshold": result.threshold,
                        "direction": result.direction,
                        "unit": result.unit,
                        "reason": result.reason,
                    }
                )
        return {
            "state": str(state.phase),
            "consecutive_failures": state.consecutive_failures,
            "consecutive_errors": state.consecutive_errors,
            "rollback_after": self.config.rollback_after,
            "alert_after": self.config.alert_after,
            "blind_after": self.config.blind_after,
            "interval_seconds": self.config.interval,
            "evaluate_on_arrival": self.push,
            "checks": state.checks,
            "last_check_at": state.last_check_at,
            "last_outcome": str(state.last_outcome) if state.last_outcome else None,
            "incident": state.incident_id,
            "shadow_failures": state.shadow_failures,
            "shadow_rules": sorted(self._shadow),
            "held": self.held() if self.held is not None else None,
            "failed_runs": self.failed_runs,
            "trouble": self.trouble or None,
            "rules": values,
        }

    async def _read_all(self, now: float) -> dict[str, Sequence[Reading]]:
        """Every rule's readings by rule name, and each volume guard's under ``VOLUME + name``."""
        reads = self._reads
        if len(reads) == 1:  # one read: no task, no comprehension
            key, rule = reads[0]
            return {key: await self._read(rule, now)}
        if self._local:  # reads that do no I/O: no tasks
            return {key: await self._read(rule, now) for key, rule in reads}
        async with asyncio.TaskGroup() as group:
            tasks = [group.create_task(self._read(rule, now)) for _, rule in reads]
        return {key: task.result() for (key, _), task in zip(reads, tasks, strict=True)}

    async def _read(self, rule: RuleConfig, now: float) -> Sequence[Reading]:
        source = self.sources.get(rule.source)
        if source is None:
            return [error_reading(f"source {rule.source!r} is not running", now)]
        try:
            readings = await source.read(rule, now)
        except Exception as exc:  # a source's bug costs this rule's reading, not the check
            log.exception("source_read_crashed", monitor=self.name, rule=rule.name)
            why = f"reading failed: {type(exc).__name__}: {str(exc)[:200]}"
            readings = [error_reading(why, now)]
        if not any(r.reason for r in readings):  # values only: nothing to redact
            return readings
        text = self.redactor.text
        return [replace(r, reason=text(r.reason)) if r.reason else r for r in readings]

    async def _commit(
        self, readings: Mapping[str, Sequence[Reading]], now: float, started: float
    ) -> Check:
        volumes = None
        if self._volumes:  # some rule has a volume guard
            volumes = {
                key.removeprefix(VOLUME): series
                for key, series in readings.items()
                if key.startswith(VOLUME)
            }
        check = engine.judge_rules(
            self.name, self.config.rules, readings, now, volumes=volumes, shadow=self._shadow
        )
        return await self._record(check, now, started)

    async def _record(self, check: Check, now: float, started: float) -> Check:
        """Advance the state on ``check``, commit both (with any incident), hand it on.

        A standby (``store.leading`` false) only advances its own copy: it commits nothing,
        opens no incident, starts no plan; a takeover reloads the committed state, and until
        then commits nothing either. What its copy would decide is logged as
        ``decision_left_to_leader`` (info), never as ``rollback_triggered``, and is not counted
        in its metrics: the leader's log and metrics are the ones that say what happened.
        """
        held = self.held() if self.held is not None else None
        transition = engine.advance(self.state, check, self.policy, held)
        incident = None
        decided = False
        if self._store.leading and self._loaded:
            try:
                incident = await self._decide(check, transition, now)
                decided = True
            except DeposedError:  # another daemon leads now: this one only watches
                log.warning("check_not_committed", monitor=self.name, reason="deposed")
        if transition.events and not decided:
            log.info(
                "decision_left_to_leader",
                monitor=self.name,
                events=[str(e) for e in transition.events],
                reason=transition.reason,
            )
            transition = replace(transition, events=())
        self.state = (
            transition.state
            if incident is None
            else replace(transition.state, incident_id=incident)
        )
        self.last_check = check
        if incident is not None:  # first: nothing after the commit may keep a plan from starting
            started_plan = self.on_incident(incident)
            if started_plan is not None:
                await started_plan
        self._log(check, transition, incident)
        if self.observer is not None:
            try:
                self.observer(check, transition, time.perf_counter() - started)
            except Exception:  # metrics or a listener: never the check's business
                log.exception("check_observer_failed", monitor=self.name)
        return check

    async def _decide(self, check: Check, transition: Transition, now: float) -> str | None:
        """Commit the check with its state and any incident it opens; the incident id."""
        if not transition.events:  # no incident to open: the check and its state alone
            return await self._store.commit_check(check, transition.state, self.history)
        # the streak behind the decision goes into the incident
        streak = min(max(self.config.rollback_after, self.config.blind_after) - 1, self.history)
        previous = await self._store.recent_checks(self.name, streak) if streak else []
        draft = incidents.for_transition(
            self.name,
            self.config,
            check,
            transition,
            lambda n: previous[max(len(previous) - n, 0) :],
            mode=self.mode,
            now=now,
        )
        if draft is None or self.plan_gate is None:
            return await self._store.commit_check(check, transition.state, self.history, draft)
        async with self.plan_gate(draft) as gated:  # the count it read is the one it extends
            return await self._store.commit_check(check, transition.state, self.history, gated)

    def _log(self, check: Check, transition: Transition, incident: str | None) -> None:
        state = transition.state
        if self._debug:  # the results' JSON is built only when shown
            log.debug(
                "check",
                monitor=self.name,
                outcome=str(check.outcome),
                failures=state.consecutive_failures,
                errors=state.consecutive_errors,
                results=[result_to_json(r) for r in check.results],
            )
        if check.outcome is not Outcome.OK and state.phase is not Phase.ROLLED_BACK:
            log.info(
                "check_failed" if check.outcome is Outcome.BREACH else "check_inconclusive",
                monitor=self.name,
                failures=f"{state.consecutive_failures}/{self.config.rollback_after}",
                errors=state.consecutive_errors,
                reasons=[r.reason for r in check.results if r.verdict != "ok"][:5],
            )
        for event in transition.events:
            log.warning(
                "rollback_triggered" if event is Event.ROLLBACK else f"{event}_raised",
                monitor=self.name,
                incident=incident,
                mode=self.mode,
                reason=transition.reason,
            )


def _with_series(latest: Sequence[Reading], arrived: Reading) -> list[Reading]:
    """``latest`` with the arrived reading in place of its series (added if it was not there)."""
    series = [r for r in latest if r.labels != arrived.labels]
    if len(series) == len(latest):
        return [*series, arrived]
    return [arrived if r.labels == arrived.labels else r for r in latest]
