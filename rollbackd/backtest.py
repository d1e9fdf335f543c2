"""``rollbackd backtest``: replay a config's Prometheus rules over their history, check by check.

The history is read with range queries (in chunks, off the loop); the decisions are the
daemon's own: ``engine.judge_rules`` then ``engine.advance``, on a simulated clock.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime

from prometheus_api_client import PrometheusConnect

from rollbackd import engine
from rollbackd.assemble import Assembly
from rollbackd.backtest_fetch import (
    MAX_POINTS,
    BacktestError,
    Chunk,
    Fetched,
    Progress,
    chunks,
    fetch,
    open_clients,
    place,
    refuse_useless,
    rfc3339,
)
from rollbackd.config import VOLUME, Config, MonitorConfig
from rollbackd.engine import Event, MonitorState, Outcome, Phase, Policy
from rollbackd.options import parse_duration
from rollbackd.readings import Labels, Reading, excerpt

MAX_CHECKS = 2_000_000
"""More checks than this in one monitor's span is refused (shorten the span)."""

LATEST = 253_402_300_799.0
"""9999-12-31T23:59:59Z, the latest time RFC 3339 can write."""

_NUMBER = re.compile(r"\d+(?:\.\d+)?")


# --- the span --------------------------------------------------------------------------


def parse_when(text: str, now: float, option: str = "--from") -> float:
    """RFC 3339, a Unix timestamp, or a duration ago (``7d``, ``90m``) as Unix seconds."""
    text = text.strip()
    if _NUMBER.fullmatch(text):
        seconds = float(text)
        if seconds > LATEST:
            raise BacktestError(f"{option}: {excerpt(text, 60)} is after the year 9999")
        return seconds
    with contextlib.suppress(ValueError):  # not a duration ago: an RFC 3339 time, then
        return max(0.0, now - parse_duration(text))
    try:
        when = datetime.fromisoformat(text)
    except ValueError:
        raise BacktestError(
            f"{option}: cannot read {excerpt(text, 60)!r}: give an RFC 3339 time "
            "(2025-01-06T00:00:00Z), a Unix timestamp or a duration ago (7d, 90m)"
        ) from None
    if when.tzinfo is None:
        raise BacktestError(f"{option}: {text!r} has no time zone: add Z or an offset (+01:00)")
    return when.timestamp()


def span(start: str, end: str | None, now: float) -> tuple[float, float]:
    """``(from, to)`` in Unix seconds; ``to`` defaults to ``now``; from must not be after to."""
    first = parse_when(start, now, "--from")
    last = now if end is None else parse_when(end, now, "--to")
    if first > last:
        raise BacktestError(f"--from {rfc3339(first)} is after --to {rfc3339(last)}")
    return first, last


# --- what a backtest finds -------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Found:
    """One decision the daemon would have taken: ``alert``, ``rollback`` or ``blind``."""

    at: float
    event: str
    reason: str


@dataclass(slots=True)
class Margin:
    """A rule's closest approach to its threshold: threshold - value (above), value - threshold."""

    value: float | None = None
    at: float | None = None
    labels: Labels = ()
    reading: float | None = None


@dataclass(slots=True)
class Trace:
    """One series' values over the span (for plots): times and values, NaN where missing."""

    times: list[float] = field(default_factory=list)
    values: list[float] = field(default_factory=list)


@dataclass(slots=True)
class MonitorRun:
    """What the replay of one monitor found."""

    name: str
    config: MonitorConfig
    start: float = 0.0
    """The first check's time; check ``k`` is at ``start + k * interval``."""
    skipped: str | None = None
    checks: int = 0
    events: list[Found] = field(default_factory=list)
    rearmed: list[float] = field(default_factory=list)
    """When the backtest re-armed the monitor: the first ok check after each rollback."""
    margins: dict[str, Margin] = field(default_factory=dict)
    traces: dict[str, dict[Labels, Trace]] = field(default_factory=dict)
    outcomes: list[Outcome] = field(default_factory=list)
    phases: list[Phase] = field(default_factory=list)
    """The monitor's phase after each check (what a ``held_by`` on it sees)."""

    def phase_at(self, at: float) -> Phase:
        """The phase as of time ``at``: after the last check at or before it."""
        k = math.floor((at - self.start) / self.config.interval + 1e-9)
        if k < 0 or not self.phases:
            return Phase.OK
        return self.phases[min(k, len(self.phases) - 1)]


@dataclass(frozen=True, slots=True)
class Backtest:
    """The whole run: the span, the check times' origin, and each monitor's findings."""

    start: float
    end: float
    monitors: dict[str, MonitorRun]


# --- the replay (pure) -------------------------------------------------------------------


def check_count(start: float, end: float, interval: float) -> int:
    """Checks at ``start + k * interval`` up to ``end`` (one at ``start`` at least)."""
    return math.floor((end - start) / interval + 1e-9) + 1


def replay(
    name: str,
    monitor: MonitorConfig,
    steps: Mapping[str, Sequence[Sequence[Reading]]],
    start: float,
    *,
    keep_traces: bool = False,
    held: Callable[[float], str | None] | None = None,
) -> MonitorRun:
    """Judge and advance every check, as the daemon does; re-arm at the first ok after a rollback.

    ``steps[rule][k]`` are the readings of check ``k`` (at ``start + k * interval``); an
    empty list is a step where the query returned no series (the rule's ``no_data`` applies).
    A guarded rule's volumes are ``steps["volume:" + rule]``; ``held(at)`` says what holds
    the monitor's rollback at a check (``held_by``, from its dependencies' own replays).
    """
    run = MonitorRun(name, monitor, start, margins={rule.name: Margin() for rule in monitor.rules})
    policy = Policy.of(monitor)
    rules = monitor.rules
    names = [rule.name for rule in rules]
    guarded = [VOLUME + rule.name for rule in rules if rule.volume_read() is not None]
    shadow = frozenset(rule.name for rule in rules if monitor.shadow or rule.shadow)
    count = min((len(steps[n]) for n in names), default=0)
    state = MonitorState()
    for k in range(count):
        at = start + k * monitor.interval
        volumes = {v.removeprefix(VOLUME): steps[v][k] for v in guarded}
        check = engine.judge_rules(
            name, rules, {n: steps[n][k] for n in names}, at, volumes=volumes, shadow=shadow
        )
        latched = state.phase is Phase.ROLLED_BACK
        transition = engine.advance(state, check, policy, held(at) if held else None)
        state = transition.state
        run.events.extend(Found(at, str(e), transition.reason) for e in transition.events)
        if latched and check.outcome is Outcome.OK:
            state = engine.rearm(state)
            _note_rearm(run, at)
        run.outcomes.append(check.outcome)
        run.phases.append(state.phase)
        _measure(run, check, keep_traces)
    run.checks = count
    return run


def _note_rearm(run: MonitorRun, at: float) -> None:
    run.rearmed.append(at)
    for i in range(len(run.events) - 1, -1, -1):
        found = run.events[i]
        if found.event == Event.ROLLBACK:
            note = f"; re-armed by the backtest at {rfc3339(at)}, the first ok check after it"
            run.events[i] = replace(found, reason=found.reason + note)
            return


def _measure(run: MonitorRun, check: engine.Check, keep_traces: bool) -> None:
    for result in check.results:
        value = result.value
        if keep_traces and (value is not None or result.labels):
            trace = run.traces.setdefault(result.rule, {}).setdefault(result.labels, Trace())
            trace.times.append(check.at)
            trace.values.append(math.nan if value is None else value)
        if value is None or not math.isfinite(value):
            continue
        if result.direction == "above":
            margin = result.threshold - value
        else:
            margin = value - result.threshold
        closest = run.margins[result.rule]
        if closest.value is None or margin < closest.value:
            closest.value, closest.at = margin, check.at
            closest.labels, closest.reading = result.labels, value


def skip_reason(monitor: MonitorConfig, kinds: Mapping[str, str]) -> str | None:
    """Why a monitor cannot be replayed: a rule reads a source without history in Prometheus."""
    for rule in monitor.rules:
        kind = kinds.get(rule.source, "?")
        if kind != "prometheus":
            return (
                f"rule {rule.name} reads {kind} source {rule.source}, which has no history "
                "in Prometheus (a history_query on the rule would stand for it)"
            )
    return None


# --- the whole run -----------------------------------------------------------------------


async def run(
    assembly: Assembly,
    start: float,
    end: float,
    monitors: Sequence[str] = (),
    *,
    clients: Mapping[str, PrometheusConnect] | None = None,
    max_points: int = MAX_POINTS,
    keep_traces: bool = False,
    progress: Progress | None = None,
) -> Backtest:
    """Replay the selected monitors (all when none are named) over ``start``..``end``.

    ``clients`` hands in Prometheus clients by source name (tests); others come from
    ``sources.prometheus.connect`` with the source's auth and TLS.
    """
    config = assembly.config
    unknown = [m for m in monitors if m not in config.monitors]
    if unknown:
        known = ", ".join(sorted(config.monitors)) or "none"
        raise BacktestError(f"--monitor {unknown[0]}: no such monitor (known: {known})")
    selected = _with_holders(config, list(dict.fromkeys(monitors)) or list(config.monitors))
    kinds = {name: table.type for name, table in config.sources.items()}
    found: dict[str, MonitorRun] = {}
    jobs: list[Chunk] = []
    counts: dict[str, int] = {}
    for name in selected:
        monitor = config.monitors[name]
        why = skip_reason(monitor, kinds)
        if why is not None:
            found[name] = MonitorRun(
                name, monitor, start, skipped=why, margins={r.name: Margin() for r in monitor.rules}
            )
            continue
        counts[name] = check_count(start, end, monitor.interval)
        if counts[name] > MAX_CHECKS:
            raise BacktestError(
                f"monitors.{name}: {counts[name]} checks at {monitor.interval:g} s is more "
                f"than {MAX_CHECKS}: shorten the span"
            )
        for rule in monitor.rules:
            jobs += chunks(rule, start, monitor.interval, counts[name], max_points)
            if (volume := rule.volume_read()) is not None:
                jobs += chunks(volume, start, monitor.interval, counts[name], max_points)
    given = clients or {}
    sources = open_clients(assembly, {job.rule.source for job in jobs}, given)
    try:
        answers = await fetch(sources, jobs, progress)
    finally:
        for name, (_, client) in sources.items():
            if name not in given:
                client.close()
    refuse_useless(answers, sources, start, end)
    by_rule: dict[tuple[str, str], list[Fetched]] = {}
    for answer in answers:
        by_rule.setdefault((answer.chunk.rule.source, answer.chunk.rule.name), []).append(answer)
    for name in selected:  # dependencies first: a held_by reads their replayed phases
        if name not in counts:
            continue
        monitor, count = config.monitors[name], counts[name]
        reads = [*monitor.rules, *filter(None, (r.volume_read() for r in monitor.rules))]
        steps = {
            read.name: place(by_rule.get((read.source, read.name), []), count) for read in reads
        }
        found[name] = await asyncio.to_thread(
            replay,
            name,
            monitor,
            steps,
            start,
            keep_traces=keep_traces,
            held=_holder(monitor.held_by, found) if monitor.held_by else None,
        )
    shown = list(dict.fromkeys(monitors)) or list(config.monitors)
    return Backtest(start, end, {name: found[name] for name in shown})


def _with_holders(config: Config, names: list[str]) -> list[str]:
    """``names`` and the monitors they are held by, each after what it is held by."""
    ordered: list[str] = []

    def add(name: str) -> None:
        if name in ordered:
            return
        for other in config.monitors[name].held_by:
            add(other)
        ordered.append(name)

    for name in names:
        add(name)
    return ordered


def _holder(
    held_by: Sequence[str], found: Mapping[str, MonitorRun]
) -> Callable[[float], str | None]:
    """``held(at)``: the first dependency not ok at ``at`` in its own replay (skipped: never)."""

    def held(at: float) -> str | None:
        for name in held_by:
            run = found.get(name)
            if (
                run is not None
                and run.skipped is None
                and (phase := run.phase_at(at)) is not Phase.OK
            ):
                return f"{name} ({phase})"
        return None

    return held
