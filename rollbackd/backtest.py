"""``rollbackd backtest``: replay a config's Prometheus rules over their history, check by check.

The history is read with range queries (in chunks, off the loop); the decisions are the
daemon's own: ``engine.judge_rules`` then ``engine.advance``, on a simulated clock.
"""

from __future__ import annotations

import asyncio
import math
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Any

import requests
from prometheus_api_client import PrometheusConnect
from prometheus_api_client.exceptions import PrometheusApiClientException

from rollbackd import engine
from rollbackd.assemble import Assembly
from rollbackd.config import MonitorConfig, RuleConfig
from rollbackd.engine import Event, MonitorState, Outcome, Phase, Policy
from rollbackd.errors import RollbackdError, SecretError
from rollbackd.options import parse_duration
from rollbackd.readings import Labels, Reading, error, excerpt, labels_of, ok
from rollbackd.sources.prometheus import PrometheusOptions, connect, sample_value

MAX_POINTS = 10_000
"""Checks per range query: Prometheus refuses more than 11,000 points per series."""
MAX_CHECKS = 2_000_000
"""Checks per monitor a backtest may replay (about 2 years at 30 s)."""
RANGE_TIMEOUT = 60.0
"""Seconds a range query may take at least (the source's ``timeout`` is for instant queries)."""

LATEST = 253_402_300_799.0
"""9999-12-31T23:59:59Z, the latest time RFC 3339 can write."""

_NUMBER = re.compile(r"\d+(?:\.\d+)?")
_FAILURES = (
    TimeoutError,
    PrometheusApiClientException,
    requests.exceptions.RequestException,
    KeyError,
    TypeError,
    ValueError,
    RecursionError,
)

Progress = Callable[[int, int], None]
"""Told ``(chunks done, chunks in all)`` as range queries finish."""


class BacktestError(RollbackdError):
    """The backtest cannot run (bad span, unknown monitor, unreachable source): one line."""


# --- the span --------------------------------------------------------------------------


def parse_when(text: str, now: float, option: str = "--from") -> float:
    """RFC 3339, a Unix timestamp, or a duration ago (``7d``, ``90m``) as Unix seconds."""
    text = text.strip()
    if _NUMBER.fullmatch(text):
        seconds = float(text)
        if seconds > LATEST:
            raise BacktestError(f"{option}: {excerpt(text, 60)} is after the year 9999")
        return seconds
    try:
        return max(0.0, now - parse_duration(text))
    except ValueError:
        pass
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


def rfc3339(at: float) -> str:
    """``2025-01-06T10:05:00Z`` (milliseconds only when there are some)."""
    when = datetime.fromtimestamp(at, UTC)
    spec = "seconds" if when.microsecond == 0 else "milliseconds"
    return when.isoformat(timespec=spec).replace("+00:00", "Z")


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
) -> MonitorRun:
    """Judge and advance every check, as the daemon does; re-arm at the first ok after a rollback.

    ``steps[rule][k]`` are the readings of check ``k`` (at ``start + k * interval``); an
    empty list is a step where the query returned no series (the rule's ``no_data`` applies).
    """
    run = MonitorRun(name, monitor, start, margins={rule.name: Margin() for rule in monitor.rules})
    policy = Policy.of(monitor)
    rules = monitor.rules
    names = [rule.name for rule in rules]
    count = min((len(steps[n]) for n in names), default=0)
    state = MonitorState()
    for k in range(count):
        at = start + k * monitor.interval
        check = engine.judge_rules(name, rules, {n: steps[n][k] for n in names}, at)
        latched = state.phase is Phase.ROLLED_BACK
        transition = engine.advance(state, check, policy)
        state = transition.state
        run.events.extend(Found(at, str(e), transition.reason) for e in transition.events)
        if latched and check.outcome is Outcome.OK:
            state = engine.rearm(state)
            _note_rearm(run, at)
        run.outcomes.append(check.outcome)
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


# --- fetching the history ----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Chunk:
    """One range query: checks ``first`` to ``first + count - 1`` of one rule."""

    rule: RuleConfig
    start: float
    interval: float
    first: int
    count: int


@dataclass(slots=True)
class Fetched:
    """A chunk's answer: the readings of its checks (by index), or why it failed."""

    chunk: Chunk
    series: list[tuple[Labels, list[tuple[float, float]]]] = field(default_factory=list)
    problem: str = ""


def chunks(
    rule: RuleConfig, start: float, interval: float, count: int, max_points: int = MAX_POINTS
) -> list[Chunk]:
    """Split ``count`` checks into range queries of at most ``max_points`` steps."""
    return [
        Chunk(rule, start, interval, first, min(max_points, count - first))
        for first in range(0, count, max_points)
    ]


def query_chunk(client: PrometheusConnect, chunk: Chunk, timeout: float, url: str) -> Fetched:
    """Run one range query (blocking: call it in a thread); a failure is the chunk's problem."""
    first = chunk.start + chunk.first * chunk.interval
    last = first + (chunk.count - 1) * chunk.interval
    query = chunk.rule.query or ""
    try:
        # custom_query_range rounds start/end to whole seconds; the params keep them exact.
        result = client.custom_query_range(
            query,
            start_time=datetime.fromtimestamp(first, UTC),
            end_time=datetime.fromtimestamp(last, UTC),
            step=f"{chunk.interval:g}",
            params={"start": f"{first:.3f}", "end": f"{last:.3f}"},
            timeout=timeout,
        )
        return _parse_matrix(chunk, result)
    except _FAILURES as exc:
        return Fetched(chunk, problem=f"{_describe(exc, url, timeout)} (query: {excerpt(query)})")


def _parse_matrix(chunk: Chunk, result: object) -> Fetched:
    if not isinstance(result, list):
        return Fetched(chunk, problem=f"unexpected result: {type(result).__name__}")
    fetched = Fetched(chunk)
    for series in result:
        if not isinstance(series, dict) or not isinstance(series.get("values"), list):
            return Fetched(chunk, problem="unexpected result: not a matrix")
        metric = series.get("metric") or {}
        labels = labels_of({str(k): str(v) for k, v in dict(metric).items()})
        samples = []
        for pair in series["values"]:
            value = sample_value(pair[1])
            if value is None:
                return Fetched(chunk, problem=f"a sample is not a number: {excerpt(str(pair))}")
            samples.append((float(pair[0]), value))
        fetched.series.append((labels, samples))
    return fetched


def _describe(exc: Exception, url: str, timeout: float) -> str:
    if isinstance(exc, TimeoutError | requests.exceptions.Timeout):
        return f"timed out after {timeout:g}s"
    if isinstance(exc, requests.exceptions.ConnectionError):
        return f"cannot connect to {url}"
    if isinstance(exc, PrometheusApiClientException):
        return excerpt(str(exc))
    return f"{type(exc).__name__}: {excerpt(str(exc))}"


def place(fetched: Iterable[Fetched], count: int) -> list[list[Reading]]:
    """Readings per check of one rule: a series' sample at its step, errors for failed chunks."""
    steps: list[list[Reading]] = [[] for _ in range(count)]
    for answer in fetched:
        chunk = answer.chunk
        if answer.problem:
            for k in range(chunk.first, chunk.first + chunk.count):
                steps[k] = [error(answer.problem, chunk.start + k * chunk.interval)]
            continue
        for labels, samples in answer.series:
            for t, value in samples:
                k = round((t - chunk.start) / chunk.interval)
                if chunk.first <= k < chunk.first + chunk.count:
                    steps[k].append(ok(value, chunk.start + k * chunk.interval, labels))
    return steps


async def fetch(
    sources: Mapping[str, tuple[PrometheusOptions, PrometheusConnect]],
    jobs: Sequence[Chunk],
    progress: Progress | None = None,
) -> list[Fetched]:
    """Run every chunk on its source's own pool of ``max_concurrency`` threads."""
    loop = asyncio.get_running_loop()
    pools = {
        name: ThreadPoolExecutor(options.max_concurrency, thread_name_prefix=f"backtest-{name}")
        for name, (options, _) in sources.items()
    }
    done = 0

    def tick(_: object) -> None:
        nonlocal done
        done += 1
        if progress is not None:
            progress(done, len(jobs))

    try:
        futures = []
        for job in jobs:
            options, client = sources[job.rule.source]
            timeout = max(options.timeout, RANGE_TIMEOUT)
            future = loop.run_in_executor(
                pools[job.rule.source], query_chunk, client, job, timeout, options.url
            )
            future.add_done_callback(tick)
            futures.append(future)
        return list(await asyncio.gather(*futures))
    finally:
        for pool in pools.values():
            pool.shutdown(wait=False, cancel_futures=True)


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
    selected = list(dict.fromkeys(monitors)) or list(config.monitors)
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
    given = clients or {}
    sources = _clients(assembly, {job.rule.source for job in jobs}, given)
    try:
        answers = await fetch(sources, jobs, progress)
    finally:
        for name, (_, client) in sources.items():
            if name not in given:
                client.close()
    _refuse_useless(answers, sources, start, end)
    by_rule: dict[tuple[str, str], list[Fetched]] = {}
    for answer in answers:
        by_rule.setdefault((answer.chunk.rule.source, answer.chunk.rule.name), []).append(answer)
    for name, count in counts.items():
        monitor = config.monitors[name]
        steps = {
            rule.name: place(by_rule.get((rule.source, rule.name), []), count)
            for rule in monitor.rules
        }
        found[name] = await asyncio.to_thread(
            replay, name, monitor, steps, start, keep_traces=keep_traces
        )
    return Backtest(start, end, {name: found[name] for name in selected})


def _clients(
    assembly: Assembly, names: Iterable[str], given: Mapping[str, PrometheusConnect]
) -> dict[str, tuple[PrometheusOptions, PrometheusConnect]]:
    out: dict[str, tuple[PrometheusOptions, PrometheusConnect]] = {}
    for name in names:
        options = assembly.sources[name].options
        assert isinstance(options, PrometheusOptions)
        try:
            out[name] = (options, given.get(name) or connect(options))
        except SecretError as exc:
            raise BacktestError(f"sources.{name}: cannot use the secret {exc}") from exc
    return out


def _refuse_useless(
    answers: Sequence[Fetched], sources: Mapping[str, Any], start: float, end: float
) -> None:
    """A source none of whose queries answered is unreachable; no series at all is no data."""
    for name in sources:
        mine = [a for a in answers if a.chunk.rule.source == name]
        if mine and all(a.problem for a in mine):
            raise BacktestError(f"sources.{name}: {mine[0].problem}")
    if answers and not any(a.series for a in answers):
        raise BacktestError(
            f"no samples between {rfc3339(start)} and {rfc3339(end)} for any rule: "
            "is the span inside Prometheus's retention?"
        )
