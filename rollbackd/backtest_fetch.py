"""Fetching a backtest's history: range queries in chunks, on each source's own threads.

The readings per check come out as the live sources would give them (a failed chunk is an
error reading for each of its checks), for ``backtest.replay`` to judge.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import requests
from prometheus_api_client import PrometheusConnect
from prometheus_api_client.exceptions import PrometheusApiClientException

from rollbackd.assemble import Assembly
from rollbackd.config import RuleConfig
from rollbackd.errors import RollbackdError, SecretError
from rollbackd.readings import Labels, Reading, error, excerpt, labels_of, ok
from rollbackd.sources.prometheus import PrometheusOptions, connect, sample_value

MAX_POINTS = 10_000
"""Checks per range query: Prometheus refuses more than 11,000 points per series."""
"""Checks per monitor a backtest may replay (about 2 years at 30 s)."""
RANGE_TIMEOUT = 60.0
"""Seconds a range query may take at least (the source's ``timeout`` is for instant queries)."""

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


def rfc3339(at: float) -> str:
    """``2025-01-06T10:05:00Z`` (milliseconds only when there are some)."""
    when = datetime.fromtimestamp(at, UTC)
    spec = "seconds" if when.microsecond == 0 else "milliseconds"
    return when.isoformat(timespec=spec).replace("+00:00", "Z")


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


def open_clients(
    assembly: Assembly, names: Iterable[str], given: Mapping[str, PrometheusConnect]
) -> dict[str, tuple[PrometheusOptions, PrometheusConnect]]:
    """A range-query client per named source: ``given`` ones (tests), else with its auth/TLS."""
    out: dict[str, tuple[PrometheusOptions, PrometheusConnect]] = {}
    for name in names:
        options = assembly.sources[name].options
        assert isinstance(options, PrometheusOptions)
        try:
            out[name] = (options, given.get(name) or connect(options))
        except SecretError as exc:
            raise BacktestError(f"sources.{name}: cannot use the secret {exc}") from exc
    return out


def refuse_useless(
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
