"""Runs an incident's plan: ordered steps with timeouts and retries, resumable after a crash.

Each finished plan leaves an incident record in ``state_dir/incidents/<id>.json``.
"""

from __future__ import annotations

import asyncio
import errno
import json
import random
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import aiohttp
import structlog

from rollbackd import incidents
from rollbackd.actions import Action, ActionContext, Incident
from rollbackd.assemble import Assembly
from rollbackd.atomic import atomic_write
from rollbackd.config import ActionConfig
from rollbackd.errors import (
    ActionError,
)
from rollbackd.records import IncidentRecord, StepRecord, StepStatus
from rollbackd.redact import Redactor
from rollbackd.sources import Source
from rollbackd.state import Store
from rollbackd.stores import StateStore, as_state

log = structlog.get_logger("rollbackd.plan")

DEFAULT = ActionConfig(type="")
"""Limits of a step whose action is not configured (it fails at once anyway)."""
SAMPLES = 50
"""Recent checks an incident record copies (fewer when ``daemon.history`` keeps fewer)."""
MAX_INTERRUPTIONS = 5
"""A step the daemon died in this many times is failed: no endless crash loop."""
DETAIL_CHARS = 2000
AttemptObserver = Callable[[str, str], None]
"""Told ``(action, result)`` for every attempt: result is ok, failed or would_run."""


def idempotency_key(incident_id: str, step: int) -> str:
    """Return the key that stays the same across retries and restarts of one step."""
    return f"{incident_id}:{step}"


def step_key(incident: Incident, step: int) -> str:
    """The step's idempotency key: ``<incident>:<step>``, or the incident's own if it has one.

    A rollout's promotion carries ``<rollout>:<step>`` in its details.
    """
    given = incident.details.get("idempotency_key")
    return given if isinstance(given, str) else idempotency_key(incident.id, step)


@dataclass(slots=True)
class PlanRunner:
    """Runs incidents' plans against the built actions; all progress goes through the Store."""

    store: StateStore | Store
    actions: Mapping[str, Action]
    action_configs: Mapping[str, ActionConfig]
    mode: str
    state_dir: Path
    sources: Mapping[str, Source] = field(default_factory=dict)
    config_sha256: str = ""
    environment: str = "production"
    on_attempt: AttemptObserver | None = None
    on_duration: Callable[[str, float], None] | None = None
    """Told ``(action, seconds)`` of every attempt that ran (the latency metric)."""
    backoff_base: float = 0.5
    """First retry delay in seconds; it doubles per attempt (with jitter) up to ``backoff_cap``."""
    backoff_cap: float = 30.0
    samples: int = SAMPLES
    """Recent checks of the monitor copied into the incident record (at most ``history``)."""
    clock: Callable[[], float] = time.time
    redactor: Redactor = field(default_factory=Redactor)
    """Secrets out of step details and incident records."""
    on_failed_steps: Callable[[IncidentRecord], Awaitable[None]] | None = None
    """Told of every finished plan just before it is marked finished (the daemon alerts on a
    rollback with failed steps); after a crash right there it is told again: at least once."""
    _store: StateStore = field(init=False)

    def __post_init__(self) -> None:
        self._store = as_state(self.store)

    async def resume(self) -> list[str]:
        """Finish every incident a previous run left unfinished, oldest first; their ids."""
        finished = []
        for incident in await self._store.unfinished_incidents():
            if incident.waiting is not None:
                continue
            log.warning("plan_resuming", incident=incident.id, monitor=incident.monitor)
            await self.run(incident.id)
            finished.append(incident.id)
        return finished

    async def run(self, incident_id: str) -> None:
        """Run the steps not yet done, write the incident record, mark the incident finished."""
        record = await self._store.incident(incident_id)
        if record.finished_at is not None:  # started twice, or already done before a restart
            return
        if record.waiting is not None:  # only an approval or a cooldown's end lets it run
            log.info("plan_held", incident=record.id, waiting=record.waiting)
            return
        incident = incidents.view(record, self.environment)
        # An incident opened in dry-run stays dry-run; a daemon switched to dry-run stops acting.
        armed = record.mode == "armed" and self.mode == "armed"
        pending = [step for step in record.steps if not step.status.final]
        log.info(
            "plan_started" if len(pending) == len(record.steps) else "plan_continued",
            incident=incident.id,
            monitor=incident.monitor,
            plan_event=record.event,
            mode="armed" if armed else "dry-run",
            steps=len(record.steps),
            pending=len(pending),
        )
        for step in pending:
            if armed:
                await self._run_step(incident, step)
            else:
                await self._finish(
                    incident, step, StepStatus.WOULD_RUN, f"dry-run: would run {step.action}"
                )
        await self._close(incident_id)

    async def _run_step(self, incident: Incident, step: StepRecord) -> None:
        """Attempt until ok, or ``retries`` lasting failures, or ``give_up_after`` has passed.

        A transient failure (refused, timed out, 5xx, out of file descriptors) does not use up
        ``retries``: it is retried with backoff for as long as ``give_up_after`` allows.
        """
        action = self.actions.get(step.action)
        if action is None:
            detail = f"action {step.action!r} is not configured"
            await self._finish(incident, step, StepStatus.FAILED, detail)
            return
        config = self.action_configs.get(step.action, DEFAULT)
        died = step.status is StepStatus.RUNNING  # the daemon died during an attempt
        interrupted = died and await self._store.step_interrupted(incident.id, step.step)
        if interrupted and interrupted >= MAX_INTERRUPTIONS:
            detail = f"gave up: the daemon died during this step {MAX_INTERRUPTIONS} times"
            await self._finish(incident, step, StepStatus.FAILED, detail)
            return
        while True:
            attempt = await self._store.step_started(incident.id, step.step, self.clock())
            ctx = ActionContext(
                incident=incident,
                step=step.step,
                attempt=attempt,
                idempotency_key=step_key(incident, step.step),
                sources=self.sources,
                state_dir=self.state_dir,
            )
            began = time.perf_counter()
            ok, detail, transient = await attempt_once(action, ctx, config.timeout)
            if self.on_duration is not None:
                self.on_duration(step.action, time.perf_counter() - began)
            self._count(step.action, "ok" if ok else "failed")
            if ok:
                await self._finish(incident, step, StepStatus.OK, detail, attempt=attempt)
                return
            failures = await self._store.step_failed(incident.id, step.step, lasting=not transient)
            if failures > config.retries:
                await self._finish(incident, step, StepStatus.FAILED, detail, attempt=attempt)
                return
            first = (await self._store.incident(incident.id)).steps[step.step].first_started_at
            delay = self._backoff(attempt)
            if first is not None and self.clock() + delay - first > config.give_up_after:
                detail = (
                    f"gave up after {attempt} attempts over {config.give_up_after:g}s: {detail}"
                )
                await self._finish(incident, step, StepStatus.FAILED, detail, attempt=attempt)
                return
            log.warning(
                "action_retry",
                action=step.action,
                incident=incident.id,
                step=step.step,
                attempt=attempt,
                transient=transient,
                error=detail,
                retry_in=round(delay, 3),
            )
            await asyncio.sleep(delay)

    def _backoff(self, attempt: int) -> float:
        ceiling = min(self.backoff_cap, self.backoff_base * 2.0 ** (attempt - 1))
        return ceiling * random.uniform(0.5, 1.0)  # noqa: S311 -- jitter, not cryptography

    async def _finish(
        self,
        incident: Incident,
        step: StepRecord,
        status: StepStatus,
        detail: str,
        attempt: int = 0,
    ) -> None:
        detail = self.redactor.text(detail)[:DETAIL_CHARS]
        await self._store.step_finished(incident.id, step.step, status, detail, self.clock())
        fields = {"action": step.action, "incident": incident.id, "step": step.step}
        if status is StepStatus.FAILED:
            log.error("action_failed", **fields, attempts=attempt or step.attempts, error=detail)
        elif status is StepStatus.WOULD_RUN:
            self._count(step.action, status)
            log.info("action_would_run", **fields)
        else:
            log.info("action_ok", **fields, attempt=attempt, detail=detail)

    def _count(self, action: str, result: str) -> None:
        if self.on_attempt is not None:
            self.on_attempt(action, result)

    async def _close(self, incident_id: str) -> None:
        now = self.clock()
        record = await self._store.incident(incident_id)
        path = self.state_dir / "incidents" / f"{incident_id}.json"
        samples = await self._store.recent_checks(record.monitor, self.samples)
        document = record.document(
            samples, environment=self.environment, config_sha256=self.config_sha256, at=now
        )
        document = self.redactor.value(document)
        try:
            await asyncio.to_thread(_write_json, path, document)
        except OSError as exc:  # the store still holds everything; the plan must finish
            log.exception(
                "incident_record_failed", incident=incident_id, path=str(path), error=str(exc)
            )
        failed = [s.action for s in record.failed_steps()]
        if self.on_failed_steps is not None:
            await self.on_failed_steps(record)
        await self._store.finish_incident(incident_id, now)
        (log.error if failed else log.info)(
            "plan_finished",
            incident=incident_id,
            monitor=record.monitor,
            failed=failed,
            record=str(path),
        )


async def attempt_once(
    action: Action, ctx: ActionContext, seconds: float
) -> tuple[bool, str, bool]:
    """Run one attempt, cancelled after ``seconds``; (succeeded, detail or reason, transient)."""
    ctx = replace(ctx, deadline=asyncio.get_running_loop().time() + seconds)
    try:
        async with asyncio.timeout(seconds):
            detail = await action.run(ctx)
    except ActionError as exc:
        return False, str(exc), transient(exc)
    except TimeoutError:
        return False, f"timed out after {seconds:g}s", True
    except Exception as exc:  # a plugin's bug fails its step, not the whole plan
        log.error("action_crashed", action=action.name, exc_info=True)
        return False, f"{type(exc).__name__}: {exc}", transient(exc)
    return True, str(detail), False


_TRANSIENT_ERRNOS = frozenset(
    {
        errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM, errno.EAGAIN, errno.EINTR,
        errno.ECONNREFUSED, errno.ECONNRESET, errno.ECONNABORTED, errno.ETIMEDOUT,
        errno.ENETUNREACH, errno.EHOSTUNREACH, errno.ENETDOWN, errno.EPIPE,
    }
)  # fmt: skip


def transient(exc: BaseException) -> bool:
    """Tell whether the same attempt may well succeed later (timeout, refused, 5xx, EMFILE).

    An ActionError says so itself when it knows (``transient=``); otherwise its cause decides.
    """
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, ActionError) and current.transient is not None:
            return current.transient
        if isinstance(current, TimeoutError | ConnectionError | aiohttp.ClientConnectionError):
            return True
        if isinstance(current, OSError) and current.errno in _TRANSIENT_ERRNOS:
            return True
        current = current.__cause__ or current.__context__
    return False


def _write_json(path: Path, document: dict[str, Any]) -> None:
    """Write an incident record readable by the service's user only (it holds evidence)."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    path.parent.chmod(0o700)
    text = json.dumps(document, indent=2, sort_keys=True, default=str) + "\n"
    atomic_write(path, text.encode("utf-8"))
    path.chmod(0o600)


async def fire_action(
    assembly: Assembly, name: str, *, clock: Callable[[], float] = time.time
) -> str:
    """``rollbackd test-action NAME``: run one action once (event ``test``); its detail.

    Raises ActionError when the attempt fails or times out.
    """
    config = assembly.config
    action = assembly.build_action(name)
    sources = assembly.sources_for(action)
    incident = incidents.for_test(
        name, mode=config.daemon.mode, environment=config.daemon.environment, now=clock()
    )
    ctx = ActionContext(incident, 0, 1, idempotency_key(incident.id, 0), sources)
    log.info("action_fired", action=name, type=config.actions[name].type, incident=incident.id)
    try:
        for source in sources.values():
            await source.start()
        ok, detail, _ = await attempt_once(action, ctx, config.actions[name].timeout)
    finally:
        await action.aclose()
        for source in sources.values():
            await source.aclose()
    if not ok:
        raise ActionError(f"action {name} failed: {detail}")
    return detail
