"""Wiring of the running service: sources, monitors, scheduler, plans, HTTP, signals, systemd.

Everything it calls is importable and testable without starting it.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
from collections.abc import Callable, Mapping
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import structlog
from prometheus_client import CollectorRegistry

from rollbackd import __version__, health, incidents, logs, notify, pageview, parts, status
from rollbackd.actions import Action
from rollbackd.api import ApiServer, ensure_control_token
from rollbackd.assemble import Assembly, Registries, load
from rollbackd.clock import steady, watch_steps
from rollbackd.config import Config, MonitorConfig, exposure_warnings
from rollbackd.engine import Check, Event, MonitorState, Transition
from rollbackd.errors import (
    ConfigError,
    NoIncidentError,
    RollbackdError,
    UnknownMonitorError,
)
from rollbackd.inflight import PlanTasks
from rollbackd.metrics import Metrics
from rollbackd.monitor import MonitorRunner
from rollbackd.parts import Parts
from rollbackd.plan import SAMPLES, PlanRunner
from rollbackd.ramp import Ramp
from rollbackd.records import IncidentDraft, IncidentRecord
from rollbackd.redact import Redactor
from rollbackd.schedule import Backlog, Schedule
from rollbackd.sources import Arrival, Source
from rollbackd.state import Store
from rollbackd.statedir import StateDirLock
from rollbackd.stores import SqliteState, StateStore
from rollbackd.waiting import Waiting

if TYPE_CHECKING:  # imported when the state is PostgreSQL: psycopg needs libpq
    from rollbackd.leader import Leadership

log = structlog.get_logger("rollbackd.daemon")

STOP_GRACE_SECONDS = 20.0
"""How long a stop waits for an in-flight plan step before leaving it to resume at restart."""


def run(config_path: Path) -> int:
    """``rollbackd run``: load the config, serve until SIGTERM/SIGINT; the exit code."""
    assembly = load(config_path)
    daemon = assembly.config.daemon
    redactor = logs.configure(daemon.log_format, daemon.log_level)
    return asyncio.run(Daemon(assembly, config_path, redactor=redactor).serve())


class Daemon:
    """The running service. ``serve()`` owns every task and connection it starts."""

    def __init__(
        self,
        assembly: Assembly,
        config_path: Path | None = None,
        *,
        registry: CollectorRegistry | None = None,
        registries: Registries | None = None,
        clock: Callable[[], float] | None = None,
        redactor: Redactor | None = None,
    ) -> None:
        """Build the daemon of ``assembly`` (``serve()`` runs it).

        ``clock`` dates checks, incidents and plans: by default the wall clock as of now,
        moving with the monotonic clock (``steady``), so counting windows, cooldowns and rate
        limits stay right when the system clock is stepped while the daemon runs.
        """
        clock = clock or steady()
        self.assembly = assembly
        self.redactor = redactor or Redactor()
        """Every secret of every config this daemon ran, kept out of what it writes and shows."""
        self.redactor.learn(assembly.secret_values())
        self.config_path = config_path
        self.registries = registries or Registries()
        """The plugin types a reload resolves the new config with."""
        self.clock = clock
        self.registry = registry or CollectorRegistry()
        self.metrics = Metrics(self.registry)
        self.parts = Parts(assembly)
        """What runs: sources, actions, monitors (empty until ``serve()`` starts them)."""
        self.ready = asyncio.Event()
        self.check_listener: Callable[[str, Check, MonitorState], None] | None = None
        """Told of every committed check (the demo prints them)."""
        self._state: StateStore | None = None
        self.leadership: Leadership | None = None
        """The election (PostgreSQL state only)."""
        self._schedule: Schedule | None = None
        self._stop = asyncio.Event()
        self.plans = PlanTasks(self._runner)
        self.waiting = Waiting(
            self.plans,
            store=lambda: self.state,
            config=lambda: self.config,
            on_count=self.metrics.plans_waiting,
            clock=clock,
        )
        """Plans held by max_rollbacks / rearm_cooldown; its cooldown timers stop with us."""
        self.ramp = Ramp(
            self.plans,
            store=lambda: self.state,
            config=lambda: self.config,
            monitors=lambda: {name: runner.state for name, runner in self.monitors.items()},
            on_change=self.metrics.rollout,
            counted=self.waiting.counted,
        )
        """The progressive rollouts ([rollouts.NAME]): ticked while serving."""
        self._reloading = asyncio.Lock()
        self._reload_waiting = False
        self._commits = health.GroupCommit(lambda: self.state)
        self._api: ApiServer | None = None
        self._anchor: float | None = None
        """Loop-clock time the checks' and chores' beats count from (the first schedule's)."""
        self._closers: set[asyncio.Task[Any]] = set()
        """Background work stop waits for: parts closing after their plans, reloads."""

    @property
    def config(self) -> Config:
        """The running configuration."""
        return self.assembly.config

    @property
    def state(self) -> StateStore:
        """The open state store (only while serving)."""
        if self._state is None:
            raise RollbackdError("the daemon is not running")
        return self._state

    @property
    def store(self) -> Store:
        """The open SQLite store, read synchronously (tests, the demo; SQLite state only)."""
        state = self.state
        if not isinstance(state, SqliteState):
            raise RollbackdError(f"the state is not an SQLite store: {state.where}")
        return state.store

    async def serve(self) -> int:
        """Run until asked to stop; return the exit code."""
        daemon = self.config.daemon
        lock = StateDirLock(daemon.state_dir)
        try:
            self._state = await self._open_state()
        except BaseException:
            lock.close()
            raise
        log.info(
            "daemon_starting",
            version=__version__,
            mode=daemon.mode,
            environment=daemon.environment,
            config=str(self.config_path),
            monitors=len(self.config.monitors),
        )
        for warning in exposure_warnings(self.config):
            log.warning("api_exposed", warning=warning)
        self.metrics.info(__version__, daemon.mode, daemon.environment)
        try:
            async with contextlib.AsyncExitStack() as stack:
                stack.push_async_callback(self._stop_parts)  # also after a failed start
                stack.push_async_callback(self.waiting.stop)
                await self._start_parts(self.assembly)
                await self.ramp.read()  # /status shows the stored rollouts from the start
                await self._start_surface(stack)
                self._install_signals()
                if self.leadership is None:
                    await self.waiting.resume()
                    self.metrics.leader.set(1)
                self.ready.set()
                notify.ready(self._watching())
                log.info("daemon_ready", mode=daemon.mode, listen=daemon.listen or None)
                async with asyncio.TaskGroup() as group:
                    chores = [
                        group.create_task(health.watchdog(self.health)),
                        group.create_task(self._commits.run(self._anchor)),
                        group.create_task(watch_steps(self.clock, anchor=self._anchor)),
                        group.create_task(self.ramp.run()),
                    ]
                    electing = None
                    if self.leadership is not None:
                        electing = group.create_task(self.leadership.run())
                    await self._stop.wait()
                    for chore in chores:
                        chore.cancel()
                    notify.stopping()
                    log.info("daemon_stopping")
                    await self._stop_checks()  # no new incident while plans finish
                    await self.waiting.stop()  # a cooldown ending later runs at next start
                    await self.plans.drain(STOP_GRACE_SECONDS)
                    if electing is not None:  # the lead goes once our plans have stopped
                        electing.cancel()
        finally:
            await self._state.close()
            self._state = None
            lock.close()
        log.info("daemon_stopped")
        return 0

    async def _open_state(self) -> StateStore:
        """SQLite in state_dir, or the shared PostgreSQL store and its election."""
        config = self.config
        if not config.daemon.state:
            return SqliteState.open(config.daemon.state_dir)
        # Only a PostgreSQL state loads psycopg (and libpq): SQLite hosts need neither.
        from rollbackd.leader import Leadership  # noqa: PLC0415
        from rollbackd.pgstate import PgState  # noqa: PLC0415

        store = await PgState.open(config.daemon, config.ha.node)
        self.leadership = Leadership(
            store,
            node=config.ha.node,
            takeover_after=config.ha.takeover_after,
            on_lead=self._take_lead,
            on_standby=self._stand_by,
        )
        self.metrics.leader.set(0)
        log.info("daemon_standby", node=config.ha.node, state=store.where)
        return store

    async def _take_lead(self, generation: int) -> None:
        """A takeover: count on from the committed state, resume the unfinished plans."""
        for runner in self.monitors.values():
            await runner.load()
            self.metrics.monitor_state(runner.name, runner.state)
        self.metrics.leader.set(1)
        notify.status(self._watching())
        log.warning("daemon_leading", generation=generation, node=self.config.ha.node)
        await self.waiting.resume()

    async def _stand_by(self, why: str) -> None:
        """Deposed: stop every plan and timer at once; the new leader resumes them."""
        for runner in self.monitors.values():
            runner.standby()
        self.metrics.leader.set(0)
        notify.status(self._watching())
        await self.plans.cancel()
        await self.waiting.stop()
        log.warning("daemon_standing_by", reason=why, node=self.config.ha.node)

    @property
    def role(self) -> str:
        """``leader`` (always with SQLite state) or ``standby``."""
        return self.leadership.role if self.leadership is not None else "leader"

    def _watching(self) -> str:
        """The systemd STATUS line: role, monitors, mode."""
        text = f"watching {len(self.monitors)} monitors, mode {self.config.daemon.mode}"
        if self.leadership is None:
            return text
        return f"{self.role} (generation {self.leadership.generation}), {text}"

    def _acting(self) -> None:
        """Refuse an operator's action on a standby: it must go to the leader, named if seen."""
        if self.leadership is not None and self.role == "standby":
            generation = self.leadership.generation
            leader = next(
                (p for p in self.leadership.peers
                 if p["role"] == "leader" and p["generation"] == generation),
                None,
            )  # fmt: skip
            to = (
                "the leader (none seen yet; see /status peers)"
                if leader is None
                else f"the leader, {leader['node']} (generation {generation}, seen "
                f"{leader['seen_seconds_ago']} s ago)"
            )
            raise RollbackdError(
                f"this daemon ({self.config.ha.node}) is a standby: send this to {to}"
            )

    @property
    def mode(self) -> str:
        """``dry-run`` or ``armed``, as shown by /health."""
        return self.config.daemon.mode

    def stop(self) -> None:
        """Ask ``serve()`` to finish (SIGTERM / SIGINT)."""
        self._stop.set()

    # --- parts that a reload replaces -------------------------------------------------

    @property
    def monitors(self) -> dict[str, MonitorRunner]:
        """The running monitors, by name."""
        return self.parts.monitors

    @property
    def sources(self) -> dict[str, Source]:
        """The running sources, by name."""
        return self.parts.sources

    async def _start_parts(
        self,
        assembly: Assembly,
        running: Parts | None = None,
        next_runs: Mapping[str, float] | None = None,
        backlogs: Mapping[str, Backlog] | None = None,
    ) -> None:
        """Start the parts of ``assembly`` and their schedule.

        ``next_runs`` and ``backlogs`` are what a reload hands over from the old schedule.
        """
        self.parts = await parts.start(assembly, self._monitor, self._on_arrival, running)
        for name, runner in self.monitors.items():
            await runner.load()
            self.metrics.track(name, runner.config, runner.state)
        self._schedule = Schedule(self.monitors, backlogs=backlogs, anchor=self._anchor)
        self._schedule.start(next_runs or {})
        if self._anchor is None:  # the first schedule's start: every later beat counts from it
            self._anchor = self._schedule.anchor

    def _monitor(
        self, name: str, config: MonitorConfig, sources: Mapping[str, Source]
    ) -> MonitorRunner:
        daemon = self.config.daemon
        return MonitorRunner(
            name=name,
            config=config,
            sources=sources,
            store=self.state,
            history=daemon.history,
            mode=daemon.mode,
            on_incident=self.waiting.opened,
            clock=self.clock,
            observer=self._observe(name),
            redactor=self.redactor,
            held=parts.holder(config.held_by, lambda: self.monitors) if config.held_by else None,
            plan_gate=self.waiting.gate,
        )

    async def _stop_checks(self) -> None:
        """Stop scheduling checks; a check in flight finishes and commits."""
        if self._schedule is not None:
            await self._schedule.stop()
            self._schedule = None

    async def _stop_parts(self) -> None:
        await self._stop_checks()
        self._retire(list(self.parts.sources.values()), list(self.parts.actions.values()))
        self.parts = Parts(self.assembly)
        if self._stop.is_set():
            await asyncio.wait(set(self._closers))

    def _retire(self, sources: list[Source], actions: list[Action]) -> None:
        """Close parts once the plans running now have finished (they may still use them)."""

        async def after_plans() -> None:
            await self.plans.wait()
            await parts.close(sources, actions)

        closer = asyncio.get_running_loop().create_task(after_plans())
        self._closers.add(closer)
        closer.add_done_callback(self._closers.discard)

    # --- checks -------------------------------------------------------------------------

    def _on_arrival(self, arrival: Arrival) -> None:
        if self._schedule is not None and not self._stop.is_set():
            self._schedule.arrival(arrival)

    def _observe(self, name: str) -> Callable[[Check, Transition, float], None]:
        def observe(check: Check, transition: Transition, seconds: float) -> None:
            self.metrics.observe_check(check, transition, seconds)
            self.ramp.poke(name)
            if self.check_listener is not None:
                self.check_listener(name, check, transition.state)

        return observe

    # --- plans --------------------------------------------------------------------------

    def _runner(self) -> PlanRunner:
        return PlanRunner(
            store=self.state,
            actions=self.ramp.guarded(self.parts.actions),
            action_configs=self.config.actions,
            mode=self.config.daemon.mode,
            environment=self.config.daemon.environment,
            sources=self.sources,
            state_dir=self.config.daemon.state_dir,
            config_sha256=self.config.sha256,
            on_attempt=self.metrics.action_attempt,
            on_duration=self.metrics.action_duration,
            on_failed_steps=self._alert_failed_steps,
            redactor=self.redactor,
            samples=min(SAMPLES, self.config.daemon.history),
        )

    async def _alert_failed_steps(self, record: IncidentRecord) -> None:
        """A rollback step failed: tell the monitor's alert actions (a new alert incident)."""
        if record.event is not Event.ROLLBACK or not record.failed_steps():
            return
        failed = incidents.failed_steps(record)
        log.error("rollback_incomplete", incident=record.id, monitor=record.monitor, failed=failed)
        monitor = self.config.monitors.get(record.monitor)
        draft = incidents.for_incomplete_rollback(record, monitor, self.clock())
        if draft is not None:
            self.plans.start(await self.state.open_incident(draft))

    # --- operator surface ---------------------------------------------------------------

    def health(self) -> health.Verdict:
        """Whether checks are being judged and committed (/health, the watchdog)."""
        overdue = self._schedule.overdue() if self._schedule is not None else None
        return health.judge(overdue, self._commits.trouble, self.monitors)

    def status(self) -> dict[str, Any]:
        """The ``/status`` document."""
        monitors = {name: runner.status() for name, runner in self.monitors.items()}
        shown, waiting = self.state.shown()
        document = status.document(
            __version__,
            self.config,
            monitors,
            shown,
            waiting=waiting,
            released=self.waiting.released_now(),
        )
        document["rollouts"] = self.ramp.status()
        document["role"] = self.role
        leadership = self.leadership
        document["generation"] = leadership.generation if leadership is not None else 0
        document["peers"] = leadership.peers if leadership is not None else []
        redacted: dict[str, Any] = self.redactor.value(document)
        return redacted

    async def rearm(self, monitor: str) -> dict[str, Any]:
        """Clear a monitor's latch and tell the actions that alerted people (alerts resolve)."""
        runner = self.monitors.get(monitor)
        if runner is None:
            raise UnknownMonitorError(monitor)
        self._acting()

        def announce(previous: IncidentRecord | None) -> IncidentDraft | None:
            return incidents.for_rearm(
                monitor,
                incidents.resolvers(runner.config, self.assembly.resolves),
                previous,
                mode=self.config.daemon.mode,
                now=self.clock(),
                remember=self.config.daemon.rearm_cooldown is not None,
            )

        previous, opened = await runner.rearm(announce)
        self.metrics.monitor_state(monitor, runner.state)
        if opened is not None:
            self.plans.start(opened)
        return {"monitor": monitor, "state": str(runner.state.phase), "resolved_incident": previous}

    async def retry(self, incident: str) -> dict[str, Any]:
        """Re-run the failed steps of a finished plan (``rollbackd retry``)."""
        self._acting()
        return {"incident": incident, "steps": await self.plans.retry(self.state, incident)}

    async def approve(self, incident: str) -> dict[str, Any]:
        """Run a plan that waits (``rollbackd approve``); exactly one of concurrent calls does."""
        self._acting()
        return await self.waiting.approve(incident)

    # --- what the operator page reads (page.Records) ------------------------------------

    @property
    def history(self) -> int:
        """Checks kept per monitor (``daemon.history``)."""
        return self.config.daemon.history

    async def recent_checks(self, monitor: str) -> list[Check]:
        """The newest ``history`` checks of ``monitor``, oldest first (the page's sparklines)."""
        checks = await self.state.recent_checks(monitor, self.config.daemon.history)
        await asyncio.sleep(0)  # one monitor's read at a time: checks run in between
        return checks

    async def incident_document(self, incident: str) -> dict[str, Any] | None:
        """One incident for the page (secrets redacted), or None when the store has none."""
        try:
            found = await self.state.incident(incident)
        except NoIncidentError:  # a failing store is not "none": the API answers 503 and why
            return None
        document: dict[str, Any] = self.redactor.value(pageview.incident_document(found))
        return document

    async def rollout(self, name: str, operation: str) -> dict[str, Any]:
        """``rollbackd rollout pause|resume|promote|abort|restart NAME``."""
        if name in self.config.rollouts:  # an unknown name is a 404 on a standby too
            self._acting()
        return await self.ramp.operate(name, operation)

    async def _start_surface(self, stack: contextlib.AsyncExitStack) -> None:
        address = self.config.daemon.listen_address()
        if address is None:
            return
        token = ensure_control_token(self.config.daemon.state_dir)
        server = ApiServer(
            self,
            self.registry,
            token,
            address,
            version=__version__,
            status_token=self.config.daemon.status_token,
        )
        await server.start()
        self._api = server
        stack.push_async_callback(server.stop)

    # --- signals, reload, watchdog ------------------------------------------------------

    def _install_signals(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.stop)
        loop.add_signal_handler(signal.SIGHUP, self._sighup)

    def _sighup(self) -> None:
        """Reload once for a burst of SIGHUPs: one waiting reload reads the newest file."""
        if self._reload_waiting:
            return
        self._reload_waiting = True
        task = asyncio.get_running_loop().create_task(self.reload())
        self._closers.add(task)
        task.add_done_callback(self._closers.discard)

    async def reload(self) -> bool:
        """SIGHUP: re-read the config; a bad one is rejected and the old one keeps running."""
        if self.config_path is None:
            log.warning("reload_ignored", reason="no config file (embedded config)")
            return False
        async with self._reloading:
            self._reload_waiting = False
            if self._stop.is_set():
                return False
            notify.reloading()
            try:
                new = load(self.config_path, registries=self.registries)
            except ConfigError as exc:
                log.error("reload_rejected", problems=exc.problems)
                notify.status("reload rejected; running the previous config")
                notify.ready()
                return False
            if new.config.daemon.state != self.config.daemon.state:
                log.warning("reload_state_ignored", kept=self.state.where)
                daemon_kept = new.config.daemon.model_copy(
                    update={"state": self.config.daemon.state}
                )
                new = replace(new, config=new.config.model_copy(update={"daemon": daemon_kept}))
            if new.config.daemon.state_dir != self.config.daemon.state_dir:
                log.warning("reload_state_dir_ignored", kept=str(self.config.daemon.state_dir))
                new = new.with_state_dir(self.config.daemon.state_dir)
            self.redactor.learn(new.secret_values())
            old = self.parts
            next_runs = self._schedule.next_runs() if self._schedule is not None else {}
            # the old schedule keeps queueing arrivals (judging none) until the new one starts
            backlogs = await self._schedule.stop(handover=True) if self._schedule else {}
            try:
                await self._start_parts(new, old, next_runs, backlogs)
            except RollbackdError as exc:  # e.g. a plugin that cannot be built: keep the old
                log.error("reload_failed", error=str(exc), kept=self.config.sha256)
                self._schedule = Schedule(self.monitors, backlogs=backlogs, anchor=self._anchor)
                self._schedule.start(next_runs)
                notify.ready(f"reload failed; watching {len(self.monitors)} monitors")
                return False
            self.assembly = new
            self._retire(*old.left_by(self.parts))
            if self._api is not None:
                self._api.status_token = new.config.daemon.status_token
            for warning in exposure_warnings(new.config):
                log.warning("api_exposed", warning=warning)
            self.metrics.retain(self.monitors)
            self.ramp.poke()  # rollouts added, changed or removed: the ramp looks now
            self.metrics.retain_rollouts(new.config.rollouts)
            daemon = new.config.daemon
            self.metrics.info(__version__, daemon.mode, daemon.environment)
            log.info(
                "config_reloaded",
                sha256=new.config.sha256,
                monitors=len(self.monitors),
                sources_kept=old.kept_by(self.parts),
            )
            notify.ready(self._watching())
            return True
